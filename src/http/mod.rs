//! The service's two HTTP listeners, kept apart because they face different callers:
//! [`admin`] for operators and the systems that feed batches (`HTTP_ADDR`), [`public`] for
//! mailbox providers on the internet (`PUBLIC_HTTP_ADDR`, off by default).

pub mod admin;
pub mod public;
