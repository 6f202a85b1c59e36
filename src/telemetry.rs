//! Logging set-up and the signals that start a graceful shutdown.

use std::io::IsTerminal;

use tokio_util::sync::CancellationToken;
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::config::LogFormat;

/// Human-readable logs by default, JSON with `LOG_FORMAT=json`, level from `RUST_LOG`.
pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,librdkafka=warn,rdkafka=warn"));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Json => registry
            .with(fmt::layer().json().flatten_event(true).with_current_span(true).with_span_list(false))
            .try_init(),
        // Colour only on a terminal: in a pod's log or a file the escape codes are noise between
        // the fields that people and log pipelines read.
        LogFormat::Text => registry.with(fmt::layer().with_ansi(std::io::stdout().is_terminal())).try_init(),
    };
    // Already initialised (tests start several apps in one process): keep the first.
    let _ = result;
}

/// Cancels `token` on SIGTERM (Kubernetes) or SIGINT (Ctrl-C).
pub async fn cancel_on_signal(token: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutting down"),
            _ = int.recv() => tracing::info!(signal = "SIGINT", "shutting down"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    token.cancel();
}
