//! The background jobs (republishing, lease maintenance, retention, the control watch, the status
//! gauge) share one shape: a round every so often until shutdown. [`chore`] is that shape, so each
//! job is only its round.

use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

/// Runs `round` at once and then every `every` until `shutdown` fires. A round in progress is
/// finished, not dropped halfway: a round is a few MongoDB writes whose halves would have to be
/// cleaned up by the next.
pub async fn chore<F, Fut>(name: &'static str, every: Duration, shutdown: CancellationToken, round: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    rounds(name, Instant::now(), every, shutdown, round).await;
}

/// As [`chore`], for a job whose first round was done at start-up: the next is one `every` later.
pub async fn chore_after<F, Fut>(name: &'static str, every: Duration, shutdown: CancellationToken, round: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    rounds(name, Instant::now() + every, every, shutdown, round).await;
}

async fn rounds<F, Fut>(name: &'static str, first: Instant, every: Duration, shutdown: CancellationToken, mut round: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut ticker = tokio::time::interval_at(first, every);
    // A slow round (MongoDB failing over) delays the next instead of a burst catching up.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        round().await;
    }
    tracing::debug!(chore = name, "stopped");
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };

    use tokio::task::JoinHandle;

    use super::*;

    /// Runs `chore` or `chore_after` every 10 s, counting its rounds.
    fn counted(delayed: bool) -> (Arc<AtomicUsize>, CancellationToken, JoinHandle<()>) {
        let (count, shutdown) = (Arc::new(AtomicUsize::new(0)), CancellationToken::new());
        let (rounds, stop) = (count.clone(), shutdown.clone());
        let job = tokio::spawn(async move {
            let rounds = &rounds;
            let round = move || async move {
                rounds.fetch_add(1, Ordering::SeqCst);
            };
            match delayed {
                false => chore("test", Duration::from_secs(10), stop, round).await,
                true => chore_after("test", Duration::from_secs(10), stop, round).await,
            }
        });
        (count, shutdown, job)
    }

    #[tokio::test(start_paused = true)]
    async fn rounds_come_every_interval_until_shutdown() {
        let (count, shutdown, job) = counted(false);
        tokio::time::sleep(Duration::from_secs(25)).await;
        assert_eq!(count.load(Ordering::SeqCst), 3, "at 0 s, 10 s and 20 s");
        shutdown.cancel();
        job.await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(count.load(Ordering::SeqCst), 3, "no round after shutdown");
    }

    #[tokio::test(start_paused = true)]
    async fn chore_after_skips_the_round_at_start() {
        let (count, shutdown, job) = counted(true);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(count.load(Ordering::SeqCst), 0);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(count.load(Ordering::SeqCst), 1);
        shutdown.cancel();
        job.await.unwrap();
    }
}
