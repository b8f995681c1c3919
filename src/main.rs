//! `ear-sidecar` entry point: parse and validate the whole configuration, load
//! keys, open the store, bind, serve until SIGTERM/SIGINT, drain, flush.
//! Everything of substance lives in the library modules.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;

use ear_sidecar::config::{
    CheckArgs, Cli, Command, Encryption, KmsConfig, LogFormat, ServeConfig, StatusArgs,
    ValidateKeyArgs,
};
use ear_sidecar::keys::aws::{self, AwsKmsOptions, AwsKmsProvider, CheckOutcome, ValidationReport};
use ear_sidecar::keys::local::LocalProvider;
use ear_sidecar::keys::memory;
use ear_sidecar::keys::registry::Registry;
use ear_sidecar::keys::revocation::{watch_master_key, RevocationState};
use ear_sidecar::keys::{KeyError, KeyProvider, MasterKeyState};
use ear_sidecar::server::{self, Health, ServerConfig, Shared};
use ear_sidecar::store::{self, ExportSpec, Store};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => match ServeConfig::from_process_env(&args) {
            Ok(cfg) => serve(cfg, args.epoch_writes),
            Err(e) => {
                eprintln!("ear-sidecar: configuration error: {e}");
                return ExitCode::from(2);
            }
        },
        Command::Status(args) => status(&args),
        Command::ValidateKey(args) => return validate_key_cmd(&args),
        // [check: wire] offline verification and repair.
        Command::Check(args) => return check_cmd(&args),
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

fn serve(cfg: ServeConfig, epoch_writes: Option<u64>) -> Result<()> {
    init_logging(&cfg);
    let rt = runtime()?;
    rt.block_on(serve_async(cfg, epoch_writes))
}

async fn serve_async(cfg: ServeConfig, epoch_writes: Option<u64>) -> Result<()> {
    tracing::info!(version = env!("CARGO_PKG_VERSION"), data_dir = %cfg.data_dir.display(),
        socket = %cfg.socket.display(), encryption = ?cfg.encryption, "starting ear-sidecar");
    create_data_dir(&cfg.data_dir)?;
    let _dir_lock = lock_data_dir(&cfg.data_dir)?;
    // Core dumps off before any key material exists.
    memory::harden_process(false).log();
    let encryption_on = cfg.encryption == Encryption::On;
    // [metrics: start] the metrics/health HTTP listener starts first, so
    // /livez answers while keys are unwrapped; /readyz waits for `ready`.
    let health = Arc::new(Health::default());
    let metrics_layer = match cfg.metrics_addr {
        Some(addr) => Some(
            ear_sidecar::metrics::start(addr, Arc::clone(&health), encryption_on)
                .await
                .context("start the metrics listener (--metrics-addr; empty disables)")?
                .0,
        ),
        None => None,
    };

    let existing = Registry::load(&cfg.data_dir)?;
    if let Some(r) = &existing {
        // The encryption mode is checked before any provider is opened, so a
        // plaintext directory started with encryption on says exactly that.
        if r.encryption_on() != encryption_on {
            r.check_compatible(encryption_on, None)?;
        }
    }
    // With a file-size limit (RLIMIT_FSIZE) a write past it raises SIGXFSZ,
    // whose default action kills the process. Handling the signal turns it into
    // an EFBIG error on that one write (reported to the client as ENOSPC).
    let _sigxfsz = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::from_raw(
        rustix::process::Signal::XFSZ.as_raw(),
    ))
    .context("install the SIGXFSZ handler")?;
    // One deadline bounds all start-up KMS work (reachability, validation,
    // key generation, unwrap), so an unreachable KMS fails start-up in time.
    let startup_deadline = tokio::time::Instant::now() + cfg.kms_startup_timeout;
    let mut aws_provider: Option<Arc<AwsKmsProvider>> = None;
    let provider: Option<Arc<dyn KeyProvider>> = match &cfg.kms {
        None => None,
        Some(KmsConfig::Local { kek_file }) => {
            let p = LocalProvider::open_or_create(kek_file, existing.is_none())
                .with_context(|| format!("local key-encryption key {}", kek_file.display()))?;
            tracing::warn!(kek_file = %kek_file.display(),
                "using the local key provider: a KEK stored beside the data protects nothing \
                 in production; use --kms aws with a customer-managed key");
            Some(Arc::new(p))
        }
        Some(KmsConfig::Aws {
            key_id,
            endpoint,
            region,
        }) => {
            let p = Arc::new(
                AwsKmsProvider::new(&aws_options(key_id, endpoint, region))
                    .await
                    .context("AWS KMS key provider")?,
            );
            tracing::info!(key = %p.master_key_id(), endpoint = p.endpoint(),
                "using the AWS KMS key provider");
            aws_provider = Some(Arc::clone(&p));
            Some(p)
        }
    };
    if let Some(r) = &existing {
        r.check_compatible(encryption_on, provider.as_deref())?;
    }
    if let Some(p) = &aws_provider {
        // Wait (bounded) until KMS answers at all; then a new directory gets
        // the managed service's key checks, an existing one a state check.
        let state = startup_kms_call(
            Some(p.as_ref()),
            startup_deadline,
            cfg.kms_startup_timeout,
            || p.master_key_state(),
        )
        .await
        .context("reach AWS KMS")?;
        if existing.is_none() {
            let left = startup_deadline.saturating_duration_since(tokio::time::Instant::now());
            let report = tokio::time::timeout(left, p.validate())
                .await
                .map_err(|_| {
                    anyhow!(
                        "validating AWS KMS key {} did not finish within the start-up \
                         timeout ({:?}, --kms-startup-timeout)",
                        p.master_key_id(),
                        cfg.kms_startup_timeout
                    )
                })?;
            log_validation(&report);
            if !report.is_ok() {
                bail!(
                    "refusing to initialise data directory {}: {}",
                    cfg.data_dir.display(),
                    validation_failures(&report)
                );
            }
            tracing::info!(key = %p.master_key_id(), "AWS KMS key passed all validation checks");
        } else if let MasterKeyState::Revoked(why) = state {
            bail!(
                "AWS KMS reports master key {} unusable ({why}); refusing to start: \
                 re-enable the key, then restart",
                p.master_key_id()
            );
        }
    }
    let registry = match existing {
        Some(r) => r,
        None => {
            tracing::info!(data_dir = %cfg.data_dir.display(), encryption = encryption_on,
                "initialising a new data directory");
            let dir = cfg.data_dir.clone();
            startup_kms_call(
                aws_provider.as_deref(),
                startup_deadline,
                cfg.kms_startup_timeout,
                || Registry::create(&dir, encryption_on, provider.as_deref()),
            )
            .await
            .context("generate the universe key")?
        }
    };
    let keys = match &provider {
        Some(p) => {
            let t = std::time::Instant::now();
            let ring = startup_kms_call(
                aws_provider.as_deref(),
                startup_deadline,
                cfg.kms_startup_timeout,
                || registry.unwrap_all(p.as_ref(), cfg.key_cache_size.get()),
            )
            .await
            .context("unwrap the universe key")?;
            tracing::info!(provider = p.kind(), versions = ?ring.snapshot().versions,
                elapsed_ms = t.elapsed().as_millis() as u64, "universe keys unwrapped into memory");
            Some(Arc::new(ring))
        }
        None => None,
    };
    if keys.is_some() {
        // Now that the keys are in memory, keep their pages out of swap.
        memory::harden_process(true).log();
    }
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
    // [store: options] the epoch size is a hidden test knob (--epoch-writes).
    let store_opts = store::ExportOptions {
        integrity: if cfg.integrity {
            store::format::Integrity::Gmac
        } else {
            store::format::Integrity::Check
        },
        epoch_writes: epoch_writes.unwrap_or(store::format::MAX_EPOCH_WRITES),
    };
    let store = Arc::new(
        tokio::task::block_in_place(|| {
            Store::open_opts(&cfg.data_dir, dir_id, keys.clone(), &specs, store_opts)
        })
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
    // Master-key revocation state, filled by the watcher spawned below.
    let revocation_state = Arc::new(RevocationState::new());
    // [metrics: wire] per-request series and scrape-time sources.
    if let Some(m) = &metrics_layer {
        m.register_exports(&store);
        if let Some(k) = &keys {
            m.set_key_ring(Arc::clone(k));
            m.set_revocation(Arc::clone(&revocation_state));
        }
        if let Some(p) = &aws_provider {
            m.set_kms_stats(p.stats());
        }
    }
    let listener = server::bind(&cfg.socket, cfg.socket_mode)?;
    let shared = Shared::new(
        Arc::clone(&store),
        keys.clone(),
        server_cfg,
        Arc::clone(&health),
    );
    health
        .ready
        .store(true, std::sync::atomic::Ordering::Release);
    tracing::info!(socket = %cfg.socket.display(), "listening");
    let (stop_watcher, watcher_stopped) = tokio::sync::oneshot::channel::<()>();
    let watcher = spawn_revocation_watcher(
        &cfg,
        provider.clone(),
        keys,
        Arc::clone(&revocation_state),
        Arc::clone(&health),
        async {
            let _ = watcher_stopped.await;
        },
    );

    server::run(listener, shared, shutdown_signal()).await;
    let _ = stop_watcher.send(());
    if let Some(w) = watcher {
        let _ = w.await;
    }

    // [store: close] flush, then mark every export closed cleanly.
    tokio::task::block_in_place(|| store.close()).context("final flush")?;
    let _ = std::fs::remove_file(&cfg.socket);
    tracing::info!("shut down cleanly");
    Ok(())
}

/// Options for the AWS provider from the resolved configuration; timeouts
/// and retries keep the provider's defaults.
fn aws_options(key_id: &str, endpoint: &Option<String>, region: &Option<String>) -> AwsKmsOptions {
    let mut o = AwsKmsOptions::new(key_id);
    o.endpoint = endpoint.clone();
    o.region = region.clone();
    o
}

/// Runs one start-up key-provider call before `deadline`. With AWS KMS,
/// transient failures (unreachable, throttled) are retried until the deadline
/// ([`aws::with_startup_deadline`]); other providers get a plain timeout.
async fn startup_kms_call<T, F, Fut>(
    aws_provider: Option<&AwsKmsProvider>,
    deadline: tokio::time::Instant,
    total: Duration,
    mut op: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, KeyError>>,
{
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    match aws_provider {
        Some(p) => aws::with_startup_deadline(p.endpoint(), left, op)
            .await
            .map_err(|e| match e {
                KeyError::Unavailable(_) => {
                    anyhow!("{e}; giving up (start-up timeout {total:?}, --kms-startup-timeout)")
                }
                other => anyhow!(other),
            }),
        None => tokio::time::timeout(left, op())
            .await
            .map_err(|_| anyhow!("the key provider did not answer within {total:?}"))?
            .map_err(|e| anyhow!(e)),
    }
}

/// Logs each validation check (error level for failures).
fn log_validation(report: &ValidationReport) {
    for c in &report.checks {
        match &c.outcome {
            CheckOutcome::Passed(note) => tracing::info!(check = c.name, %note, "key check passed"),
            CheckOutcome::Failed(msg) => tracing::error!(check = c.name, %msg, "key check FAILED"),
            CheckOutcome::Skipped(why) => tracing::warn!(check = c.name, %why, "key check skipped"),
        }
    }
}

/// One message naming every failed (or skipped) check.
fn validation_failures(report: &ValidationReport) -> String {
    let mut out = format!(
        "AWS KMS key {} failed validation ({} check(s) failed):",
        report.key_arn,
        report.failures().len()
    );
    for c in &report.checks {
        match &c.outcome {
            CheckOutcome::Failed(m) => out.push_str(&format!("\n  FAIL  {}: {m}", c.name)),
            CheckOutcome::Skipped(w) => out.push_str(&format!("\n  skip  {}: {w}", c.name)),
            CheckOutcome::Passed(_) => {}
        }
    }
    out
}

/// Spawns the master-key revocation watcher when keys are in memory. When it
/// fails closed (keys wiped, I/O answered with EIO), readiness is withdrawn.
fn spawn_revocation_watcher(
    cfg: &ServeConfig,
    provider: Option<Arc<dyn KeyProvider>>,
    keys: Option<Arc<ear_sidecar::crypto::KeyRing>>,
    state: Arc<RevocationState>,
    health: Arc<Health>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Option<tokio::task::JoinHandle<()>> {
    let (provider, ring) = (provider?, keys?);
    let (interval, grace) = (cfg.kms_check_interval, cfg.kms_revocation_grace);
    tracing::info!(
        interval_secs = interval.as_secs_f64(),
        grace_secs = grace.as_secs_f64(),
        "master key revocation check running"
    );
    Some(tokio::spawn(async move {
        watch_master_key(
            provider,
            ring,
            interval,
            grace,
            Arc::clone(&state),
            shutdown,
        )
        .await;
        if state.is_failed_closed() {
            health
                .ready
                .store(false, std::sync::atomic::Ordering::Release);
            tracing::error!("not ready: the keys were wiped (failed closed); restart after re-enabling the master key");
        }
    }))
}

/// `validate-key`: the managed service's key checks, no data directory.
/// Exit 0 when the key is usable, 1 when a check fails, 2 on bad options.
fn validate_key_cmd(args: &ValidateKeyArgs) -> ExitCode {
    {
        use tracing_subscriber::EnvFilter;
        let filter = std::env::var("RUST_LOG")
            .ok()
            .and_then(|v| EnvFilter::try_new(v).ok())
            .unwrap_or_else(|| EnvFilter::new("error"));
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
    let (key_id, endpoint, region) = match args.kms_config() {
        Ok(KmsConfig::Aws {
            key_id,
            endpoint,
            region,
        }) => (key_id, endpoint, region),
        Ok(KmsConfig::Local { .. }) => {
            eprintln!("ear-sidecar: configuration error: validate-key checks AWS KMS keys only");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("ear-sidecar: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let opts = aws_options(&key_id, &endpoint, &region);
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ear-sidecar: error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let timeout = args.kms_startup_timeout;
    match rt.block_on(async { tokio::time::timeout(timeout, aws::validate_key(&opts)).await }) {
        Ok(report) => {
            println!("{report}");
            if report.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(_) => {
            eprintln!(
                "ear-sidecar: error: AWS KMS did not finish the key checks within {timeout:?} \
                 (--kms-startup-timeout)"
            );
            ExitCode::FAILURE
        }
    }
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

// [check: command] `ear-sidecar check`: the logic is in `store::check`.

/// Unwraps the data directory's keys for `check` with the provider its
/// registry names (none for a plaintext directory).
async fn check_keys(
    args: &CheckArgs,
    reg: &Registry,
) -> Result<Option<Arc<ear_sidecar::crypto::KeyRing>>> {
    if !reg.encryption_on() {
        return Ok(None);
    }
    let provider: Arc<dyn KeyProvider> = match reg.provider() {
        Some("local") => {
            let kek = args
                .local_kek_file
                .clone()
                .unwrap_or_else(|| args.data_dir.join("local.kek"));
            Arc::new(
                LocalProvider::open_or_create(&kek, false)
                    .with_context(|| format!("local key-encryption key {}", kek.display()))?,
            )
        }
        Some("aws") => {
            let key_id = reg
                .master_key_id()
                .ok_or_else(|| anyhow!("the key registry names no AWS KMS key"))?;
            Arc::new(
                AwsKmsProvider::new(&aws_options(key_id, &args.kms_endpoint, &args.kms_region))
                    .await
                    .context("AWS KMS key provider")?,
            )
        }
        other => bail!("the key registry names an unknown key provider {other:?}"),
    };
    let ring = reg
        .unwrap_all(provider.as_ref(), 64)
        .await
        .context("unwrap the universe key")?;
    Ok(Some(Arc::new(ring)))
}

fn check_cmd(args: &CheckArgs) -> ExitCode {
    match check_run(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("ear-sidecar: check: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Returns whether every checked export is free of damage.
fn check_run(args: &CheckArgs) -> Result<bool> {
    use std::io::IsTerminal;
    if !args.data_dir.is_dir() {
        bail!("{} is not a directory", args.data_dir.display());
    }
    let _lock = lock_data_dir(&args.data_dir).map_err(|e| {
        if e.to_string().contains("in use") {
            anyhow!(
                "data directory {} is in use by a running ear-sidecar: stop it first (check works offline)",
                args.data_dir.display()
            )
        } else {
            e
        }
    })?;
    let reg = Registry::load(&args.data_dir)?.ok_or_else(|| {
        anyhow!(
            "{} is not an initialised ear-sidecar data directory (no keys.json)",
            args.data_dir.display()
        )
    })?;
    let dir_id: [u8; 16] = hex::decode(reg.dir_id())
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| anyhow!("key registry has a malformed dir_id"))?;
    let keys = runtime()?.block_on(check_keys(args, &reg))?;
    let names = match &args.export {
        Some(n) => vec![n.clone()],
        None => store::existing_exports(&args.data_dir)?,
    };
    if let Some(n) = &args.export {
        if !store::existing_exports(&args.data_dir)?.contains(n) {
            bail!("no export {n:?} in {}", args.data_dir.display());
        }
    }
    let bar_on = !args.json && std::io::stderr().is_terminal();
    let mut log = store::check::RepairLog::new(&args.data_dir);
    let mut reports = vec![];
    for name in &names {
        let bar = if bar_on {
            let b = indicatif::ProgressBar::new(0);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg:<20} [{bar:40}] {pos}/{len} groups {elapsed}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b.set_message(name.clone());
            Some(b)
        } else {
            None
        };
        let r = store::check::check_export(
            &args.data_dir,
            name,
            dir_id,
            keys.clone(),
            args.repair,
            &mut log,
            &mut |done, total| {
                if let Some(b) = &bar {
                    b.set_length(total);
                    b.set_position(done);
                }
            },
        );
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        if !args.json {
            println!("{}", r.summary());
        }
        reports.push(r);
    }
    let clean = reports.iter().all(|r| !r.damaged());
    if args.json {
        let v = serde_json::json!({
            "data_dir": args.data_dir.display().to_string(),
            "repair": args.repair,
            "repair_record": args.repair.then(|| log.path().display().to_string()),
            "damaged": !clean,
            "exports": reports,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else if args.repair && log.path().exists() {
        println!("repair record: {}", log.path().display());
    }
    Ok(clean)
}
