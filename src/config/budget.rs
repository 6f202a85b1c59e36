//! The sending budget's settings: the rate, its unit and the quota windows. They are read with
//! the SMTP section (`SMTP_RATE_LIMIT_*`, `SMTP_QUOTAS`), whose fields they stay.

use std::time::Duration;

use super::{ConfigError, Env, SmtpConfig, parse_duration};

/// What the budget counts (`SMTP_RATE_LIMIT_UNIT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateUnit {
    /// Every message handed to the relay costs 1 (a letter split into several transactions is
    /// several messages).
    Letter,
    /// Every message costs its recipient count, as SES and Google's relay count.
    Recipient,
}

/// At most `limit` units in any `window` (one entry of `SMTP_QUOTAS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaWindow {
    pub limit: u32,
    pub window: Duration,
}

impl std::fmt::Display for QuotaWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.limit, humantime::format_duration(self.window))
    }
}

pub(super) fn rate_unit(env: &Env) -> Result<RateUnit, ConfigError> {
    env.choice(
        "SMTP_RATE_LIMIT_UNIT",
        "letter",
        &[(&["letter", "letters", "message"], RateUnit::Letter), (&["recipient", "recipients"], RateUnit::Recipient)],
        "letter or recipient",
    )
}

/// `SMTP_QUOTAS`: a comma-separated list of `count/duration`, such as `10000/24h,300/1m`.
pub(super) fn quotas(env: &Env) -> Result<Vec<QuotaWindow>, ConfigError> {
    let Some(raw) = env.optional("SMTP_QUOTAS") else { return Ok(Vec::new()) };
    let invalid = || ConfigError::Invalid {
        var: "SMTP_QUOTAS",
        value: raw.clone(),
        expected: "a comma-separated list of count/duration such as 10000/24h,300/1m, counts of at least 1 \
                   and durations of at least 1s"
            .into(),
    };
    let mut quotas = Vec::new();
    for entry in raw.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (count, window) = entry.split_once('/').ok_or_else(invalid)?;
        let limit = count.trim().parse::<u32>().map_err(|_| invalid())?;
        let window = parse_duration(window).ok_or_else(invalid)?;
        // Shorter windows are the rate's job; the quota buckets are at least a second wide.
        if limit == 0 || window < Duration::from_secs(1) {
            return Err(invalid());
        }
        quotas.push(QuotaWindow { limit, window });
    }
    Ok(quotas)
}

/// The rate's settings that only make sense together.
pub(super) fn check_rate(smtp: &SmtpConfig) -> Result<(), ConfigError> {
    if smtp.rate_burst > smtp.rate_max_letters {
        return Err(ConfigError::Invalid {
            var: "SMTP_RATE_LIMIT_BURST",
            value: smtp.rate_burst.to_string(),
            expected: format!("at most SMTP_RATE_LIMIT_MAX_LETTERS ({})", smtp.rate_max_letters),
        });
    }
    if smtp.rate_period.is_zero() {
        return Err(ConfigError::Invalid {
            var: "SMTP_RATE_LIMIT_PERIOD",
            value: "0".into(),
            expected: "a positive duration".into(),
        });
    }
    Ok(())
}
