//! Ends letters whose `NotAfter` passed while they waited in MongoDB, and publishes their status
//! messages (issue 19). Letters already claimed are ended by their worker instead.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::report::Report;

/// How often the awaiting letters are checked: a letter ends at most this late after its
/// `NotAfter`. One indexed query per interval and replica, answered empty most of the time.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// Most letters ended in one round.
const BATCH: usize = 1000;

/// Runs until `shutdown`. Runs while sending is paused too: an expired letter will not be sent
/// whatever the operator decides, so its producer may as well hear so now.
pub async fn run(report: Report, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let letters = match report.store.expire_awaiting(report.store.now_ms(), BATCH).await {
            Ok(letters) if letters.is_empty() => continue,
            Ok(letters) => letters,
            Err(error) => {
                tracing::warn!(error = format!("{error:#}"), "ending expired letters failed");
                continue;
            }
        };
        for _ in &letters {
            report.metrics.fail("expired");
        }
        // What the broker does not take stays `unreported`, for the republisher.
        match report.publish_ended(&letters).await {
            Ok(published) => tracing::info!(expired = letters.len(), published, "letters past NotAfter ended"),
            Err(error) => tracing::warn!(
                error = format!("{error:#}"),
                expired = letters.len(),
                "letters past NotAfter ended; marking their status messages published failed"
            ),
        }
        if letters.len() == BATCH {
            ticker.reset_immediately();
        }
    }
}
