//! `ear-sidecar` entry point: parse and validate the whole configuration, load
//! keys, open the store, bind, serve until SIGTERM/SIGINT, drain, flush.
//! Everything of substance lives in the library modules.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;

use ear_sidecar::config::{
    Cli, Command, Encryption, KmsConfig, LogFormat, ServeConfig, StatusArgs,
};
use ear_sidecar::keys::local::LocalProvider;
use ear_sidecar::keys::registry::Registry;
use ear_sidecar::keys::KeyProvider;
use ear_sidecar::server::{self, Health, ServerConfig, Shared};
use ear_sidecar::store::{self, ExportSpec, Store};

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
        Command::Status(args) => status(&args),
        Command::ValidateKey(_args) => {
            Err(anyhow!("validate-key is not available in this build yet"))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("ear-sidecar: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(cfg: &ServeConfig) {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| EnvFilter::new(&cfg.log_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cfg.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Blocking pool for file I/O: in-flight work is bounded by the server,
        // and a modest cap keeps thread count (and RSS) in check.
        .max_blocking_threads(64)
        .thread_name("ear-worker")
        .build()
        .context("start the async runtime")
}

/// Holds an exclusive lock on the data directory for the process lifetime, so
/// two sidecars can never write one store.
fn lock_data_dir(dir: &Path) -> Result<std::fs::File> {
    let path = dir.join(".lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(|_| {
        anyhow!(
            "data directory {} is in use by another ear-sidecar process",
            dir.display()
        )
    })?;
    Ok(f)
}

fn create_data_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("create data directory {}", dir.display()))
}

fn serve(cfg: ServeConfig) -> Result<()> {
    init_logging(&cfg);
    let rt = runtime()?;
    rt.block_on(serve_async(cfg))
}

async fn serve_async(cfg: ServeConfig) -> Result<()> {
    tracing::info!(version = env!("CARGO_PKG_VERSION"), data_dir = %cfg.data_dir.display(),
        socket = %cfg.socket.display(), encryption = ?cfg.encryption, "starting ear-sidecar");
    create_data_dir(&cfg.data_dir)?;
    let _dir_lock = lock_data_dir(&cfg.data_dir)?;
    let encryption_on = cfg.encryption == Encryption::On;

    let existing = Registry::load(&cfg.data_dir)?;
    let provider: Option<Box<dyn KeyProvider>> = match &cfg.kms {
        None => None,
        Some(KmsConfig::Local { kek_file }) => {
            let p = LocalProvider::open_or_create(kek_file, existing.is_none())
                .with_context(|| format!("local key-encryption key {}", kek_file.display()))?;
            tracing::warn!(kek_file = %kek_file.display(),
                "using the local key provider: a KEK stored beside the data protects nothing \
                 in production; use --kms aws with a customer-managed key");
            Some(Box::new(p))
        }
        Some(KmsConfig::Aws { .. }) => {
            bail!("the aws key provider is not available in this build yet")
        }
    };
    let registry = match existing {
        Some(r) => {
            r.check_compatible(encryption_on, provider.as_deref())?;
            r
        }
        None => {
            tracing::info!(data_dir = %cfg.data_dir.display(), encryption = encryption_on,
                "initialising a new data directory");
            Registry::create(&cfg.data_dir, encryption_on, provider.as_deref()).await?
        }
    };
    let keys = match &provider {
        Some(p) => {
            let t = std::time::Instant::now();
            let ring = tokio::time::timeout(
                cfg.kms_startup_timeout,
                registry.unwrap_all(p.as_ref(), cfg.key_cache_size.get()),
            )
            .await
            .map_err(|_| {
                anyhow!(
                    "unwrapping the universe key timed out after {:?}",
                    cfg.kms_startup_timeout
                )
            })??;
            tracing::info!(provider = p.kind(), versions = ?ring.snapshot().versions,
                elapsed_ms = t.elapsed().as_millis() as u64, "universe keys unwrapped into memory");
            Some(Arc::new(ring))
        }
        None => None,
    };
    let dir_id: [u8; 16] = hex::decode(registry.dir_id())
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| anyhow!("key registry has a malformed dir_id"))?;

    // An explicit --export list is created/grown; with none, a fresh directory
    // gets the default export and an existing one serves what it has.
    let exports_explicit = !(cfg.exports.len() == 1 && cfg.exports[0].name == "default");
    let specs: Vec<ExportSpec> =
        if exports_explicit || store::existing_exports(&cfg.data_dir)?.is_empty() {
            cfg.exports
                .iter()
                .map(|e| ExportSpec {
                    name: e.name.clone(),
                    size: e.size,
                })
                .collect()
        } else {
            vec![]
        };
    let store = Arc::new(
        tokio::task::block_in_place(|| Store::open(&cfg.data_dir, dir_id, keys.clone(), &specs))
            .context("open exports")?,
    );
    for e in store.exports() {
        tracing::info!(
            export = e.name(),
            size = e.size(),
            encrypted = e.encrypted(),
            "export ready"
        );
    }

    let server_cfg = ServerConfig {
        max_request: cfg.max_request,
        max_connections: cfg.max_connections,
        allow_uids: (!cfg.allow_uids.is_empty()).then(|| cfg.allow_uids.clone()),
        ..ServerConfig::default()
    };
    let health = Arc::new(Health::default());
    // [metrics: start] the metrics/health HTTP listener starts here (before
    // bind, so /livez answers while starting; /readyz waits for `ready`).
    let listener = server::bind(&cfg.socket, cfg.socket_mode)?;
    let shared = Shared::new(Arc::clone(&store), keys, server_cfg, Arc::clone(&health));
    health
        .ready
        .store(true, std::sync::atomic::Ordering::Release);
    tracing::info!(socket = %cfg.socket.display(), "listening");

    server::run(listener, shared, shutdown_signal()).await;

    tokio::task::block_in_place(|| store.flush_all()).context("final flush")?;
    let _ = std::fs::remove_file(&cfg.socket);
    tracing::info!("shut down cleanly");
    Ok(())
}

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

fn status(args: &StatusArgs) -> Result<()> {
    let reg = Registry::load(&args.data_dir)?.ok_or_else(|| {
        anyhow!(
            "{} is not an initialised ear-sidecar data directory (no keys.json)",
            args.data_dir.display()
        )
    })?;
    let exports = store::inspect(&args.data_dir)?;
    let versions: Vec<BTreeMap<&str, u64>> = reg
        .versions()
        .iter()
        .map(|v| {
            BTreeMap::from([
                ("version", u64::from(v.version)),
                ("created_unix", v.created_unix),
            ])
        })
        .collect();
    if args.json {
        let v = serde_json::json!({
            "data_dir": args.data_dir.display().to_string(),
            "dir_id": reg.dir_id(),
            "encryption": if reg.encryption_on() { "on" } else { "off" },
            "provider": reg.provider(),
            "master_key_id": reg.master_key_id(),
            "active_key_version": reg.active_version(),
            "key_versions": versions,
            "exports": exports,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("data directory : {}", args.data_dir.display());
        println!("directory id   : {}", reg.dir_id());
        println!(
            "encryption     : {}",
            if reg.encryption_on() {
                "on (AES-256-CTR)"
            } else {
                "off"
            }
        );
        println!("key provider   : {}", reg.provider().unwrap_or("-"));
        println!("master key     : {}", reg.master_key_id().unwrap_or("-"));
        match reg.active_version() {
            Some(v) => println!(
                "key versions   : {} (active {v})",
                reg.versions()
                    .iter()
                    .map(|v| v.version.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            None => println!("key versions   : -"),
        }
        println!("exports        : {}", exports.len());
        for e in &exports {
            match &e.error {
                None => println!(
                    "  {:<24} {:>16} bytes  {:>14} allocated  {}",
                    e.name, e.size, e.allocated_bytes, e.algorithm
                ),
                Some(err) => println!("  {:<24} unreadable header: {err}", e.name),
            }
        }
    }
    Ok(())
}
