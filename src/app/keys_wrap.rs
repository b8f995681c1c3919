//! `ear-sidecar keys rewrap`: moves every universe-key version of a data
//! directory under a new AWS KMS CMK (or from the local KEK to one). Offline,
//! under the directory lock, when no sidecar serves the directory; online
//! through the sidecar's admin socket otherwise. The rewrap itself is
//! [`crate::keys::rewrap`]; this module opens the providers, validates the new
//! CMK with the `validate-key` checks, draws the progress and prints the
//! one-line result.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};

use super::control::ControlPlane;
use super::report::Reporter;
use crate::config::{KmsConfig, RewrapArgs, ValidateKeyArgs};
use crate::control::{Progress, ProgressUpdate, Request};
use crate::crypto::KeyRing;
use crate::keys::aws::{AwsKmsProvider, CheckOutcome};
use crate::keys::local::LocalProvider;
use crate::keys::registry::Registry;
use crate::keys::revocation::{Canary, WatchedKey};
use crate::keys::rewrap::{rewrap, RewrapMethod, RewrapOutcome};
use crate::keys::KeyProvider;

/// Exit 0 when the keys were rewrapped, 1 when refused or failed, 2 on bad options.
pub fn run(args: &RewrapArgs) -> ExitCode {
    super::init_logging("error", crate::config::LogFormat::Text);
    let target = match args.target() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("ear-sidecar: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let reporter = Reporter::new(args.json);
    let result = match (&args.admin_socket, &args.data_dir) {
        (Some(sock), _) => online(sock, &target, &reporter),
        (None, Some(dir)) => offline(dir, args, &target, &reporter)
            .map(|out| result_json(dir, &out, false, &args.kms_endpoint, false)),
        (None, None) => {
            eprintln!(
                "ear-sidecar: keys rewrap: pass --admin-socket PATH (a running sidecar) or \
                 --data-dir DIR (offline, no sidecar running)"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(v) => {
            reporter.finish(v["summary"].as_str().unwrap_or_default(), &v);
            ExitCode::SUCCESS
        }
        Err(e) => {
            reporter.abandon();
            eprintln!("ear-sidecar: keys rewrap: {}", super::one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// Asks the sidecar on `sock` to rewrap; returns its result object.
fn online(
    sock: &std::path::Path,
    target: &KmsConfig,
    reporter: &Reporter,
) -> Result<serde_json::Value> {
    let KmsConfig::Aws {
        key_id,
        endpoint,
        region,
    } = target
    else {
        bail!("keys rewrap moves keys to an AWS KMS CMK: pass --kms aws --kms-key-id ARN");
    };
    let req = Request::KeysRewrap {
        kms_key_id: key_id.clone(),
        kms_endpoint: endpoint.clone(),
        kms_region: region.clone(),
    };
    Ok(
        super::runtime()?.block_on(crate::control::client::call(sock, &req, |p| {
            reporter.progress(p)
        }))?,
    )
}

/// The admin-socket side of `keys rewrap`: rewraps `keys.json` of the
/// running sidecar under the new CMK, then points the running sidecar's
/// master key (revocation check, later key operations) at it. The keys in
/// memory do not change, so I/O is not paused.
pub(crate) async fn rewrap_online(
    plane: &ControlPlane,
    kms_key_id: String,
    kms_endpoint: Option<String>,
    kms_region: Option<String>,
    progress: &Progress,
) -> Result<serde_json::Value, String> {
    let err = |e: anyhow::Error| super::one_line(&e);
    let (Some(ring), Some(master)) = (plane.keys(), plane.master_key()) else {
        return Err(format!(
            "data directory {} is not encrypted: there are no keys to rewrap",
            plane.data_dir.display()
        ));
    };
    if ring.is_failed_closed() {
        return Err(
            "this sidecar has failed closed (its keys are wiped): restore the master key, \
             restart it, then rewrap"
                .into(),
        );
    }
    let endpoint = kms_endpoint.or_else(|| plane.kms_endpoint.clone());
    let target = ValidateKeyArgs {
        kms_key_id,
        kms_endpoint: endpoint.clone(),
        kms_region,
        kms_startup_timeout: std::time::Duration::from_secs(60),
    }
    .kms_config()
    .map_err(|e| e.to_string())?;
    let _writer = plane.registry_lock.lock().await;
    let mut reg = Registry::load(&plane.data_dir)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("{} has no keys.json", plane.data_dir.display()))?;
    let watched = master.current().provider.kind() == "aws";
    let out = rewrap_running(&mut reg, master, ring, &target, |done, total| {
        progress.update(done, total, "key versions", "rewrap")
    })
    .await
    .map_err(err)?;
    Ok(result_json(&plane.data_dir, &out, true, &endpoint, watched))
}

/// Rewraps the registry of a running sidecar (`reg`, held by the caller's
/// registry writer lock) from its current master key in `master` to the CMK
/// of `target`, then points `master` (the revocation check and later key
/// operations) at the new CMK with the new canary. `ring` holds the keys in
/// use; they do not change.
pub(crate) async fn rewrap_running(
    reg: &mut Registry,
    master: &WatchedKey,
    ring: &KeyRing,
    target: &KmsConfig,
    progress: impl FnMut(u64, u64),
) -> Result<RewrapOutcome> {
    // The file on disk must still be the one these keys sealed.
    let to = Arc::new(validated_target(target, "rewrap").await?);
    reg.verify_current(ring)?;
    let from = Arc::clone(&master.current().provider);
    let out = rewrap(reg, from.as_ref(), &to, ring, progress)
        .await
        .context("rewrap")?;
    master.replace(to, Canary::active_of(reg));
    tracing::info!(from = %out.from_master_key_id, to = %out.to_master_key_id,
        versions = ?out.versions, "universe keys rewrapped under a new master key");
    Ok(out)
}

/// The provider a registry names, opened for unwrapping: the local KEK file
/// (`kek`, or the default path), or the registry's CMK.
pub(crate) async fn registry_provider(
    reg: &Registry,
    kek: Option<PathBuf>,
    endpoint: &Option<String>,
    region: &Option<String>,
) -> Result<Arc<dyn KeyProvider>> {
    Ok(match reg.provider() {
        Some("local") => {
            let kek = kek
                .or_else(|| crate::config::default_local_kek_file(&|k| std::env::var_os(k)))
                .ok_or_else(|| anyhow!("no local KEK: pass --local-kek-file PATH"))?;
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
                AwsKmsProvider::new(&super::aws_options(key_id, endpoint, region))
                    .await
                    .context("AWS KMS key provider")?,
            )
        }
        other => bail!("the key registry names an unknown key provider {other:?}"),
    })
}

/// Opens the new CMK's provider and runs the `validate-key` checks on it;
/// refuses with every failed check named.
pub(crate) async fn validated_target(target: &KmsConfig, what: &str) -> Result<AwsKmsProvider> {
    let KmsConfig::Aws {
        key_id,
        endpoint,
        region,
    } = target
    else {
        bail!("keys rewrap moves keys to an AWS KMS CMK: pass --kms aws --kms-key-id ARN");
    };
    let to = AwsKmsProvider::new(&super::aws_options(key_id, endpoint, region))
        .await
        .context("new AWS KMS key provider")?;
    let report = to.validate().await;
    if !report.is_ok() {
        let failed: Vec<String> = report
            .checks
            .iter()
            .filter_map(|c| match &c.outcome {
                CheckOutcome::Failed(m) => Some(format!("{}: {m}", c.name)),
                CheckOutcome::Skipped(w) => Some(format!("{} skipped: {w}", c.name)),
                CheckOutcome::Passed(_) => None,
            })
            .collect();
        bail!(
            "refusing to {what}: the new AWS KMS key {} failed validation (as validate-key \
             checks it): {}",
            report.key_arn,
            failed.join("; ")
        );
    }
    Ok(to)
}

fn offline(
    dir: &std::path::Path,
    args: &RewrapArgs,
    target: &KmsConfig,
    reporter: &Reporter,
) -> Result<RewrapOutcome> {
    let _lock = super::lock_offline(
        dir,
        "rewrap it online with --admin-socket PATH, or stop it first",
    )?;
    let mut reg = super::load_registry(dir)?;
    if !reg.encryption_on() {
        bail!(
            "data directory {} is not encrypted: there are no keys to rewrap",
            dir.display()
        );
    }
    // The old CMK is reached through the same endpoint, in its own ARN's region.
    let endpoint = match target {
        KmsConfig::Aws { endpoint, .. } => endpoint.clone(),
        KmsConfig::Local { .. } => None,
    };
    super::runtime()?.block_on(async {
        let to = validated_target(target, "rewrap").await?;
        let from = registry_provider(&reg, args.local_kek_file.clone(), &endpoint, &None).await?;
        let ring: KeyRing = reg
            .unwrap_all(from.as_ref(), 16)
            .await
            .context("unwrap the universe keys with the current master key")?;
        rewrap(&mut reg, from.as_ref(), &to, &ring, |done, total| {
            reporter.progress(&ProgressUpdate {
                done,
                total,
                unit: "key versions".into(),
                message: "rewrap".into(),
            })
        })
        .await
        .context("rewrap")
    })
}

/// The result object of a rewrap, with its one-line `summary`.
fn result_json(
    dir: &std::path::Path,
    out: &RewrapOutcome,
    online: bool,
    endpoint: &Option<String>,
    watch_moved: bool,
) -> serde_json::Value {
    let restart = format!(
        "--kms aws --kms-key-id {}{}",
        out.to_master_key_id,
        endpoint
            .as_deref()
            .map(|e| format!(" --kms-endpoint {e}"))
            .unwrap_or_default()
    );
    let versions = out
        .versions
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let method = match out.method {
        RewrapMethod::ReEncrypt => "KMS ReEncrypt",
        RewrapMethod::DecryptEncrypt => "unwrap + KMS Encrypt",
    };
    let old = if out.from_provider == "local" {
        "the local KEK is no longer needed once the new registry is backed up".to_string()
    } else {
        format!("{} can now be disabled", out.from_master_key_id)
    };
    let when = match (online, watch_moved) {
        (false, _) => "start the sidecar with".to_string(),
        (true, true) => "the running sidecar keeps its keys in memory and now checks the new \
                         CMK; restart it with"
            .to_string(),
        (true, false) => "the running sidecar keeps its keys in memory (its revocation check \
                          starts with the restart); restart it with"
            .to_string(),
    };
    let summary = format!(
        "rewrapped key version(s) {versions} of {} from {} {} to {} {} ({method}); {when} \
         {restart}; {old}",
        dir.display(),
        out.from_provider,
        out.from_master_key_id,
        out.to_provider,
        out.to_master_key_id,
    );
    serde_json::json!({
        "summary": summary,
        "data_dir": dir.display().to_string(),
        "online": online,
        "rewrap": out,
        "restart_with": restart,
    })
}
