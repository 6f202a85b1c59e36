//! Retention: finished letters (bodies included) older than `LETTER_RETENTION` are deleted in the
//! background, in batches, by one replica at a time, so the collection does not grow forever.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::{chore::chore, store::Store};

/// Letters deleted per round trip.
const BATCH: usize = 500;

/// Runs until `shutdown`. `retention` zero keeps every letter.
pub async fn run(store: Store, owner: String, retention: Duration, interval: Duration, shutdown: CancellationToken) {
    if retention.is_zero() {
        shutdown.cancelled().await;
        return;
    }
    let (store, owner, shutdown) = (&store, &owner, &shutdown);
    chore("retention", interval, shutdown.clone(), move || async move {
        let now = store.now_ms();
        // The lock outlasts one round, so two replicas never delete side by side.
        match store.try_lock("retention", owner, now, now + 2 * interval.as_millis() as i64).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(error) => {
                tracing::warn!(error = format!("{error:#}"), "taking the retention lock failed");
                return;
            }
        }
        let before = now - retention.as_millis() as i64;
        let mut deleted = 0;
        loop {
            match store.delete_finished(before, BATCH).await {
                Ok(n) => {
                    deleted += n;
                    if (n as usize) < BATCH || shutdown.is_cancelled() {
                        break;
                    }
                }
                Err(error) => {
                    tracing::warn!(error = format!("{error:#}"), "deleting letters past retention failed");
                    break;
                }
            }
        }
        if deleted > 0 {
            tracing::info!(deleted, retention = %humantime::format_duration(retention), "deleted finished letters past retention");
        }
    })
    .await;
}
