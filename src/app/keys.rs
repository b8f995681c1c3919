//! Key rotation, the re-encryption sweep and key retirement, as operations
//! ([`KeyOps`]) shared by the running sidecar (admin socket, `--rotate-every`,
//! `--retire-after-sweep`) and the offline `ear-sidecar keys ... --data-dir`
//! commands.
//!
//! Ordering rules that keep every block readable:
//! * **Rotate**: the new version is saved in `keys.json` (atomically) before
//!   the key ring makes it active, so no block is ever written under a key
//!   the registry does not hold.
//! * **Retire**: every export is synced first; then no block (exact counts)
//!   and no header may use the version; only then is its wrapped key removed
//!   from `keys.json` and the key dropped from memory.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use super::report::Reporter;
use crate::config::{KeysCommand, KeysTarget, SweepAction};
use crate::control::{ProgressUpdate, Request};
use crate::crypto::KeyRing;
use crate::keys::registry::Registry;
use crate::keys::revocation::{Canary, WatchedKey};
use crate::store::sweep::{self, SweepFile, Sweeper};
use crate::store::{self, Store};

/// The key lifecycle of one data directory.
pub struct KeyOps {
    data_dir: PathBuf,
    /// Held by every writer of `keys.json` (also `keys rewrap`); the
    /// registry is read from disk under it, so writers never undo each
    /// other.
    registry_lock: Arc<tokio::sync::Mutex<()>>,
    /// The current master key (a rewrap replaces it) and revocation canary.
    master: Arc<WatchedKey>,
    ring: Arc<KeyRing>,
    store: Arc<Store>,
    sweeper: Sweeper,
}

impl std::fmt::Debug for KeyOps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyOps")
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

/// What still uses a key version.
struct Usage {
    blocks: u64,
    per_export: Vec<(String, u64)>,
    headers: Vec<String>,
}

impl KeyOps {
    /// Key operations over an open store; `sweeper` is running (serve,
    /// offline rotate) or [`Sweeper::idle`].
    pub fn new(
        data_dir: &Path,
        registry: &Registry,
        registry_lock: Arc<tokio::sync::Mutex<()>>,
        master: Arc<WatchedKey>,
        ring: Arc<KeyRing>,
        store: Arc<Store>,
        sweeper: Sweeper,
    ) -> Self {
        let last = registry
            .versions()
            .iter()
            .map(|v| v.created_unix)
            .max()
            .unwrap_or(0);
        ring.set_rotated_unix(last);
        KeyOps {
            data_dir: data_dir.to_path_buf(),
            registry_lock,
            master,
            ring,
            store,
            sweeper,
        }
    }

    /// The sweeper.
    pub fn sweeper(&self) -> &Sweeper {
        &self.sweeper
    }

    /// The key ring.
    pub fn ring(&self) -> &Arc<KeyRing> {
        &self.ring
    }

    /// Unix time of the newest key version.
    pub fn last_rotation_unix(&self) -> u64 {
        self.ring.rotated_unix()
    }

    /// Creates a new universe-key version and makes it active: saved in the
    /// registry first, then live in the key ring (no pause in I/O: writes
    /// read the active version under their block lock). Wakes the sweep.
    pub async fn rotate(&self) -> Result<Value, String> {
        if self.ring.is_failed_closed() {
            return Err("the keys are wiped (failed closed); restart with a usable master key before rotating".into());
        }
        let _writer = self.registry_lock.lock().await;
        let mut reg = self.load_registry()?;
        let previous = reg.active_version().unwrap_or(0);
        let provider = Arc::clone(&self.master.current().provider);
        let (version, key) = reg
            .rotate(provider.as_ref(), &self.ring)
            .await
            .map_err(|e| format!("rotation failed, nothing changed: {e}"))?;
        self.ring.insert_version(version, key).map_err(|e| {
            format!("key version {version} is saved in keys.json but could not be loaded ({e}); restart the sidecar")
        })?;
        self.ring
            .set_active(version)
            .map_err(|e| format!("cannot activate key version {version}: {e}"))?;
        // The revocation check's canary is the active version's wrapped key.
        self.master.set_canary(Canary::active_of(&reg));
        drop(_writer);
        self.sweeper.kick();
        tracing::info!(
            version,
            previous,
            "universe key rotated: new writes use the new version; the sweep re-encrypts older blocks"
        );
        Ok(json!({
            "rotated": true,
            "active_version": version,
            "previous_version": previous,
            "versions_loaded": self.ring.snapshot().versions,
        }))
    }

    /// `keys.json` as on disk, checked against the keys in memory (it must
    /// still be the file these keys sealed, at their active version). Call
    /// under `registry_lock`.
    fn load_registry(&self) -> Result<Registry, String> {
        let reg = Registry::load(&self.data_dir)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("{} has no keys.json", self.data_dir.display()))?;
        reg.verify_current(&self.ring).map_err(|e| e.to_string())?;
        Ok(reg)
    }

    /// Blocks and headers that still use `version`, per export, after every
    /// export is synced. `Err` when the counts are not exact yet.
    fn usage(&self, version: u32) -> Result<Usage, String> {
        let mut blocks = 0;
        let mut per_export = vec![];
        let mut headers = vec![];
        for e in self.store.exports() {
            let snap = e.versions().snapshot();
            if !snap.exact {
                return Err(format!(
                    "block counts of export {} are not exact yet (census {}/{} groups{}); try again shortly",
                    e.name(),
                    snap.census_done,
                    snap.census_total,
                    if snap.census_done >= snap.census_total {
                        ", or an earlier write failed: restart the sidecar to recount"
                    } else {
                        ""
                    }
                ));
            }
            let n = snap.by_version.get(&version).copied().unwrap_or(0);
            if n > 0 {
                per_export.push((e.name().to_string(), n));
                blocks += n;
            }
            if e.encrypted() && e.header_key_version() == version {
                headers.push(e.name().to_string());
            }
        }
        Ok(Usage {
            blocks,
            per_export,
            headers,
        })
    }

    /// Retires `version`: refused while any block or header uses it (with
    /// the count), else removed from `keys.json` and from memory.
    pub async fn retire(&self, version: u32) -> Result<Value, String> {
        let _writer = self.registry_lock.lock().await;
        let mut reg = self.load_registry()?;
        if reg.active_version() == Some(version) {
            return Err(format!(
                "refusing to retire key version {version}: it is the active version (rotate first)"
            ));
        }
        if !reg.versions().iter().any(|v| v.version == version) {
            return Err(format!(
                "refusing to retire key version {version}: there is no such version (stored: {})",
                reg.versions()
                    .iter()
                    .map(|v| v.version.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        // What the sweep rewrote must be durable before the old key goes:
        // after power loss a block must not fall back to the retired key.
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || store.flush_all())
            .await
            .map_err(|e| format!("flush before retiring: {e}"))?
            .map_err(|e| format!("flush before retiring failed, nothing retired: {e}"))?;
        let Usage {
            blocks,
            per_export,
            headers,
        } = self.usage(version)?;
        if blocks > 0 || !headers.is_empty() {
            let mut why =
                format!("refusing to retire key version {version}: {blocks} block(s) still use it");
            if !per_export.is_empty() {
                why.push_str(&format!(
                    " ({})",
                    per_export
                        .iter()
                        .map(|(n, c)| format!("{n}: {c}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            if !headers.is_empty() {
                why.push_str(&format!(
                    ", and the header of {} is signed with it",
                    headers.join(", ")
                ));
            }
            why.push_str(
                "; wait for the re-encryption sweep to finish (`ear-sidecar keys status`)",
            );
            return Err(why);
        }
        reg.retire(version, &self.ring)
            .map_err(|e| format!("retiring key version {version} failed, nothing changed: {e}"))?;
        if let Err(e) = self.ring.remove_version(version) {
            tracing::warn!(version, error = %e, "retired key version was not in memory");
        }
        self.master.set_canary(Canary::active_of(&reg));
        tracing::info!(
            version,
            "key version retired: its wrapped key is removed from keys.json and from memory"
        );
        Ok(json!({
            "retired": version,
            "active_version": reg.active_version(),
            "versions": reg.versions().iter().map(|v| v.version).collect::<Vec<_>>(),
        }))
    }

    /// Retires every non-active version that nothing uses (after a sweep,
    /// with `--retire-after-sweep`). Returns the versions retired.
    pub async fn retire_unused(&self) -> Vec<u32> {
        let snap = self.ring.snapshot();
        let candidates: Vec<u32> = snap
            .versions
            .iter()
            .copied()
            .filter(|v| *v != snap.active)
            .collect();
        let mut out = vec![];
        for v in candidates {
            match self.usage(v) {
                Ok(u) if u.blocks == 0 && u.headers.is_empty() => {}
                _ => continue,
            }
            match self.retire(v).await {
                Ok(_) => out.push(v),
                Err(e) => tracing::debug!(version = v, reason = %e, "not retired yet"),
            }
        }
        out
    }

    /// Pauses the sweep (recorded in `sweep.json`).
    pub fn pause(&self) -> Result<Value, String> {
        self.sweeper
            .pause()
            .map_err(|e| format!("sweep paused, but the pause could not be saved: {e}"))?;
        Ok(json!({ "sweep": "paused" }))
    }

    /// Resumes the sweep.
    pub fn resume(&self) -> Result<Value, String> {
        self.sweeper
            .resume()
            .map_err(|e| format!("sweep resumed, but this could not be saved: {e}"))?;
        Ok(json!({ "sweep": "resumed" }))
    }

    /// Everything `keys status` shows (no secrets).
    pub async fn status(&self) -> Value {
        let reg = {
            let _writer = self.registry_lock.lock().await;
            match Registry::load(&self.data_dir) {
                Ok(Some(r)) => r,
                Ok(None) => return json!({ "error": "keys.json is missing" }),
                Err(e) => return json!({ "error": e.to_string() }),
            }
        };
        let snap = self.ring.snapshot();
        let exports: Vec<Arc<store::Export>> = self.store.exports().cloned().collect();
        let mut total: std::collections::BTreeMap<u32, u64> = Default::default();
        let mut exact = true;
        let ex: Vec<Value> = exports
            .iter()
            .map(|e| {
                let c = e.versions().snapshot();
                exact &= c.exact;
                for (v, n) in &c.by_version {
                    *total.entry(*v).or_default() += n;
                }
                json!({
                    "name": e.name(),
                    "blocks_by_version": c.by_version,
                    "header_key_version": e.header_key_version(),
                    "counts_exact": c.exact,
                    "census_done": c.census_done,
                    "census_total": c.census_total,
                })
            })
            .collect();
        let versions: Vec<Value> = reg
            .versions()
            .iter()
            .map(|v| {
                json!({
                    "version": v.version,
                    "created_unix": v.created_unix,
                    "active": Some(v.version) == reg.active_version(),
                    "blocks": total.get(&v.version).copied().unwrap_or(0),
                })
            })
            .collect();
        json!({
            "data_dir": self.data_dir.display().to_string(),
            "provider": reg.provider(),
            "active_version": reg.active_version(),
            "versions": versions,
            "versions_loaded": snap.versions,
            "last_rotation_unix": self.last_rotation_unix(),
            "counts_exact": exact,
            "exports": ex,
            "sweep": self.sweeper.status(),
        })
    }

    /// The key-rotation part of `status`: blocks per version (all
    /// exports), versions loaded, last rotation, sweep (no registry lock).
    pub fn summary(&self) -> Value {
        let mut total: std::collections::BTreeMap<u32, u64> = Default::default();
        let mut exact = true;
        for e in self.store.exports() {
            let c = e.versions().snapshot();
            exact &= c.exact;
            for (v, n) in c.by_version {
                *total.entry(v).or_default() += n;
            }
        }
        let st = self.sweeper.status();
        json!({
            "blocks_by_version": total,
            "counts_exact": exact,
            "versions_loaded": self.ring.snapshot().versions,
            "last_rotation_unix": self.last_rotation_unix(),
            "sweep": {
                "state": st.state,
                "progress": st.progress,
                "remaining_blocks": st.remaining_blocks,
                "rate_bytes_per_sec": st.rate_bytes_per_sec,
                "eta_seconds": st.eta_seconds,
            },
        })
    }

    /// Runs the control request `req` (a key-lifecycle one).
    pub async fn handle(&self, req: &Request) -> Option<Result<Value, String>> {
        Some(match req {
            Request::KeysStatus => Ok(self.status().await),
            Request::KeysRotate => self.rotate().await,
            Request::KeysRetire { version } => self.retire(*version).await,
            Request::KeysSweepPause => self.pause(),
            Request::KeysSweepResume => self.resume(),
            _ => return None,
        })
    }

    /// Spawns `--rotate-every` and `--retire-after-sweep` for the running
    /// sidecar; both end when `shutdown` resolves.
    pub fn spawn_schedules(
        self: &Arc<Self>,
        rotate_every: Option<Duration>,
        retire_after_sweep: bool,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        if let Some(every) = rotate_every {
            let ops = Arc::clone(self);
            let mut stop = shutdown.clone();
            tracing::info!(
                every_secs = every.as_secs_f64(),
                "scheduled key rotation on"
            );
            tokio::spawn(async move {
                let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stop.changed() => return,
                    }
                    if let Err(e) = ops.rotate().await {
                        tracing::error!(error = %e, "scheduled key rotation failed; retrying at the next period");
                    }
                }
            });
        }
        if retire_after_sweep {
            let ops = Arc::clone(self);
            let mut stop = shutdown;
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stop.changed() => return,
                    }
                    // Counts only fall for a non-active version (writes and the
                    // sweep use the active one), so a version whose count is 0
                    // can go even while a sweep toward a newer one still runs.
                    if ops.ring.snapshot().versions.len() > 1 {
                        for v in ops.retire_unused().await {
                            tracing::info!(
                                version = v,
                                "retired automatically after the sweep (--retire-after-sweep)"
                            );
                        }
                    }
                }
            });
        }
    }
}

// ---- the `keys` command ------------------------------------------------------

/// `ear-sidecar keys ...`: exit 0 on success, 1 when refused or failed, 2
/// when the command could not run (bad options).
pub fn run(op: &KeysCommand) -> ExitCode {
    super::init_logging("warn", crate::config::LogFormat::Text);
    let Some(target) = op.target() else {
        eprintln!("ear-sidecar: keys: internal: rewrap is not a rotation command");
        return ExitCode::from(2);
    };
    let rep = Reporter::new(target.json);
    let r = match (&target.admin_socket, &target.data_dir) {
        (Some(sock), _) => online(sock, op, &rep),
        (None, Some(dir)) => offline(dir, target, op, &rep),
        (None, None) => {
            eprintln!("ear-sidecar: keys: pass --admin-socket PATH (a running sidecar) or --data-dir DIR (offline, no sidecar running)");
            return ExitCode::from(2);
        }
    };
    match r {
        Ok((line, v)) => {
            rep.finish(&line, &v);
            ExitCode::SUCCESS
        }
        Err(e) => {
            rep.abandon();
            eprintln!("ear-sidecar: keys: {}", super::one_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn request_of(op: &KeysCommand) -> Request {
    match op {
        // `run` hands rewrap to its own module; status is harmless here.
        KeysCommand::Status(_) | KeysCommand::Rewrap(_) | KeysCommand::Encrypt(_) => {
            Request::KeysStatus
        }
        KeysCommand::Rotate(_) => Request::KeysRotate,
        KeysCommand::Retire(a) => Request::KeysRetire { version: a.version },
        KeysCommand::Sweep(s) => match s.action {
            SweepAction::Pause(_) => Request::KeysSweepPause,
            SweepAction::Resume(_) => Request::KeysSweepResume,
        },
    }
}

fn online(sock: &Path, op: &KeysCommand, rep: &Reporter) -> Result<(String, Value)> {
    let req = request_of(op);
    let v = super::runtime()?.block_on(crate::control::client::call(sock, &req, |p| {
        rep.progress(p)
    }))?;
    Ok((summary(op, &v), v))
}

/// The one-line human result of `op`.
fn summary(op: &KeysCommand, v: &Value) -> String {
    match op {
        KeysCommand::Status(_) | KeysCommand::Rewrap(_) | KeysCommand::Encrypt(_) => status_line(v),
        KeysCommand::Rotate(_) => {
            let mut s = format!(
                "rotated: key version {} is active (was {})",
                v["active_version"], v["previous_version"]
            );
            if let Some(n) = v.get("rewritten_blocks") {
                s.push_str(&format!("; {n} block(s) re-encrypted"));
            } else {
                s.push_str("; the background sweep re-encrypts older blocks");
            }
            s
        }
        KeysCommand::Retire(a) => format!(
            "retired key version {}: its wrapped key is removed from keys.json (versions left: {})",
            a.version, v["versions"]
        ),
        KeysCommand::Sweep(s) => match s.action {
            SweepAction::Pause(_) => "re-encryption sweep paused".into(),
            SweepAction::Resume(_) => match v.get("rewritten_blocks") {
                Some(n) => format!("re-encryption sweep finished: {n} block(s) re-encrypted"),
                None => "re-encryption sweep resumed".into(),
            },
        },
    }
}

fn status_line(v: &Value) -> String {
    let versions: Vec<String> = v["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|x| {
            format!(
                "v{}{}: {} blocks",
                x["version"],
                if x["active"] == true { " (active)" } else { "" },
                x["blocks"]
            )
        })
        .collect();
    let sw = &v["sweep"];
    let mut s = format!(
        "keys: {}; sweep {}",
        versions.join(", "),
        sw["state"].as_str().unwrap_or("?")
    );
    if sw["state"] == "running" {
        s.push_str(&format!(
            " {:.1} % ({} blocks left, {:.1} MiB/s, eta {:.0} s)",
            sw["progress"].as_f64().unwrap_or(0.0) * 100.0,
            sw["remaining_blocks"],
            sw["rate_bytes_per_sec"].as_f64().unwrap_or(0.0) / 1048576.0,
            sw["eta_seconds"].as_f64().unwrap_or(0.0)
        ));
    }
    if v["counts_exact"] != true {
        s.push_str("; block counts still being computed");
    }
    s
}

/// Offline: under the directory lock, with the store opened here.
fn offline(
    dir: &Path,
    t: &KeysTarget,
    op: &KeysCommand,
    rep: &Reporter,
) -> Result<(String, Value)> {
    let _lock = super::lock_offline(dir, "use --admin-socket PATH to steer it")?;
    if let KeysCommand::Sweep(s) = op {
        if let SweepAction::Pause(_) = s.action {
            SweepFile::set_paused(dir, true)?;
            let v = json!({ "sweep": "paused" });
            return Ok((summary(op, &v), v));
        }
    }
    let reg = super::load_registry(dir)?;
    if !reg.encryption_on() {
        bail!(
            "data directory {} is not encrypted: it has no universe keys to rotate or retire",
            dir.display()
        );
    }
    let dir_id = reg.dir_id_bytes()?;
    let rt = super::runtime()?;
    rt.block_on(async {
        let provider = super::keys_wrap::registry_provider(
            &reg,
            t.local_kek_file.clone(),
            &t.kms_endpoint,
            &t.kms_region,
        )
        .await?;
        let ring = Arc::new(
            reg.unwrap_all(provider.as_ref(), 1024)
                .await
                .context("unwrap the universe keys")?,
        );
        let store = Arc::new(
            tokio::task::block_in_place(|| {
                Store::open_opts(
                    dir,
                    dir_id,
                    Some(Arc::clone(&ring)),
                    &[],
                    Default::default(),
                )
            })
            .context("open exports")?,
        );
        let sweeps = matches!(op, KeysCommand::Rotate(_) | KeysCommand::Sweep(_));
        if sweeps {
            SweepFile::set_paused(dir, false)?;
        }
        let sweeper = if sweeps {
            Sweeper::start(&store, Arc::clone(&ring), dir, 0)
        } else {
            Sweeper::idle(dir)
        };
        let master = Arc::new(WatchedKey::new(provider, Canary::active_of(&reg)));
        let ops = KeyOps::new(
            dir,
            &reg,
            Arc::new(tokio::sync::Mutex::new(())),
            master,
            ring,
            Arc::clone(&store),
            sweeper.clone(),
        );
        wait_census(&store, rep).await;
        let result = match op {
            KeysCommand::Status(_) | KeysCommand::Rewrap(_) | KeysCommand::Encrypt(_) => {
                Ok(ops.status().await)
            }
            KeysCommand::Rotate(_) => match ops.rotate().await {
                Ok(mut v) => {
                    let n = sweep_to_end(&ops, rep).await;
                    v["rewritten_blocks"] = json!(n);
                    Ok(v)
                }
                Err(e) => Err(e),
            },
            KeysCommand::Retire(a) => ops.retire(a.version).await,
            KeysCommand::Sweep(_) => {
                let n = sweep_to_end(&ops, rep).await;
                Ok(json!({ "sweep": "done", "rewritten_blocks": n }))
            }
        };
        sweeper.stop();
        tokio::task::block_in_place(|| store.close()).context("close exports")?;
        let v = result.map_err(|e| anyhow!(e))?;
        Ok((summary(op, &v), v))
    })
}

async fn wait_census(store: &Store, rep: &Reporter) {
    loop {
        let (done, total) = store.exports().fold((0, 0), |(d, t), e| {
            let s = e.versions().snapshot();
            (d + s.census_done, t + s.census_total)
        });
        if done >= total {
            return;
        }
        rep.progress(&ProgressUpdate {
            done,
            total,
            unit: "groups".into(),
            message: "counting blocks".into(),
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for the sweeper to finish, drawing progress. Returns the blocks
/// it re-encrypted.
async fn sweep_to_end(ops: &KeyOps, rep: &Reporter) -> u64 {
    let sw = ops.sweeper();
    let start = sw.passes();
    loop {
        let st = sw.status();
        rep.progress(&ProgressUpdate {
            done: st.rewritten_blocks,
            total: st.rewritten_blocks + st.remaining_blocks,
            unit: "blocks".into(),
            message: "re-encrypting".into(),
        });
        let exports: Vec<_> = ops.store.exports().cloned().collect();
        let (left, exact) = sweep::remaining(&exports, ops.ring.active_version());
        let headers_done = exports
            .iter()
            .all(|e| !e.encrypted() || e.header_key_version() == ops.ring.active_version());
        if exact
            && headers_done
            && (left == 0 || (sw.passes() > start && left <= st.damaged_blocks))
        {
            return sw.rewritten();
        }
        if st.state == "stalled" {
            tracing::warn!(error = ?st.error, "sweep stalled; retrying");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
