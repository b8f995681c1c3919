//! The one-shot commands: `status` (what a data directory holds, read
//! without keys) and `validate-key` (the managed service's AWS KMS key
//! checks, no data directory).

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::Result;

use crate::config::{KmsConfig, LogFormat, StatusArgs, ValidateKeyArgs};
use crate::keys::aws;
use crate::store;

/// `validate-key`: the managed service's key checks, no data directory.
/// Exit 0 when the key is usable, 1 when a check fails, 2 on bad options.
pub fn validate_key(args: &ValidateKeyArgs) -> ExitCode {
    super::init_logging("error", LogFormat::Text);
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
    let opts = super::aws_options(&key_id, &endpoint, &region);
    let rt = match super::runtime() {
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

/// `status`: what a data directory holds, read without keys.
pub fn status(args: &StatusArgs) -> Result<()> {
    if let Some(sock) = &args.admin_socket {
        return live_status(sock, args.json);
    }
    let reg = super::load_registry(&args.data_dir)?;
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

/// `status --admin-socket`: the running sidecar's own view.
fn live_status(sock: &std::path::Path, json: bool) -> Result<()> {
    let v = super::runtime()?.block_on(crate::control::client::call(
        sock,
        &crate::control::Request::Status,
        |_| {},
    ))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("data directory : {}", v["data_dir"].as_str().unwrap_or("?"));
    println!("sidecar pid    : {}", v["pid"]);
    println!(
        "encryption     : {}",
        v["encryption"].as_str().unwrap_or("?")
    );
    if let Some(k) = v.get("keys").filter(|k| !k.is_null()) {
        println!(
            "key versions   : {} loaded, active {}{}",
            k["versions_loaded"],
            k["active_version"],
            if k["failed_closed"] == true {
                " (FAILED CLOSED)"
            } else {
                ""
            }
        );
    }
    if let Some(r) = v.get("key_rotation").filter(|r| !r.is_null()) {
        let sw = &r["sweep"];
        println!(
            "key rotation   : blocks by version {}{}, last rotation {} (unix), sweep {} {:.0} %{}",
            r["blocks_by_version"],
            if r["counts_exact"] == true {
                ""
            } else {
                " (counting)"
            },
            r["last_rotation_unix"],
            sw["state"].as_str().unwrap_or("?"),
            sw["progress"].as_f64().unwrap_or(0.0) * 100.0,
            match sw["eta_seconds"].as_f64() {
                Some(eta) if sw["state"] == "running" => format!(", eta {eta:.0} s"),
                _ => String::new(),
            }
        );
    }
    for e in v["exports"].as_array().into_iter().flatten() {
        println!(
            "export         : {} ({} bytes){}",
            e["name"].as_str().unwrap_or("?"),
            e["size"],
            if e["scrubbing"] == true {
                ", scrubbing"
            } else {
                ""
            }
        );
    }
    Ok(())
}
