//! What happens to a letter after it is stored: claims and leases (the dispatcher), retries (the
//! policy), and the background chores that republish and delete.

use std::time::Duration;

use super::{ConfigError, Env, at_least};

/// Claims and leases: what the dispatcher takes from MongoDB and how long it holds it.
#[derive(Debug, Clone)]
pub struct DispatchConfig {
    pub lease: Duration,
    /// Most letters claimed from MongoDB in one round trip.
    pub claim_batch: usize,
    /// Most bytes of letters (bodies, subjects, addresses) held in memory at once, from claim to
    /// stored outcome; a single letter larger than this is still sent, alone.
    pub max_bytes: usize,
    /// How often an idle dispatcher looks for due letters (retries, other replicas' inserts).
    pub poll_interval: Duration,
    /// The share of the sends bulk letters keep while transactional ones wait too
    /// (`LANE_BULK_SHARE`, `crate::priority`).
    pub bulk_share: f64,
}

/// When a failed attempt is tried again (`policy::decide`).
#[derive(Debug, Clone)]
pub struct RetryConfig {
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

/// The background chores' rhythm.
#[derive(Debug, Clone)]
pub struct ChoreConfig {
    /// How often outcomes that were stored but never published are looked for.
    pub republish_interval: Duration,
    /// Most unreported outcomes one republishing round takes.
    pub republish_batch: usize,
    /// Finished letters older than this are deleted; zero keeps them.
    pub retention: Duration,
    /// How often retention runs (on one replica at a time).
    pub retention_interval: Duration,
}

pub(super) fn retry(env: &Env) -> Result<RetryConfig, ConfigError> {
    let retry = RetryConfig {
        max_attempts: env.parse("SMTP_MAX_ATTEMPTS", 5, "an attempt count from 1 to 100", |n| (1..=100).contains(n))?,
        backoff_base: env.positive_duration("RETRY_BACKOFF_BASE", "10s")?,
        backoff_max: env.positive_duration("RETRY_BACKOFF_MAX", "10m")?,
    };
    if retry.backoff_base > retry.backoff_max {
        return Err(ConfigError::Invalid {
            var: "RETRY_BACKOFF_BASE",
            value: humantime::format_duration(retry.backoff_base).to_string(),
            expected: format!("at most RETRY_BACKOFF_MAX ({})", humantime::format_duration(retry.backoff_max)),
        });
    }
    Ok(retry)
}

pub(super) fn dispatch(env: &Env) -> Result<DispatchConfig, ConfigError> {
    Ok(DispatchConfig {
        // A worker hands a message over (its final dot) only within the lease's last-but-one
        // quarter; that quarter must leave the dot a second to be written.
        lease: at_least(
            "LEASE_DURATION",
            env.duration("LEASE_DURATION", "30s")?,
            Duration::from_secs(4),
            "at least 4s (its last quarter bounds the time a message's final dot may take)",
        )?,
        claim_batch: env.parse("CLAIM_BATCH", 256, "a letter count from 1 to 5000", |n| (1..=5000).contains(n))?,
        max_bytes: env.parse("DISPATCH_MAX_BYTES", 16 << 20, "a byte count from 1 MiB to 4 GiB", |n| {
            ((1 << 20)..=(4 << 30)).contains(n)
        })?,
        poll_interval: env.positive_duration("DISPATCH_POLL_INTERVAL", "1s")?,
        bulk_share: env.parse("LANE_BULK_SHARE", 0.1, "a share from 0 to 0.9 (0.1 is 10 %)", |share: &f64| {
            (0.0..=0.9).contains(share)
        })?,
    })
}

pub(super) fn chores(env: &Env) -> Result<ChoreConfig, ConfigError> {
    Ok(ChoreConfig {
        republish_interval: env.positive_duration("REPUBLISH_INTERVAL", "30s")?,
        republish_batch: env
            .parse("REPUBLISH_BATCH", 256, "an outcome count from 1 to 5000", |n| (1..=5000).contains(n))?,
        retention: env.duration("LETTER_RETENTION", "30d")?,
        retention_interval: env.positive_duration("LETTER_RETENTION_INTERVAL", "10m")?,
    })
}
