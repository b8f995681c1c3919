//! The serving process, assembled: [`App::start`] does everything that can
//! fail before the socket exists (data-directory lock, key provider, key
//! registry, universe-key unwrap, store, admin listener, bind), and
//! [`App::run`] serves until a shutdown future resolves, then drains and
//! flushes. The `status` and `validate-key` commands live in [`commands`].
//!
//! The top of the library: it wires the layers together and is the only
//! place besides `main` that uses `anyhow`.

pub mod backup;
pub mod check;
pub mod commands;
pub mod control;
pub mod keys;
pub mod keys_encrypt;
pub mod keys_wrap;
pub mod report;

use std::fs::File;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tokio::net::UnixListener;

use crate::admin::Metrics;
use crate::config::{Encryption, KmsConfig, LogFormat, ServeConfig};
use crate::crypto::KeyRing;
use crate::health::Health;
use crate::keys::aws::{self, AwsKmsOptions, AwsKmsProvider, CheckOutcome, ValidationReport};
use crate::keys::local::LocalProvider;
use crate::keys::memory;
use crate::keys::registry::Registry;
use crate::keys::revocation::{watch_key, Canary, RevocationState, WatchedKey};
use crate::keys::{with_deadline, DeadlineError, KeyError, KeyProvider, MasterKeyState};
use crate::server::observe::RequestMetrics;
use crate::server::{self, ServerConfig, Shared};
use crate::store::{self, Store};

/// A started sidecar: keys in memory, exports open, socket bound.
pub struct App {
    cfg: ServeConfig,
    _dir_lock: File,
    _sigxfsz: tokio::signal::unix::Signal,
    health: Arc<Health>,
    store: Arc<Store>,
    shared: Arc<Shared>,
    listener: UnixListener,
    control: Option<UnixListener>,
    watched: Option<Arc<WatchedKey>>,
    keys: Option<Arc<KeyRing>>,
    /// The metrics layer (`None` when `--metrics-addr` is empty).
    metrics: Option<Arc<Metrics>>,
    /// The keys as they are now (`keys encrypt` sets them on a sidecar
    /// started with encryption off).
    live: Arc<control::LiveKeys>,
    registry_lock: Arc<tokio::sync::Mutex<()>>,
    revocation: Arc<RevocationState>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("socket", &self.cfg.socket)
            .finish_non_exhaustive()
    }
}

/// One deadline for all start-up key-provider work.
struct Startup<'a> {
    aws: Option<&'a AwsKmsProvider>,
    end: tokio::time::Instant,
    total: Duration,
}

impl Startup<'_> {
    /// Runs one start-up key-provider call before the deadline; transient
    /// failures (unreachable, throttled) are retried until then.
    async fn call<T, F, Fut>(&self, op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, KeyError>>,
    {
        let total = self.total;
        let left = self
            .end
            .saturating_duration_since(tokio::time::Instant::now());
        match self.aws {
            Some(p) => aws::with_startup_deadline(p.endpoint(), left, op)
                .await
                .map_err(|e| match e {
                    KeyError::Unavailable(_) => anyhow!(
                        "{e}; giving up (start-up timeout {total:?}, --kms-startup-timeout)"
                    ),
                    other => anyhow!(other),
                }),
            None => with_deadline(self.end, op).await.map_err(|e| match e {
                DeadlineError::Failed(e) => anyhow!(e),
                DeadlineError::TimedOut { .. } => {
                    anyhow!("the key provider did not answer within {total:?}")
                }
            }),
        }
    }
}

impl App {
    /// Loads everything the server needs and binds the socket. Fails with a
    /// one-line reason before anything is served.
    pub async fn start(cfg: ServeConfig) -> Result<App> {
        tracing::info!(version = env!("CARGO_PKG_VERSION"), data_dir = %cfg.data_dir.display(),
            socket = %cfg.socket.display(), encryption = ?cfg.encryption, "starting ear-sidecar");
        preflight_paths(&cfg)?;
        create_data_dir(&cfg.data_dir)?;
        let dir_lock = lock_data_dir(&cfg.data_dir)?;
        // Core dumps off before any key material exists.
        memory::harden_process().log();
        let encryption_on = cfg.encryption == Encryption::On;
        // The admin listener starts first, so /livez answers while keys are
        // unwrapped; /readyz waits for `ready`.
        let health = Arc::new(Health::default());
        let metrics = match cfg.metrics_addr {
            Some(addr) => Some(
                crate::admin::start(addr, Arc::clone(&health), encryption_on)
                    .await
                    .context("start the metrics listener (--metrics-addr; empty disables)")?
                    .0,
            ),
            None => None,
        };

        let existing = Registry::load(&cfg.data_dir)?;
        match &existing {
            // The encryption mode and the provider are checked before any
            // provider is opened, so a mismatch says exactly that.
            Some(r) => {
                if r.encryption_on() != encryption_on {
                    r.check_compatible(encryption_on, None)?;
                }
                check_provider_kind(&cfg, r)?;
            }
            None => refuse_orphan_exports(&cfg.data_dir)?,
        }
        // With a file-size limit (RLIMIT_FSIZE) a write past it raises SIGXFSZ,
        // whose default action kills the process. Handling the signal turns it
        // into an EFBIG error on that one write (reported to the client as ENOSPC).
        let sigxfsz = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::from_raw(
            rustix::process::Signal::XFSZ.as_raw(),
        ))
        .context("install the SIGXFSZ handler")?;
        let (provider, aws_provider) = open_provider(&cfg, existing.is_none()).await?;
        let startup = Startup {
            aws: aws_provider.as_deref(),
            end: tokio::time::Instant::now() + cfg.kms_startup_timeout,
            total: cfg.kms_startup_timeout,
        };
        if let Some(r) = &existing {
            r.check_compatible(encryption_on, provider.as_deref())?;
        }
        if let Some(p) = &aws_provider {
            check_aws_key(&cfg, p, &startup, existing.is_none()).await?;
        }
        let mut registry = match existing {
            Some(r) => r,
            None => {
                tracing::info!(data_dir = %cfg.data_dir.display(), encryption = encryption_on,
                    "initialising a new data directory");
                let dir = cfg.data_dir.clone();
                startup
                    .call(|| Registry::create(&dir, encryption_on, provider.as_deref()))
                    .await
                    .context("generate the universe key")?
            }
        };
        let keys = match &provider {
            Some(p) => {
                let t = std::time::Instant::now();
                let ring = startup
                    .call(|| registry.unwrap_all(p.as_ref(), cfg.key_cache_size.get()))
                    .await
                    .context("unwrap the universe key")?;
                tracing::info!(provider = p.kind(), versions = ?ring.snapshot().versions,
                    elapsed_ms = t.elapsed().as_millis() as u64, "universe keys unwrapped into memory");
                Some(Arc::new(ring))
            }
            None => None,
        };
        check_header_versions(&cfg.data_dir, &registry)?;
        let store = Arc::new(open_store(&cfg, &registry, keys.clone())?);
        // `unwrap_all` verified the MACs; a registry from before sealing
        // existed gets them now, once, after the export headers have
        // authenticated under its keys.
        if let Some(ring) = keys.as_deref().filter(|_| !registry.is_sealed()) {
            registry.save(Some(ring)).context("seal the key registry")?;
            tracing::info!(registry = %registry.path().display(),
                "key registry sealed with a MAC (first start with registry integrity)");
        }

        // Master-key revocation state, filled by the watcher `run` spawns;
        // the canary it unwraps is the active version's wrapped key.
        let revocation = Arc::new(RevocationState::new());
        let watched = provider
            .as_ref()
            .map(|p| Arc::new(WatchedKey::new(Arc::clone(p), Canary::active_of(&registry))));
        // One lock for every writer of keys.json (rotation, retirement,
        // rewrap), shared by the admin socket and the rotation schedule.
        let registry_lock = Arc::new(tokio::sync::Mutex::new(()));
        let key_ops = match (&watched, &keys) {
            (Some(w), Some(ring)) => {
                let sweeper = store::sweep::Sweeper::start(
                    &store,
                    Arc::clone(ring),
                    &cfg.data_dir,
                    cfg.rotation.reencrypt_bytes_per_sec,
                );
                Some(Arc::new(keys::KeyOps::new(
                    &cfg.data_dir,
                    &registry,
                    Arc::clone(&registry_lock),
                    Arc::clone(w),
                    Arc::clone(ring),
                    Arc::clone(&store),
                    sweeper,
                )))
            }
            _ => None,
        };
        if let Some(k) = &keys {
            health.watch_key_ring(Arc::clone(k));
            health.watch_revocation(Arc::clone(&revocation));
        }
        let request_metrics = match &metrics {
            Some(m) => {
                wire_metrics(m, keys.as_ref(), &revocation, aws_provider.as_deref());
                let rm = m.request_metrics(&store);
                if let Some(ops) = &key_ops {
                    m.set_sweeper(ops.sweeper().clone());
                }
                rm
            }
            None => RequestMetrics::default(),
        };
        let server_cfg = ServerConfig {
            max_request: cfg.max_request,
            max_connections: cfg.max_connections,
            allow_uids: (!cfg.allow_uids.is_empty()).then(|| cfg.allow_uids.clone()),
            ..ServerConfig::default()
        };
        let listener = server::bind(&cfg.socket, cfg.socket_mode)?;
        // The admin socket is owner-only whatever --socket-mode says.
        let control = match &cfg.admin_socket {
            Some(path) => Some(crate::control::bind(path, 0o600).with_context(|| {
                "bind the admin socket (--admin-socket PATH; empty disables)".to_string()
            })?),
            None => None,
        };
        let shared = Shared::new(
            Arc::clone(&store),
            server_cfg,
            Arc::clone(&health),
            request_metrics,
        );
        Ok(App {
            cfg,
            _dir_lock: dir_lock,
            _sigxfsz: sigxfsz,
            health,
            store,
            shared,
            listener,
            control,
            metrics,
            live: Arc::new(control::LiveKeys::new(
                keys.clone(),
                key_ops,
                watched.clone(),
            )),
            watched,
            keys,
            registry_lock,
            revocation,
        })
    }

    /// Serves until `shutdown` resolves, drains in-flight requests, stops the
    /// revocation watcher and flushes every export.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        self.health
            .ready
            .store(true, std::sync::atomic::Ordering::Release);
        tracing::info!(socket = %self.cfg.socket.display(), "listening");
        let (stop_watcher, watcher_stopped) = tokio::sync::oneshot::channel::<()>();
        let watcher = spawn_revocation_watcher(
            &self.cfg,
            self.watched.clone(),
            self.keys.clone(),
            Arc::clone(&self.revocation),
            Arc::clone(&self.health),
            async {
                let _ = watcher_stopped.await;
            },
        );
        let (stop_control, control_stopped) = tokio::sync::oneshot::channel::<()>();
        let (stop_schedules, schedules_stopped) = tokio::sync::watch::channel(false);
        // A watcher `keys encrypt` starts later stops with the others.
        let (stop_late_watcher, _) = tokio::sync::watch::channel(false);
        let late_watchers: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let control = self.control.map(|listener| {
            let plane = control::ControlPlane {
                data_dir: self.cfg.data_dir.clone(),
                store: Arc::clone(&self.store),
                live: Arc::clone(&self.live),
                reencrypt_rate: self.cfg.rotation.reencrypt_bytes_per_sec,
                key_cache_size: self.cfg.key_cache_size.get(),
                on_encrypted: Some(on_encrypted(
                    &self.cfg,
                    Arc::clone(&self.revocation),
                    Arc::clone(&self.health),
                    stop_late_watcher.subscribe(),
                    Arc::clone(&late_watchers),
                    self.metrics.clone(),
                    schedules_stopped.clone(),
                )),
                kms_endpoint: match &self.cfg.kms {
                    Some(KmsConfig::Aws { endpoint, .. }) => endpoint.clone(),
                    _ => None,
                },
                registry_lock: Arc::clone(&self.registry_lock),
            };
            let cfg = crate::control::ControlConfig {
                allow_uids: (!self.cfg.allow_uids.is_empty()).then(|| self.cfg.allow_uids.clone()),
            };
            if let Some(p) = &self.cfg.admin_socket {
                tracing::info!(admin_socket = %p.display(), "admin socket listening");
            }
            tokio::spawn(crate::control::run(listener, cfg, Arc::new(plane), async {
                let _ = control_stopped.await;
            }))
        });
        if let Some(ops) = self.live.key_ops.get() {
            ops.spawn_schedules(
                self.cfg.rotation.rotate_every,
                self.cfg.rotation.retire_after_sweep,
                schedules_stopped,
            );
        }
        server::run(self.listener, self.shared, shutdown).await;
        let _ = stop_schedules.send(true);
        if let Some(ops) = self.live.key_ops.get() {
            // The sweep stops (cursor saved) before the exports are closed.
            tokio::task::block_in_place(|| ops.sweeper().stop());
        }
        let _ = stop_control.send(());
        if let Some(c) = control {
            let _ = c.await;
        }
        if let Some(p) = &self.cfg.admin_socket {
            let _ = std::fs::remove_file(p);
        }
        let _ = stop_watcher.send(());
        if let Some(w) = watcher {
            let _ = w.await;
        }
        let _ = stop_late_watcher.send(true);
        let late: Vec<_> =
            std::mem::take(&mut *late_watchers.lock().unwrap_or_else(|p| p.into_inner()));
        for w in late {
            let _ = w.await;
        }
        let store = self.store;
        // Flush, then mark every export closed cleanly.
        tokio::task::block_in_place(|| store.close()).context("final flush")?;
        let _ = std::fs::remove_file(&self.cfg.socket);
        tracing::info!("shut down cleanly");
        Ok(())
    }
}

/// Opens the configured key provider; the second value is the same provider
/// when it is AWS KMS (for its deadline handling, checks and call counters).
async fn open_provider(
    cfg: &ServeConfig,
    new_dir: bool,
) -> Result<(Option<Arc<dyn KeyProvider>>, Option<Arc<AwsKmsProvider>>)> {
    match &cfg.kms {
        None => Ok((None, None)),
        Some(KmsConfig::Local { kek_file }) => {
            if new_dir && !kek_file.exists() {
                if let Some(dir) = kek_file.parent().filter(|d| !d.as_os_str().is_empty()) {
                    use std::os::unix::fs::DirBuilderExt;
                    std::fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o700)
                        .create(dir)
                        .with_context(|| format!("create the KEK's directory {}", dir.display()))?;
                }
            }
            let p = LocalProvider::open_or_create(kek_file, new_dir)
                .with_context(|| format!("local key-encryption key {}", kek_file.display()))?;
            if crate::config::path_is_within(kek_file, &cfg.data_dir) {
                tracing::warn!(kek_file = %kek_file.display(),
                    "the local KEK is stored inside the data directory: a copy of the volume \
                     carries its own key, so this protects nothing");
            } else {
                tracing::info!(kek_file = %kek_file.display(),
                    "using the local key provider (trials): keep the KEK off the data volume, \
                     and use --kms aws with a customer-managed key in production");
            }
            Ok((Some(Arc::new(p)), None))
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
            let dyn_p: Arc<dyn KeyProvider> = p.clone();
            Ok((Some(dyn_p), Some(p)))
        }
    }
}

/// Waits (bounded) until KMS answers at all; then a new directory gets the
/// managed service's key checks, an existing one a state check.
async fn check_aws_key(
    cfg: &ServeConfig,
    p: &AwsKmsProvider,
    startup: &Startup<'_>,
    new_dir: bool,
) -> Result<()> {
    let state = startup
        .call(|| p.master_key_state())
        .await
        .context("reach AWS KMS")?;
    if new_dir {
        let left = startup
            .end
            .saturating_duration_since(tokio::time::Instant::now());
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
    Ok(())
}

/// Opens the exports. An explicit --export list is created/grown, in a fresh
/// or an existing directory; with none, a fresh directory gets the default
/// export and an existing one serves what it has.
fn open_store(cfg: &ServeConfig, registry: &Registry, keys: Option<Arc<KeyRing>>) -> Result<Store> {
    let dir_id = registry.dir_id_bytes()?;
    let specs = cfg.exports.resolve(&cfg.data_dir)?;
    // The epoch size is a hidden test knob (--epoch-writes).
    let mut opts = store::ExportOptions::with_integrity(cfg.integrity);
    if let Some(n) = cfg.epoch_writes {
        opts.epoch_writes = n;
    }
    let store =
        tokio::task::block_in_place(|| Store::open_opts(&cfg.data_dir, dir_id, keys, &specs, opts))
            .context("open exports")?;
    for e in store.exports() {
        tracing::info!(
            export = e.name(),
            size = e.size(),
            encrypted = e.encrypted(),
            "export ready"
        );
    }
    Ok(store)
}

/// Plugs the scrape-time sources into the metrics layer.
fn wire_metrics(
    m: &Metrics,
    keys: Option<&Arc<KeyRing>>,
    revocation: &Arc<RevocationState>,
    aws: Option<&AwsKmsProvider>,
) {
    if let Some(k) = keys {
        m.set_key_ring(Arc::clone(k));
        m.set_revocation(Arc::clone(revocation));
    }
    if let Some(p) = aws {
        m.set_kms_stats(p.stats());
    }
}

/// Locks a data directory for an offline command. A directory held by a
/// running sidecar is refused in one line ending with `online_hint`, which
/// says how to reach that sidecar instead.
pub(crate) fn lock_offline(dir: &Path, online_hint: &str) -> Result<File> {
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    lock_data_dir(dir).map_err(|e| {
        if e.to_string().contains("in use") {
            anyhow!(
                "data directory {} is in use by a running ear-sidecar: {online_hint}",
                dir.display()
            )
        } else {
            e
        }
    })
}

/// The key registry of an initialised data directory.
pub(crate) fn load_registry(dir: &Path) -> Result<Registry> {
    Registry::load(dir)?.ok_or_else(|| {
        anyhow!(
            "{} is not an initialised ear-sidecar data directory (no keys.json)",
            dir.display()
        )
    })
}

/// Holds an exclusive lock on the data directory for the process lifetime, so
/// two sidecars can never write one store.
pub(crate) fn lock_data_dir(dir: &Path) -> Result<File> {
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

/// Checks every path the server will create or use before anything is
/// created, so a typo fails with one line and leaves nothing behind.
fn preflight_paths(cfg: &ServeConfig) -> Result<()> {
    let dir = &cfg.data_dir;
    if dir.exists() && !dir.is_dir() {
        bail!(
            "--data-dir {} is not a directory (it is a file); point --data-dir at a directory",
            dir.display()
        );
    }
    let parent_of = |p: &Path| match p.parent() {
        Some(d) if d.as_os_str().is_empty() => Path::new(".").to_path_buf(),
        Some(d) => d.to_path_buf(),
        None => Path::new("/").to_path_buf(),
    };
    let sock_dir = parent_of(&cfg.socket);
    if !sock_dir.is_dir() {
        bail!(
            "--socket {}: directory {} does not exist; create it or choose another socket path",
            cfg.socket.display(),
            sock_dir.display()
        );
    }
    if let Some(admin) = &cfg.admin_socket {
        if admin == &cfg.socket {
            bail!(
                "--admin-socket {} is the data socket; give the admin socket its own path \
                 (or an empty value to disable it)",
                admin.display()
            );
        }
        let admin_dir = parent_of(admin);
        if !admin_dir.is_dir() {
            bail!(
                "--admin-socket {}: directory {} does not exist; create it or choose another path",
                admin.display(),
                admin_dir.display()
            );
        }
    }
    Ok(())
}

/// Refuses a data directory whose registry names another key provider than
/// the one configured, naming the options that open it.
fn check_provider_kind(cfg: &ServeConfig, r: &Registry) -> Result<()> {
    let configured = match &cfg.kms {
        Some(KmsConfig::Local { .. }) => "local",
        Some(KmsConfig::Aws { .. }) => "aws",
        None => return Ok(()),
    };
    match r.provider() {
        Some("aws") if configured != "aws" => bail!(
            "data directory {} uses provider aws (key {}); pass --kms aws --kms-key-id {} \
             (if keys.json was edited, restore it from backup)",
            cfg.data_dir.display(),
            r.master_key_id().unwrap_or("?"),
            r.master_key_id().unwrap_or("ARN")
        ),
        Some("local") if configured != "local" => bail!(
            "data directory {} uses provider local; pass --kms local --local-kek-file PATH \
             (to move it to AWS KMS, rewrap its keys first: keys rewrap --kms aws; if keys.json \
             was edited, restore it from backup)",
            cfg.data_dir.display()
        ),
        _ => Ok(()),
    }
}

/// Refuses to serve when an export's header names a key version the registry
/// does not hold: the registry lost a version that data still uses (edited,
/// or replaced by an older copy), and that data could never be read.
fn check_header_versions(dir: &Path, registry: &Registry) -> Result<()> {
    if !registry.encryption_on() {
        return Ok(());
    }
    let held: Vec<u32> = registry.versions().iter().map(|v| v.version).collect();
    for e in store::inspect(dir)? {
        if e.error.is_none() && e.header_key_version != 0 && !held.contains(&e.header_key_version) {
            bail!(
                "export {} is under key version {}, which the key registry {} does not hold \
                 (it holds {:?}): keys.json was edited or replaced by an older copy; restore \
                 the keys.json that belongs to this data",
                e.name,
                e.header_key_version,
                registry.path().display(),
                held
            );
        }
    }
    Ok(())
}

/// Refuses to create a key registry beside existing exports: their headers
/// are bound to the lost registry's keys, so a new one could never open them.
fn refuse_orphan_exports(dir: &Path) -> Result<()> {
    let exports = store::existing_exports(dir)?;
    if !exports.is_empty() {
        bail!(
            "data directory {} has {} export(s) ({}) but no key registry keys.json: restore \
             keys.json from backup; a new registry is never created over existing exports",
            dir.display(),
            exports.len(),
            exports.join(", ")
        );
    }
    Ok(())
}

fn create_data_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("create data directory {}", dir.display()))
}

/// Options for the AWS provider from the resolved configuration; timeouts
/// and retries keep the provider's defaults.
pub fn aws_options(
    key_id: &str,
    endpoint: &Option<String>,
    region: &Option<String>,
) -> AwsKmsOptions {
    let mut o = AwsKmsOptions::new(key_id);
    o.endpoint = endpoint.clone();
    o.region = region.clone();
    o
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
    watched: Option<Arc<WatchedKey>>,
    keys: Option<Arc<KeyRing>>,
    state: Arc<RevocationState>,
    health: Arc<Health>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Option<tokio::task::JoinHandle<()>> {
    // Only a KMS key can be disabled or revoked behind the sidecar's back; a
    // local KEK file has no such state, so nothing is watched for it.
    if !matches!(cfg.kms, Some(KmsConfig::Aws { .. })) {
        return None;
    }
    let (watched, ring) = (watched?, keys?);
    let (interval, grace) = (cfg.kms_check_interval, cfg.kms_revocation_grace);
    tracing::info!(
        interval_secs = interval.as_secs_f64(),
        grace_secs = grace.as_secs_f64(),
        "master key revocation check running"
    );
    Some(tokio::spawn(async move {
        watch_key(watched, ring, interval, grace, Arc::clone(&state), shutdown).await;
        if state.is_failed_closed() {
            health
                .ready
                .store(false, std::sync::atomic::Ordering::Release);
            tracing::error!("not ready: the keys were wiped (failed closed); restart after re-enabling the master key");
        }
    }))
}

/// What a sidecar started with encryption off does once `keys encrypt` has
/// given it keys, as at an encrypted start-up: the rotation schedules
/// (`--rotate-every`, `--retire-after-sweep`) start, health and metrics
/// watch the ring and the sweep, and for an AWS KMS master key the
/// revocation watcher (with its canary) starts.
fn on_encrypted(
    cfg: &ServeConfig,
    state: Arc<RevocationState>,
    health: Arc<Health>,
    stop: tokio::sync::watch::Receiver<bool>,
    handles: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    metrics: Option<Arc<Metrics>>,
    stop_schedules: tokio::sync::watch::Receiver<bool>,
) -> control::OnEncrypted {
    let (interval, grace) = (cfg.kms_check_interval, cfg.kms_revocation_grace);
    let (rotate_every, retire_after_sweep) =
        (cfg.rotation.rotate_every, cfg.rotation.retire_after_sweep);
    Arc::new(
        move |watched: &Arc<WatchedKey>, ring: &Arc<KeyRing>, ops: &Arc<keys::KeyOps>, kms| {
            ops.spawn_schedules(rotate_every, retire_after_sweep, stop_schedules.clone());
            let sweeper = ops.sweeper();
            health.watch_key_ring(Arc::clone(ring));
            health.watch_revocation(Arc::clone(&state));
            if let Some(m) = &metrics {
                m.set_encryption_on();
                m.set_key_ring(Arc::clone(ring));
                m.set_revocation(Arc::clone(&state));
                m.set_sweeper(sweeper.clone());
                if let Some(stats) = kms {
                    m.set_kms_stats(stats);
                }
            }
            if watched.current().provider.kind() != "aws" {
                return;
            }
            tracing::info!(
                interval_secs = interval.as_secs_f64(),
                grace_secs = grace.as_secs_f64(),
                "master key revocation check running"
            );
            let (watched, ring, state, health) = (
                Arc::clone(watched),
                Arc::clone(ring),
                Arc::clone(&state),
                Arc::clone(&health),
            );
            let mut stop = stop.clone();
            let h = tokio::spawn(async move {
                let shutdown = async move {
                    let _ = stop.wait_for(|s| *s).await;
                };
                watch_key(watched, ring, interval, grace, Arc::clone(&state), shutdown).await;
                if state.is_failed_closed() {
                    health
                        .ready
                        .store(false, std::sync::atomic::Ordering::Release);
                    tracing::error!("not ready: the keys were wiped (failed closed); restart after re-enabling the master key");
                }
            });
            handles.lock().unwrap_or_else(|p| p.into_inner()).push(h);
        },
    )
}

/// Installs the log subscriber: `RUST_LOG` when set and valid, else `level`.
pub fn init_logging(level: &str, format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| EnvFilter::new(level));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// An error and its causes on one line, each cause once: layers whose
/// message already quotes their source (`"{what}: {source}"`) would
/// otherwise print the OS error twice.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// The async runtime of the process.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Blocking pool for file I/O: in-flight work is bounded by the server,
        // and a modest cap keeps thread count (and RSS) in check.
        .max_blocking_threads(64)
        .thread_name("ear-worker")
        .build()
        .context("start the async runtime")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn an_export_under_a_version_the_registry_lacks_is_refused() {
        use crate::crypto::SecretKey;
        use crate::store::{ExportName, ExportSpec};
        use std::collections::BTreeMap;
        let keys = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        let p = LocalProvider::open_or_create(&keys.path().join("kek"), true).unwrap();
        let reg = Registry::create(data.path(), true, Some(&p)).await.unwrap();
        let dir_id: [u8; 16] = hex::decode(reg.dir_id()).unwrap().try_into().unwrap();
        check_header_versions(data.path(), &reg).unwrap();
        // An export written under version 2, which this registry does not hold.
        let ring =
            KeyRing::new(BTreeMap::from([(2, SecretKey::generate().unwrap())]), 2, 8).unwrap();
        let spec = ExportSpec::new(ExportName::parse("db").unwrap(), 1 << 20).unwrap();
        let store = Store::open(data.path(), dir_id, Some(Arc::new(ring)), &[spec]).unwrap();
        store.close().unwrap();
        drop(store);
        let e = check_header_versions(data.path(), &reg)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("export db is under key version 2")
                && e.contains("does not hold (it holds [1])")
                && e.contains("restore the keys.json that belongs to this data"),
            "{e}"
        );
    }

    #[test]
    fn one_line_prints_each_cause_once() {
        let os = std::io::Error::from_raw_os_error(98);
        let text = os.to_string();
        let inner = anyhow::Error::new(os).context(format!("bind ./ear.sock: {text}"));
        let e = inner.context("start the server");
        let line = one_line(&e);
        assert_eq!(line.matches(&text).count(), 1, "{line}");
        assert!(
            line.starts_with("start the server: bind ./ear.sock"),
            "{line}"
        );
    }
}
