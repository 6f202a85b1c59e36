//! mailsender: a Kafka-driven bulk mail sender.
//!
//! The pipeline stages each live in their own module and own their task; see `ARCHITECTURE.md`.

pub mod address;
pub mod app;
pub mod attachments;
pub mod budget;
pub mod chore;
pub mod clock;
pub mod config;
pub mod control;
pub mod deliverability;
pub mod feedback;
pub mod http;
pub mod idempotency;
pub mod kafka;
pub mod lanes;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod priority;
pub mod retention;
pub mod smtp;
pub mod store;
pub mod telemetry;

pub use app::App;
pub use config::Config;
