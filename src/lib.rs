//! mailsender: a Kafka-driven bulk mail sender.
//!
//! The pipeline stages each live in their own module and own their task; see `ARCHITECTURE.md`.

pub mod app;
pub mod config;
pub mod dispatch;
pub mod http;
pub mod ingest;
pub mod kafka;
pub mod message;
pub mod metrics;
pub mod model;
pub mod report;
pub mod send;
pub mod store;
pub mod telemetry;

pub use app::App;
pub use config::Config;
