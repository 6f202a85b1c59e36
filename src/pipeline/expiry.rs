//! Ends letters whose `NotAfter` passed while they waited in MongoDB, and publishes their status
//! messages (issue 19). Letters already claimed are ended by their worker instead.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::report::Report;
use crate::chore::chore;

/// How often the awaiting letters are checked: a letter ends at most this late after its
/// `NotAfter`. One indexed query per interval and replica, answered empty most of the time.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// Most letters ended in one round.
const BATCH: usize = 1000;

/// Runs until `shutdown`. Runs while sending is paused too: an expired letter will not be sent
/// whatever the operator decides, so its producer may as well hear so now.
pub async fn run(report: Report, shutdown: CancellationToken) {
    let report = &report;
    let stop = shutdown.clone();
    let stop = &stop;
    chore("expiry", INTERVAL, shutdown, move || async move {
        // A full batch is followed by the next at once: a backlog past its time ends quickly.
        while !stop.is_cancelled() && end_expired(report).await == BATCH {}
    })
    .await;
}

/// One batch of expired letters ended and published; how many.
async fn end_expired(report: &Report) -> usize {
    let letters = match report.store.expire_awaiting(report.store.now_ms(), BATCH).await {
        Ok(letters) => letters,
        Err(error) => {
            tracing::warn!(error = format!("{error:#}"), "ending expired letters failed");
            return 0;
        }
    };
    if letters.is_empty() {
        return 0;
    }
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
    letters.len()
}
