//! The application's side of the admin control socket: [`ControlPlane`]
//! carries out each [`Request`] against the running store and keys.
//!
//! Each operation is one `match` arm calling one function, so key-lifecycle
//! and backup operations stay apart.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use serde_json::{json, Value};

use crate::control::{Handler, Progress, Request};
use crate::crypto::KeyRing;
use crate::keys::aws::KmsCallStats;
use crate::keys::revocation::WatchedKey;
use crate::store::Store;

/// What control requests act on: the running sidecar's state.
pub struct ControlPlane {
    /// Data directory being served.
    pub data_dir: PathBuf,
    /// The open exports.
    pub store: Arc<Store>,
    /// Keys, key operations and master key: set at start-up when encrypted,
    /// or once by `keys encrypt`.
    pub live: Arc<LiveKeys>,
    /// `--reencrypt-rate` in bytes per second (the sweep `keys encrypt` starts).
    pub reencrypt_rate: u64,
    /// `--key-cache-size` (the key ring `keys encrypt` makes).
    pub key_cache_size: usize,
    /// Called once `keys encrypt` has switched the sidecar to encryption:
    /// starts what an encrypted start-up starts (revocation watcher, health).
    pub on_encrypted: Option<OnEncrypted>,
    /// The sidecar's `--kms-endpoint`, the default for a rewrap's new CMK.
    pub kms_endpoint: Option<String>,
    /// Held by every operation that writes `keys.json`, so writers never
    /// interleave.
    pub registry_lock: Arc<tokio::sync::Mutex<()>>,
}

/// What [`ControlPlane::on_encrypted`] is given: the master key, the new
/// key ring, the key operations (with the sweep) and (AWS KMS) the
/// provider's call counters.
pub type OnEncrypted = Arc<
    dyn Fn(&Arc<WatchedKey>, &Arc<KeyRing>, &Arc<super::keys::KeyOps>, Option<Arc<KmsCallStats>>)
        + Send
        + Sync,
>;

/// A running sidecar's keys. Each is set once (at start-up when the data
/// directory is encrypted, or by `keys encrypt`) and never unset.
#[derive(Default)]
pub struct LiveKeys {
    /// Universe keys.
    pub keys: OnceLock<Arc<KeyRing>>,
    /// Key rotation, sweep and retirement.
    pub key_ops: OnceLock<Arc<super::keys::KeyOps>>,
    /// The directory's current master key (provider) and revocation canary;
    /// a rewrap replaces both inside it.
    pub master_key: OnceLock<Arc<WatchedKey>>,
}

impl LiveKeys {
    /// Keys set at start-up (all or none).
    pub fn new(
        keys: Option<Arc<KeyRing>>,
        key_ops: Option<Arc<super::keys::KeyOps>>,
        master_key: Option<Arc<WatchedKey>>,
    ) -> LiveKeys {
        LiveKeys {
            keys: keys.map(OnceLock::from).unwrap_or_default(),
            key_ops: key_ops.map(OnceLock::from).unwrap_or_default(),
            master_key: master_key.map(OnceLock::from).unwrap_or_default(),
        }
    }
}

impl ControlPlane {
    /// Universe keys (`None` while encryption is off).
    pub fn keys(&self) -> Option<&Arc<KeyRing>> {
        self.live.keys.get()
    }

    /// The master key (`None` while encryption is off).
    pub fn master_key(&self) -> Option<&Arc<WatchedKey>> {
        self.live.master_key.get()
    }
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl Handler for ControlPlane {
    async fn handle(&self, req: Request, progress: Progress) -> Result<Value, String> {
        match req {
            Request::Ping => Ok(json!({
                "version": env!("CARGO_PKG_VERSION"),
                "pid": std::process::id(),
            })),
            Request::Status => Ok(self.status()),
            Request::KeysStatus
            | Request::KeysRotate
            | Request::KeysRetire { .. }
            | Request::KeysSweepPause
            | Request::KeysSweepResume => self.key_lifecycle(&req).await,
            Request::Backup {
                export,
                to,
                full,
                incremental,
                rate,
            } => {
                self.backup(&export, &to, full, incremental, rate, progress)
                    .await
            }
            Request::KeysEncrypt { provider } => {
                super::keys_encrypt::encrypt_online(self, provider, &progress).await
            }
            Request::KeysRewrap {
                kms_key_id,
                kms_endpoint,
                kms_region,
            } => {
                super::keys_wrap::rewrap_online(
                    self,
                    kms_key_id,
                    kms_endpoint,
                    kms_region,
                    &progress,
                )
                .await
            }
        }
    }
}

impl ControlPlane {
    /// Key rotation, sweep and retirement requests.
    async fn key_lifecycle(&self, req: &Request) -> Result<Value, String> {
        let Some(ops) = self.live.key_ops.get() else {
            return Err("this sidecar runs with encryption off: it has no universe keys to rotate or retire".into());
        };
        match ops.handle(req).await {
            Some(r) => r,
            None => Err(format!("{} is not a key operation", req.op_name())),
        }
    }

    /// Takes a backup of `export` now (the `backup --admin-socket` command)
    /// and records its outcome in the export's backup metrics.
    async fn backup(
        &self,
        export: &str,
        to: &str,
        full: bool,
        incremental: bool,
        rate: Option<u64>,
        progress: Progress,
    ) -> Result<Value, String> {
        let e = self
            .store
            .get(export)
            .ok_or_else(|| format!("no export {export:?} is served here"))?;
        let ring = self
            .keys()
            .ok_or("backups need encryption: this sidecar runs with encryption off")?;
        super::backup::refuse_plaintext_left(&self.data_dir).map_err(|e| super::one_line(&e))?;
        let registry = crate::keys::registry::Registry::path_in(&self.data_dir);
        let r = async {
            let target = super::backup::open_target(to).await?;
            // The backup carries keys.json, which must hold every key version
            // a block in the cut uses: no rotation may land between reading
            // it and the cut, so the registry writer lock is held until then.
            let writer = Arc::clone(&self.registry_lock).lock_owned().await;
            let key_registry = std::fs::read(&registry).map_err(|err| {
                anyhow::anyhow!("read the key registry {}: {err}", registry.display())
            })?;
            progress.update(0, 0, "bytes", "taking the cut");
            let cut_taken = &progress;
            super::backup::take_backup(
                e,
                target,
                ring,
                key_registry,
                full,
                incremental,
                // Beside the clients this sidecar serves: their request
                // threads come first.
                crate::backup::BackupOptions {
                    rate,
                    low_priority: true,
                    ..Default::default()
                },
                move |_| {
                    drop(writer);
                    cut_taken.update(0, 0, "bytes", crate::control::BACKUP_CUT_TAKEN)
                },
                &|p| {
                    progress.update(
                        p.bytes,
                        p.total_bytes.unwrap_or(0),
                        "bytes",
                        crate::control::BACKUP_CUT_TAKEN,
                    )
                },
            )
            .await
        }
        .await;
        match r {
            Ok(report) => {
                crate::admin::record_backup(export, &report.stats, report.cut.pause);
                tracing::info!(export, backup = %report.stats.backup_id,
                    pause_us = report.cut.pause.as_micros() as u64,
                    preserved = report.cut.preserved_blocks, "backup complete");
                Ok(json!({ "summary": report.summary(), "report": report }))
            }
            Err(err) => {
                crate::admin::record_backup_failure(export);
                Err(super::one_line(&err))
            }
        }
    }

    /// The live view: what `status --admin-socket` prints.
    fn status(&self) -> Value {
        let exports: Vec<Value> = self
            .store
            .exports()
            .map(|e| {
                json!({
                    "name": e.name(),
                    "size": e.size(),
                    "encrypted": e.encrypted(),
                    "scrubbing": e.scrubbing(),
                })
            })
            .collect();
        let keys = self.keys().map(|k| {
            let s = k.snapshot();
            json!({
                "versions_loaded": s.versions,
                "active_version": s.active,
                "failed_closed": s.failed_closed,
            })
        });
        json!({
            "data_dir": self.data_dir.display().to_string(),
            "pid": std::process::id(),
            "encryption": if self.keys().is_some() { "on" } else { "off" },
            "keys": keys,
            "key_rotation": self.live.key_ops.get().map(|k| k.summary()),
            "exports": exports,
        })
    }
}
