use std::process::ExitCode;

use mailsender::{App, Config, config::ConfigError, telemetry};
use tokio_util::sync::CancellationToken;

// mimalloc, chosen by measurement (issue 23, bench/results.md): under callgrind it took a letter from
// 335,770 to 255,090 instructions against glibc's malloc, which was a fifth of all of them. Rust's
// allocations only; librdkafka keeps the C library's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("mailsender: configuration error: {error}");
            return ExitCode::from(2);
        }
    };
    telemetry::init(config.log_format);

    let app = match App::build(config).await {
        Ok(app) => app,
        // A setting only its stage can check (the unsubscribe link template) ends the start as
        // the others do.
        Err(error) if error.downcast_ref::<ConfigError>().is_some() => {
            eprintln!("mailsender: configuration error: {error}");
            return ExitCode::from(2);
        }
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "start-up failed");
            return ExitCode::FAILURE;
        }
    };

    let shutdown = CancellationToken::new();
    tokio::spawn(telemetry::cancel_on_signal(shutdown.clone()));
    match app.run(shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "mailsender stopped with an error");
            ExitCode::FAILURE
        }
    }
}
