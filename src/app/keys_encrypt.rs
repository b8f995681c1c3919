//! `ear-sidecar keys encrypt`: turns a data directory initialised with
//! `--encryption off` into an encrypted one. Online through the sidecar's
//! admin socket (reads and writes go on), or offline under the directory
//! lock.
//!
//! The steps, each crash-safe on its own:
//! 1. the provider is validated (AWS: the `validate-key` checks; local: the
//!    KEK file is read or created 0600, and refused inside the data
//!    directory);
//! 2. `sweep.json` records that plaintext residue must be purged;
//! 3. the registry goes from off to on with universe key version 1, sealed
//!    and written atomically ([`Registry::enable_encryption`]);
//! 4. every export header is rewritten encrypted through the two-slot
//!    update and the export gets its keys (a start-up with the registry on
//!    finishes any header still plaintext);
//! 5. the re-encryption sweep rewrites every block still under key version
//!    0 (plaintext), then purges the residue
//!    ([`crate::store::Export::purge_plaintext`]).
//!
//! There is no way back: encryption is never removed.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use super::control::ControlPlane;
use super::report::Reporter;
use crate::config::{EncryptArgs, KmsKind, ValidateKeyArgs};
use crate::control::proto::EncryptProvider;
use crate::control::{Progress, ProgressUpdate, Request};
use crate::crypto::KeyRing;
use crate::keys::aws::KmsCallStats;
use crate::keys::local::LocalProvider;
use crate::keys::registry::Registry;
use crate::keys::revocation::{Canary, WatchedKey};
use crate::keys::KeyProvider;
use crate::store::sweep::{SweepFile, Sweeper};
use crate::store::Store;

/// Exit 0 when the directory is encrypted, 1 when refused or failed, 2 on
/// bad options.
pub fn run(args: &EncryptArgs) -> ExitCode {
    super::init_logging("error", crate::config::LogFormat::Text);
    let provider = match provider_of(args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("ear-sidecar: configuration error: {}", super::one_line(&e));
            return ExitCode::from(2);
        }
    };
    let rep = Reporter::new(args.json);
    let result = match (&args.admin_socket, &args.data_dir) {
        (Some(sock), _) => online(sock, provider, &rep),
        (None, Some(dir)) => offline(dir, &provider, &rep),
        (None, None) => {
            eprintln!(
                "ear-sidecar: keys encrypt: pass --admin-socket PATH (a running sidecar) or \
                 --data-dir DIR (offline, no sidecar running)"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(v) => {
            rep.finish(v["summary"].as_str().unwrap_or_default(), &v);
            ExitCode::SUCCESS
        }
        Err(e) => {
            rep.abandon();
            eprintln!("ear-sidecar: keys encrypt: {}", super::one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The provider the command line names, with the KEK path made absolute
/// (the sidecar opens it, from its own working directory).
fn provider_of(args: &EncryptArgs) -> Result<EncryptProvider> {
    Ok(match args.kms {
        KmsKind::Local => {
            let kek = args
                .local_kek_file
                .clone()
                .or_else(|| crate::config::default_local_kek_file(&|k| std::env::var_os(k)))
                .ok_or_else(|| anyhow!("no local KEK: pass --local-kek-file PATH"))?;
            let kek =
                std::path::absolute(&kek).with_context(|| format!("resolve {}", kek.display()))?;
            EncryptProvider::Local {
                kek_file: kek.display().to_string(),
                insecure_kek_in_data_dir: args.insecure_kek_in_data_dir,
            }
        }
        KmsKind::Aws => EncryptProvider::Aws {
            kms_key_id: args
                .kms_key_id
                .clone()
                .ok_or_else(|| anyhow!("--kms aws needs --kms-key-id ARN"))?,
            kms_endpoint: args.kms_endpoint.clone(),
            kms_region: args.kms_region.clone(),
        },
    })
}

/// Opens and validates the provider before anything changes: the local KEK
/// is read or created 0600 (refused inside the data directory unless
/// insecure trials are asked for); an AWS KMS key passes the `validate-key`
/// checks.
async fn open_provider(
    p: &EncryptProvider,
    data_dir: &Path,
) -> Result<(Arc<dyn KeyProvider>, Option<Arc<KmsCallStats>>)> {
    match p {
        EncryptProvider::Local {
            kek_file,
            insecure_kek_in_data_dir,
        } => {
            let kek = PathBuf::from(kek_file);
            if crate::config::path_is_within(&kek, data_dir) && !insecure_kek_in_data_dir {
                bail!(
                    "refusing a local KEK inside the data directory ({}): a copy of the volume \
                     would carry its own key; pass --local-kek-file PATH outside {} (or \
                     --insecure-kek-in-data-dir for throwaway trials)",
                    kek.display(),
                    data_dir.display()
                );
            }
            if !kek.exists() {
                if let Some(dir) = kek.parent().filter(|d| !d.as_os_str().is_empty()) {
                    use std::os::unix::fs::DirBuilderExt;
                    std::fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o700)
                        .create(dir)
                        .with_context(|| format!("create the KEK's directory {}", dir.display()))?;
                }
            }
            Ok((
                Arc::new(
                    LocalProvider::open_or_create(&kek, true)
                        .with_context(|| format!("local key-encryption key {}", kek.display()))?,
                ),
                None,
            ))
        }
        EncryptProvider::Aws {
            kms_key_id,
            kms_endpoint,
            kms_region,
        } => {
            let target = ValidateKeyArgs {
                kms_key_id: kms_key_id.clone(),
                kms_endpoint: kms_endpoint.clone(),
                kms_region: kms_region.clone(),
                kms_startup_timeout: Duration::from_secs(60),
            }
            .kms_config()?;
            let p = super::keys_wrap::validated_target(&target, "encrypt").await?;
            let stats = p.stats();
            Ok((Arc::new(p), Some(stats)))
        }
    }
}

/// Steps 2 and 3: the purge is recorded, then the registry switched on.
async fn switch_registry(
    dir: &Path,
    reg: &mut Registry,
    provider: &dyn KeyProvider,
    cache: usize,
) -> Result<KeyRing> {
    if reg.encryption_on() {
        bail!(
            "data directory {} is already encrypted (provider {}); nothing to do",
            dir.display(),
            reg.provider().unwrap_or("?")
        );
    }
    SweepFile::set_purge_plaintext(dir).context("record the plaintext purge in sweep.json")?;
    reg.enable_encryption(provider, cache)
        .await
        .context("generate and wrap the universe key")
}

fn restart_flags(p: &EncryptProvider) -> String {
    match p {
        EncryptProvider::Local { kek_file, .. } => {
            format!("--encryption on --kms local --local-kek-file {kek_file}")
        }
        EncryptProvider::Aws {
            kms_key_id,
            kms_endpoint,
            ..
        } => format!(
            "--encryption on --kms aws --kms-key-id {kms_key_id}{}",
            kms_endpoint
                .as_deref()
                .map(|e| format!(" --kms-endpoint {e}"))
                .unwrap_or_default()
        ),
    }
}

fn result_json(
    dir: &Path,
    p: &EncryptProvider,
    online: bool,
    store: &Store,
    rewritten: u64,
) -> Value {
    let restart = restart_flags(p);
    let exports: Vec<&str> = store.exports().map(|e| e.name()).collect();
    let summary = format!(
        "encrypted data directory {} ({} export(s), {rewritten} plaintext block(s) re-encrypted, \
         plaintext residue purged); {} with {restart}",
        dir.display(),
        exports.len(),
        if online {
            "the running sidecar serves it encrypted now; restart it"
        } else {
            "start the sidecar"
        }
    );
    json!({
        "summary": summary,
        "data_dir": dir.display().to_string(),
        "online": online,
        "exports": exports,
        "rewritten_blocks": rewritten,
        "restart_with": restart,
    })
}

fn online(sock: &Path, provider: EncryptProvider, rep: &Reporter) -> Result<Value> {
    let req = Request::KeysEncrypt { provider };
    Ok(
        super::runtime()?.block_on(crate::control::client::call(sock, &req, |p| {
            rep.progress(p)
        }))?,
    )
}

/// The admin-socket side: switches the running sidecar to encryption with
/// no restart and no pause in I/O, then waits for the sweep to leave no
/// plaintext.
pub(crate) async fn encrypt_online(
    plane: &ControlPlane,
    provider: EncryptProvider,
    progress: &Progress,
) -> Result<Value, String> {
    let err = |e: anyhow::Error| super::one_line(&e);
    let dir = &plane.data_dir;
    if plane.keys().is_some() {
        return Err(format!(
            "data directory {} is already encrypted; nothing to do",
            dir.display()
        ));
    }
    let (p, kms_stats) = open_provider(&provider, dir).await.map_err(err)?;
    let ops = {
        let _writer = plane.registry_lock.lock().await;
        if plane.keys().is_some() {
            return Err(format!(
                "data directory {} is already encrypted",
                dir.display()
            ));
        }
        let mut reg = Registry::load(dir)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("{} has no keys.json", dir.display()))?;
        let ring = switch_registry(dir, &mut reg, p.as_ref(), plane.key_cache_size)
            .await
            .map_err(err)?;
        let ring = Arc::new(ring);
        let _ = plane.live.keys.set(Arc::clone(&ring));
        let store = Arc::clone(&plane.store);
        let r = Arc::clone(&ring);
        tokio::task::spawn_blocking(move || store.enable_encryption(&r))
            .await
            .map_err(|e| format!("switch the exports: {e}"))?
            .map_err(|e| {
                format!(
                    "switch the exports to encryption: {e}; the registry is on already: restart \
                     with {} to finish",
                    restart_flags(&provider)
                )
            })?;
        let watched = Arc::new(WatchedKey::new(p, Canary::active_of(&reg)));
        let _ = plane.live.master_key.set(Arc::clone(&watched));
        let sweeper = Sweeper::start(&plane.store, Arc::clone(&ring), dir, plane.reencrypt_rate);
        let ops = Arc::new(super::keys::KeyOps::new(
            dir,
            &reg,
            Arc::clone(&plane.registry_lock),
            Arc::clone(&watched),
            Arc::clone(&ring),
            Arc::clone(&plane.store),
            sweeper,
        ));
        let _ = plane.live.key_ops.set(Arc::clone(&ops));
        if let Some(f) = &plane.on_encrypted {
            f(&watched, &ring, &ops, kms_stats);
        }
        tracing::info!(data_dir = %dir.display(), provider = ops_provider(&provider),
            "encryption switched on; the sweep re-encrypts the plaintext blocks");
        ops
    };
    let sweeper = ops.sweeper().clone();
    let rewritten = wait_encrypted(&sweeper, |done, total| {
        progress.update(done, total, "blocks", "re-encrypting plaintext")
    })
    .await
    .map_err(err)?;
    Ok(result_json(dir, &provider, true, &plane.store, rewritten))
}

fn ops_provider(p: &EncryptProvider) -> &'static str {
    match p {
        EncryptProvider::Local { .. } => "local",
        EncryptProvider::Aws { .. } => "aws",
    }
}

/// Waits until the sweep has re-encrypted every plaintext block and purged
/// the residue; returns the blocks it re-encrypted.
async fn wait_encrypted(sweeper: &Sweeper, mut progress: impl FnMut(u64, u64)) -> Result<u64> {
    loop {
        let st = sweeper.status();
        progress(
            st.rewritten_blocks,
            st.rewritten_blocks + st.remaining_blocks,
        );
        let pending = {
            let s = sweeper.clone();
            tokio::task::spawn_blocking(move || s.purge_pending())
                .await
                .unwrap_or(true)
        };
        if !pending {
            return Ok(sweeper.rewritten());
        }
        if st.state == "done" && st.damaged_blocks > 0 {
            bail!(
                "{} plaintext block(s) match neither of their slots (damaged) and cannot be \
                 re-encrypted; run `ear-sidecar check --repair`, then start the sidecar with \
                 encryption on to finish",
                st.damaged_blocks
            );
        }
        if st.state == "paused" {
            bail!(
                "the re-encryption sweep is paused: resume it (keys sweep resume) to finish; \
                 encryption is on already"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn offline(dir: &Path, provider: &EncryptProvider, rep: &Reporter) -> Result<Value> {
    let _lock = super::lock_offline(
        dir,
        "encrypt it online with --admin-socket PATH, or stop it first",
    )?;
    let mut reg = super::load_registry(dir)?;
    let dir_id = reg.dir_id_bytes()?;
    let rt = super::runtime()?;
    rt.block_on(async {
        let (p, _) = open_provider(provider, dir).await?;
        let ring = Arc::new(switch_registry(dir, &mut reg, p.as_ref(), 1024).await?);
        SweepFile::set_paused(dir, false)?;
        // Opening with the keys switches every plaintext header.
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
        let sweeper = Sweeper::start(&store, Arc::clone(&ring), dir, 0);
        let r = wait_encrypted(&sweeper, |done, total| {
            rep.progress(&ProgressUpdate {
                done,
                total,
                unit: "blocks".into(),
                message: "re-encrypting plaintext".into(),
            })
        })
        .await;
        sweeper.stop();
        tokio::task::block_in_place(|| store.close()).context("close exports")?;
        let rewritten = r?;
        Ok(result_json(dir, provider, false, &store, rewritten))
    })
}
