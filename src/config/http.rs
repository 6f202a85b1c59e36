//! The admin HTTP API's section: where it listens and who may use it.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use secrecy::SecretString;

use super::{ConfigError, Env, at_least};

#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub addr: SocketAddr,
    pub max_body_bytes: usize,
    pub admin_token: Option<SecretString>,
    /// Without `admin_token`, the admin routes answer only peers in these networks.
    pub admin_networks: Vec<Network>,
    /// Whether `ADMIN_ALLOWED_NETWORKS` was set rather than defaulted.
    pub admin_networks_chosen: bool,
    /// `HTTP_POST_TIMEOUT`: how long `POST /post` waits for Kafka, and the message timeout of its
    /// records, so that a `503` means the batch will not be produced later.
    pub post_timeout: Duration,
    /// `HTTP_IDEMPOTENCY_WINDOW`: how long an `Idempotency-Key` of `POST /post` is remembered.
    pub idempotency_window: Duration,
}

impl HttpConfig {
    /// The loopback default was made for `kubectl port-forward`; in a service mesh it admits
    /// every pod, so a listener beyond loopback needs a token, or networks someone chose on
    /// purpose. A deployment check rather than a parsing one: `from_env` applies it, while tests
    /// of other sections build a `Config` from the required variables alone.
    pub fn check_admin_guard(&self) -> Result<(), ConfigError> {
        if self.addr.ip().to_canonical().is_loopback() || self.admin_token.is_some() || self.admin_networks_chosen {
            return Ok(());
        }
        Err(ConfigError::AdminUnguarded { addr: self.addr })
    }
}

pub(super) fn read(env: &Env) -> Result<HttpConfig, ConfigError> {
    Ok(HttpConfig {
        addr: env.parse(
            "HTTP_ADDR",
            SocketAddr::from(([0, 0, 0, 0], 8000)),
            "an address such as 0.0.0.0:8000",
            |_| true,
        )?,
        max_body_bytes: env.parse("HTTP_MAX_BODY_BYTES", 1 << 20, "a byte count from 1 KiB to 64 MiB", |n| {
            (1024..=64 << 20).contains(n)
        })?,
        admin_token: env.secret("ADMIN_TOKEN"),
        admin_networks: networks(env, "ADMIN_ALLOWED_NETWORKS", "127.0.0.0/8,::1/128")?,
        admin_networks_chosen: env.optional("ADMIN_ALLOWED_NETWORKS").is_some(),
        // Below a second librdkafka cannot time a message out reliably (it scans once a second).
        post_timeout: at_least(
            "HTTP_POST_TIMEOUT",
            env.positive_duration("HTTP_POST_TIMEOUT", "10s")?,
            Duration::from_secs(1),
            "at least 1s",
        )?,
        idempotency_window: env.positive_duration("HTTP_IDEMPOTENCY_WINDOW", "24h")?,
    })
}

/// An IP network (`10.0.0.0/8`, `::1/128`; a bare address is a single host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl Network {
    pub fn contains(&self, ip: IpAddr) -> bool {
        // A peer on a dual-stack socket arrives as ::ffff:a.b.c.d; compare it as the IPv4 it is.
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Network {
    type Err = ();

    fn from_str(raw: &str) -> Result<Network, ()> {
        let (addr, prefix) = match raw.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (raw, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| ())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(prefix) => prefix.trim().parse::<u8>().map_err(|_| ())?,
            None => max,
        };
        if prefix > max {
            return Err(());
        }
        // An IPv4-mapped network (::ffff:10.0.0.0/104) is kept as the IPv4 network it names.
        match addr.to_canonical() {
            IpAddr::V4(v4) if addr.is_ipv6() => {
                Ok(Network { addr: IpAddr::V4(v4), prefix: prefix.checked_sub(96).ok_or(())? })
            }
            canonical => Ok(Network { addr: canonical, prefix }),
        }
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A comma-separated list of networks (empty, like unset, means the default).
fn networks(env: &Env, var: &'static str, default: &str) -> Result<Vec<Network>, ConfigError> {
    let raw = env.string(var, default);
    raw.split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(|n| {
            n.parse().map_err(|()| ConfigError::Invalid {
                var,
                value: raw.clone(),
                expected: "comma-separated networks such as 127.0.0.0/8,::1/128,10.0.0.0/8".into(),
            })
        })
        .collect()
}
