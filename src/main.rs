use std::process::ExitCode;

use mailsender::{App, Config, config::ConfigError, telemetry};
use tokio_util::sync::CancellationToken;

// mimalloc, by measurement (issue 23, bench/results.md): under callgrind it takes a letter from
// 304,683 to 255,046 instructions against the C library's allocator (the same commit).
// Rust's allocations only; librdkafka keeps the C library's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc v3's `mi_option_purge_delay` (its place in `mi_option_e`, which the sys crate's
/// constants stop short of; `allocator_options_are_where_we_think` checks it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
/// Freed pages go back to the system after this many milliseconds instead of v3's 1,000. With v3's
/// defaults a backlog of 600 KB letters (claimed, sent, freed, claimed again) peaked at 67.8 MiB
/// RSS, past the 64 MiB the dispatcher's memory bound keeps it under
/// (tests/integrity.rs, `a_backlog_of_megabyte_letters_stays_under_the_memory_ceiling`); the C
/// library's allocator peaked at 39. Measured there: this delay alone 57.8, transparent huge pages
/// off alone (the `no_thp` feature: mimalloc otherwise asks for them on its arenas) 57.0, both
/// 47.0 MiB. 10 ms is mimalloc v2's default: frees and reuse within one send round keep their pages.
const PURGE_DELAY_MS: std::ffi::c_long = 10;

fn tune_allocator() {
    // SAFETY: sets one of mimalloc's global options, read each time it purges; no memory is touched.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    tune_allocator();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocator_options_are_where_we_think() {
        // SAFETY: reads and sets mimalloc's global options.
        let delay = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(delay, 1_000, "option {MI_OPTION_PURGE_DELAY} is not v3's purge delay (default 1,000 ms)");
        tune_allocator();
        assert_eq!(unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) }, PURGE_DELAY_MS);
    }
}
