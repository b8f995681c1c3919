//! `ear-sidecar keys rewrap`: moves every universe-key version of a data
//! directory under a new AWS KMS CMK (or from the local KEK to one). Offline,
//! under the directory lock, when no sidecar serves the directory; online
//! through the sidecar's admin socket otherwise. The rewrap itself is
//! [`crate::keys::rewrap`]; this module opens the providers, validates the new
//! CMK with the `validate-key` checks, draws the progress and prints the
//! one-line result.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};

use crate::config::{KmsConfig, RewrapArgs};
use crate::crypto::KeyRing;
use crate::keys::aws::{AwsKmsProvider, CheckOutcome};
use crate::keys::local::LocalProvider;
use crate::keys::registry::Registry;
use crate::keys::rewrap::{rewrap, RewrapOutcome};
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
    let result = match &args.admin_socket {
        Some(_) => Err(anyhow!(
            "online rewrap through --admin-socket is not available in this build; stop the \
             sidecar and run keys rewrap with --data-dir"
        )),
        None => offline(args, &target),
    };
    match result {
        Ok(out) => {
            print_outcome(args, &args.data_dir, &out, false);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ear-sidecar: keys rewrap: {}", super::one_line(&e));
            ExitCode::FAILURE
        }
    }
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
pub(crate) async fn validated_target(target: &KmsConfig) -> Result<AwsKmsProvider> {
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
            "refusing to rewrap: the new AWS KMS key {} failed validation (as validate-key \
             checks it): {}",
            report.key_arn,
            failed.join("; ")
        );
    }
    Ok(to)
}

fn offline(args: &RewrapArgs, target: &KmsConfig) -> Result<RewrapOutcome> {
    let dir = &args.data_dir;
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    let _lock = super::lock_data_dir(dir).map_err(|e| {
        if e.to_string().contains("in use") {
            anyhow!(
                "data directory {} is in use by a running ear-sidecar: rewrap it online with \
                 --admin-socket PATH, or stop it first",
                dir.display()
            )
        } else {
            e
        }
    })?;
    let mut reg = Registry::load(dir)?.ok_or_else(|| {
        anyhow!(
            "{} is not an initialised ear-sidecar data directory (no keys.json)",
            dir.display()
        )
    })?;
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
        let from = registry_provider(&reg, args.local_kek_file.clone(), &endpoint, &None).await?;
        let ring: KeyRing = reg
            .unwrap_all(from.as_ref(), 16)
            .await
            .context("unwrap the universe keys with the current master key")?;
        let to = validated_target(target).await?;
        let bar = progress_bar(args.json);
        let out = rewrap(&mut reg, from.as_ref(), &to, &ring, |done, total| {
            if let Some(b) = &bar {
                b.set_length(total);
                b.set_position(done);
            }
        })
        .await
        .context("rewrap")?;
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        Ok(out)
    })
}

fn progress_bar(json: bool) -> Option<indicatif::ProgressBar> {
    (!json && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template("rewrap [{bar:40}] {pos}/{len} key versions")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    })
}

/// The one-line summary (or JSON object) of a rewrap.
fn print_outcome(args: &RewrapArgs, dir: &std::path::Path, out: &RewrapOutcome, online: bool) {
    let restart = format!(
        "--kms aws --kms-key-id {}{}",
        out.to_master_key_id,
        args.kms_endpoint
            .as_deref()
            .map(|e| format!(" --kms-endpoint {e}"))
            .unwrap_or_default()
    );
    if args.json {
        let v = serde_json::json!({
            "data_dir": dir.display().to_string(),
            "online": online,
            "rewrap": out,
            "restart_with": restart,
        });
        println!("{v}");
        return;
    }
    let versions = out
        .versions
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let method = match out.method {
        crate::keys::rewrap::RewrapMethod::ReEncrypt => "KMS ReEncrypt",
        crate::keys::rewrap::RewrapMethod::DecryptEncrypt => "unwrap + KMS Encrypt",
    };
    let old = if out.from_provider == "local" {
        "the local KEK is no longer needed once the new registry is backed up".to_string()
    } else {
        format!("{} can now be disabled", out.from_master_key_id)
    };
    let when = if online {
        "the running sidecar keeps its keys in memory; restart it with"
    } else {
        "start the sidecar with"
    };
    println!(
        "rewrapped key version(s) {versions} of {} from {} {} to {} {} ({method}); {when} \
         {restart}; {old}",
        dir.display(),
        out.from_provider,
        out.from_master_key_id,
        out.to_provider,
        out.to_master_key_id,
    );
}
