//! The stages of the pipeline, each a task: ingest → (MongoDB) → dispatch → send ×N → report.

pub mod dispatch;
pub mod expiry;
pub mod ingest;
pub mod policy;
pub mod queue;
pub mod rate_limit;
pub mod report;
pub mod send;
