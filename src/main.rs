use std::process::ExitCode;

use mailsender::{App, Config, config::ConfigError, telemetry};
use tokio_util::sync::CancellationToken;

// The C library's allocator, by measurement (issue 23, bench/results.md): mimalloc as the global
// allocator took a letter from 335,770 to 255,090 instructions under callgrind, but the peak RSS of
// a backlog of 600 KB letters rose to 67.8 MiB, past the 64 MiB the dispatcher's memory bound keeps it
// under with glibc (tests/integrity.rs, `a_backlog_of_megabyte_letters_stays_under_the_memory_ceiling`).

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
