//! `ear-sidecar` entry point: parse the command line, then hand over to the
//! library. `serve` loads and validates the whole configuration, starts the
//! [`App`] (keys, store, socket) and serves until SIGTERM/SIGINT.

use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;

use ear_sidecar::app::{self, commands, App};
use ear_sidecar::config::{Cli, Command, KeysCommand, ServeConfig};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => match ServeConfig::from_process_env(&args) {
            Ok(cfg) => serve(cfg),
            Err(e) => {
                eprintln!("ear-sidecar: configuration error: {e}");
                return ExitCode::from(2);
            }
        },
        Command::Status(args) => commands::status(&args),
        Command::ValidateKey(args) => return commands::validate_key(&args),
        Command::Check(args) => return app::check::run(&args),
        Command::Backup(args) => app::backup::run_backup(&args),
        Command::Restore(args) => app::backup::run_restore(&args),
        Command::Keys(KeysCommand::Rewrap(args)) => return app::keys_wrap::run(&args),
        Command::Keys(KeysCommand::Encrypt(args)) => return app::keys_encrypt::run(&args),
        Command::Keys(other) => return app::keys::run(&other),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ear-sidecar: error: {}", app::one_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn serve(cfg: ServeConfig) -> Result<()> {
    app::init_logging(&cfg.log_level, cfg.log_format);
    // Before the runtime starts its threads: they inherit PR_SET_IO_FLUSHER.
    ear_sidecar::keys::memory::prepare_process().log();
    app::runtime()?.block_on(async { App::start(cfg).await?.run(shutdown_signal()).await })
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install SIGTERM handler");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: draining"),
    }
}
