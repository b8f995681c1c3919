//! The `serve` options of key rotation and the re-encryption sweep
//! (`--rotate-every`, `--reencrypt-rate`, `--retire-after-sweep`), layered
//! like every other option.

use std::time::Duration;

use super::layers::{or_default, Layers};
use super::*;

/// Default `--reencrypt-rate` in MiB/s (2048 blocks/s; 100 GiB in about
/// 3.6 h): the one rate whose median foreground 4 KiB random-write p99
/// stayed within 10 % of a paused sweep in every run of
/// `benches/sweep-p99.sh` (BENCHMARKS.md, "Key rotation sweep").
pub const DEFAULT_REENCRYPT_RATE_MIB: u64 = 8;
/// Largest `--reencrypt-rate` in MiB/s.
pub const MAX_REENCRYPT_RATE_MIB: u64 = 1 << 20;
/// Shortest `--rotate-every` (each rotation is a KMS call and a sweep).
pub const MIN_ROTATE_EVERY: Duration = Duration::from_secs(1);

/// Resolved rotation options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RotationConfig {
    /// Rotate the universe key on this period (`None`: only on request).
    pub rotate_every: Option<Duration>,
    /// Sweep rate limit in bytes per second (0 = unlimited).
    pub reencrypt_bytes_per_sec: u64,
    /// Retire unused older versions once the sweep is done.
    pub retire_after_sweep: bool,
}

impl Default for RotationConfig {
    fn default() -> Self {
        RotationConfig {
            rotate_every: None,
            reencrypt_bytes_per_sec: DEFAULT_REENCRYPT_RATE_MIB << 20,
            retire_after_sweep: false,
        }
    }
}

pub(super) fn resolve_rotation(
    l: &Layers<'_>,
    args: &RotationArgs,
) -> Result<RotationConfig, ConfigError> {
    let rotate_every = l.pick("--rotate-every", args.rotate_every, parse_duration, |f| {
        f.rotate_every.as_deref().map(parse_duration)
    })?;
    if let Some(r) = &rotate_every {
        if r.value < MIN_ROTATE_EVERY {
            return Err(invalid(
                "--rotate-every",
                r.origin.clone(),
                ConfigError::value(format!("{:?}", r.value), "must be at least 1s"),
            ));
        }
    }
    let rate = or_default(
        l.pick(
            "--reencrypt-rate",
            args.reencrypt_rate,
            parse_uint::<u64>,
            |f| f.reencrypt_rate.map(Ok),
        )?,
        || DEFAULT_REENCRYPT_RATE_MIB,
    );
    if rate.value > MAX_REENCRYPT_RATE_MIB {
        return Err(invalid(
            "--reencrypt-rate",
            rate.origin,
            ConfigError::value(
                rate.value.to_string(),
                format!("must be between 0 (unlimited) and {MAX_REENCRYPT_RATE_MIB} MiB/s"),
            ),
        ));
    }
    let retire = or_default(
        l.pick(
            "--retire-after-sweep",
            args.retire_after_sweep.then_some(OnOff::On),
            parse_on_off,
            |f| f.retire_after_sweep.as_ref().map(on_off_from_file),
        )?,
        || OnOff::Off,
    );
    Ok(RotationConfig {
        rotate_every: rotate_every.map(|r| r.value),
        reencrypt_bytes_per_sec: rate.value << 20,
        retire_after_sweep: retire.value == OnOff::On,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::ffi::OsString;

    fn resolve(argv: &[&str], env: &[(&str, &str)]) -> Result<RotationConfig, ConfigError> {
        let mut full = vec!["ear-sidecar", "serve"];
        full.extend_from_slice(argv);
        let cli = Cli::try_parse_from(full).unwrap();
        let Command::Serve(args) = cli.command else {
            unreachable!()
        };
        let env: Vec<(String, OsString)> = env
            .iter()
            .chain(&[("HOME", "/home/t")])
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        ServeConfig::load(&args, &|k| {
            env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        })
        .map(|c| c.rotation)
    }

    #[test]
    fn defaults_env_and_flags() {
        assert_eq!(resolve(&[], &[]).unwrap(), RotationConfig::default());
        let c = resolve(
            &[
                "--rotate-every",
                "2s",
                "--reencrypt-rate",
                "0",
                "--retire-after-sweep",
            ],
            &[],
        )
        .unwrap();
        assert_eq!(c.rotate_every, Some(Duration::from_secs(2)));
        assert_eq!(c.reencrypt_bytes_per_sec, 0);
        assert!(c.retire_after_sweep);
        let c = resolve(
            &[],
            &[
                ("EAR_ROTATE_EVERY", "1h"),
                ("EAR_REENCRYPT_RATE", "8"),
                ("EAR_RETIRE_AFTER_SWEEP", "on"),
            ],
        )
        .unwrap();
        assert_eq!(c.rotate_every, Some(Duration::from_secs(3600)));
        assert_eq!(c.reencrypt_bytes_per_sec, 8 << 20);
        assert!(c.retire_after_sweep);
        let e = resolve(&[], &[("EAR_ROTATE_EVERY", "10ms")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--rotate-every") && e.contains("at least 1s"),
            "{e}"
        );
        let e = resolve(&[], &[("EAR_REENCRYPT_RATE", "fast")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--reencrypt-rate"), "{e}");
    }
}
