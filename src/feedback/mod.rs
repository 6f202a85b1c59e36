//! The feedback loop (issue 20): what happens to a letter after the relay's 250. A signed
//! return path ([`return_path`]) ties each DSN to its letter.

pub mod report;
pub mod return_path;
