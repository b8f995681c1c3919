//! `ear-sidecar check`: offline verification (and with `--repair`, repair)
//! of a data directory's backing files under the directory lock. The
//! verification itself is [`crate::store::check`]; this module unwraps the
//! keys, draws the progress and prints the report.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use crate::config::CheckArgs;
use crate::crypto::KeyRing;
use crate::keys::registry::Registry;
use crate::store;

/// Exit 0 when every checked export is free of damage, 1 when damage
/// remains, 2 when the check could not run.
pub fn run(args: &CheckArgs) -> ExitCode {
    match check(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("ear-sidecar: check: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Unwraps the data directory's keys with the provider its registry names
/// (none for a plaintext directory).
async fn unwrap_keys(args: &CheckArgs, reg: &Registry) -> Result<Option<Arc<KeyRing>>> {
    if !reg.encryption_on() {
        return Ok(None);
    }
    let provider = super::keys_wrap::registry_provider(
        reg,
        args.local_kek_file.clone(),
        &args.kms_endpoint,
        &args.kms_region,
    )
    .await?;
    let ring = reg
        .unwrap_all(provider.as_ref(), 64)
        .await
        .context("unwrap the universe key")?;
    Ok(Some(Arc::new(ring)))
}

/// Returns whether every checked export is free of damage.
fn check(args: &CheckArgs) -> Result<bool> {
    let _lock = super::lock_offline(&args.data_dir, "stop it first (check works offline)")?;
    let reg = super::load_registry(&args.data_dir)?;
    let dir_id = reg.dir_id_bytes()?;
    let keys = super::runtime()?.block_on(unwrap_keys(args, &reg))?;
    let existing = store::existing_exports(&args.data_dir)?;
    let names = match &args.export {
        Some(n) if !existing.contains(n) => {
            bail!("no export {n:?} in {}", args.data_dir.display())
        }
        Some(n) => vec![n.clone()],
        None => existing,
    };
    let bar_on = !args.json && std::io::stderr().is_terminal();
    let mut log = store::check::RepairLog::new(&args.data_dir);
    let mut reports = vec![];
    for name in &names {
        let bar = bar_on.then(|| {
            let b = indicatif::ProgressBar::new(0);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg:<20} [{bar:40}] {pos}/{len} groups {elapsed}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b.set_message(name.clone());
            b
        });
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
