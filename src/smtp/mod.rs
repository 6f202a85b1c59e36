//! The SMTP client: one conversation with the relay, knowing nothing of letters, leases or
//! workers. The pipeline decides what a reply means for a letter.

pub mod client;
pub mod message;
pub mod relays;
pub mod reply;
pub mod sandbox;
pub mod transaction;

pub use client::{Capabilities, Connection, Settings, Timeouts, TlsMode};
pub use message::Composed;
pub use relays::{Breaker, RelayAddr, RelayMetrics, Relays};
pub use reply::{Command, EnhancedCode, Reply, SmtpError};
pub use transaction::{RcptResult, Transaction};
