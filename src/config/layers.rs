//! Layering: picks each option from the command line, the environment, the
//! file or the default, in that order, and validates the result into a
//! [`super::ServeConfig`].

use std::ffi::OsString;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};

use crate::store::Exports;

use super::*;

/// A value with the layer it came from.
pub(crate) struct Sourced<T> {
    pub(super) value: T,
    pub(super) origin: Origin,
}

/// The environment and file layers.
pub(crate) struct Layers<'a> {
    env: &'a dyn Fn(&str) -> Option<OsString>,
    file: Option<&'a ConfigFile>,
}

impl Layers<'_> {
    /// Raw environment value for an option; an empty variable counts as unset
    /// unless `keep_empty`.
    fn env_os(&self, option: &'static str, keep_empty: bool) -> Option<(OsString, Origin)> {
        let var = env_var_name(option);
        let v = (self.env)(&var)?;
        if v.is_empty() && !keep_empty {
            return None;
        }
        Some((v, Origin::Env(var)))
    }

    /// Picks the highest layer that sets `option`, parsing env/file text with
    /// the given functions. Parse errors name the option and origin.
    pub(super) fn pick<T>(
        &self,
        option: &'static str,
        cli: Option<T>,
        from_env: impl FnOnce(&str) -> Result<T, ConfigError>,
        from_file: impl FnOnce(&ConfigFile) -> Option<Result<T, ConfigError>>,
    ) -> Result<Option<Sourced<T>>, ConfigError> {
        self.pick_os(option, false, cli, |os| from_env(&utf8(os)?), from_file)
    }

    fn pick_os<T>(
        &self,
        option: &'static str,
        keep_empty_env: bool,
        cli: Option<T>,
        from_env: impl FnOnce(OsString) -> Result<T, ConfigError>,
        from_file: impl FnOnce(&ConfigFile) -> Option<Result<T, ConfigError>>,
    ) -> Result<Option<Sourced<T>>, ConfigError> {
        if let Some(value) = cli {
            return Ok(Some(Sourced {
                value,
                origin: Origin::CommandLine,
            }));
        }
        if let Some((raw, origin)) = self.env_os(option, keep_empty_env) {
            return match from_env(raw) {
                Ok(value) => Ok(Some(Sourced { value, origin })),
                Err(e) => Err(invalid(option, origin, e)),
            };
        }
        if let Some(file) = self.file {
            if let Some(result) = from_file(file) {
                let origin = Origin::File {
                    path: file.path.clone(),
                    key: file_key(option),
                };
                return match result {
                    Ok(value) => Ok(Some(Sourced { value, origin })),
                    Err(e) => Err(invalid(option, origin, e)),
                };
            }
        }
        Ok(None)
    }
}

pub(crate) fn utf8(os: OsString) -> Result<String, ConfigError> {
    os.into_string()
        .map_err(|os| ConfigError::value(os.to_string_lossy().into_owned(), "not valid UTF-8"))
}

pub(crate) fn or_default<T>(v: Option<Sourced<T>>, default: impl FnOnce() -> T) -> Sourced<T> {
    v.unwrap_or_else(|| Sourced {
        value: default(),
        origin: Origin::Default,
    })
}

pub(crate) fn non_empty<T>(v: Vec<T>) -> Option<Vec<T>> {
    if v.is_empty() {
        None
    } else {
        Some(v)
    }
}

impl ServeConfig {
    /// Resolves `serve` options against the process environment and the
    /// `--config` file. This is what `main` calls.
    pub fn from_process_env(args: &ServeArgs) -> Result<Self, ConfigError> {
        let names: Vec<String> = std::env::vars_os()
            .filter_map(|(k, _)| k.into_string().ok())
            .collect();
        check_env_names(names.iter().map(String::as_str))?;
        Self::load(args, &|name| std::env::var_os(name))
    }

    /// Like [`ServeConfig::from_process_env`] with an explicit environment
    /// lookup: finds the config file (`--config`, else `EAR_CONFIG`), reads it,
    /// then [`ServeConfig::resolve`]s.
    pub fn load(
        args: &ServeArgs,
        env: &dyn Fn(&str) -> Option<OsString>,
    ) -> Result<Self, ConfigError> {
        let layers = Layers { env, file: None };
        let path = layers.pick_os(
            "--config",
            false,
            args.config.clone(),
            |os| Ok(PathBuf::from(os)),
            |_| None,
        )?;
        let file = path.map(|p| ConfigFile::read(&p.value)).transpose()?;
        Self::resolve(args, env, file.as_ref())
    }

    /// Resolves and validates: command line > `env` > `file` > defaults.
    /// `args.config` is not read here (see [`ServeConfig::load`]).
    pub fn resolve(
        args: &ServeArgs,
        env: &dyn Fn(&str) -> Option<OsString>,
        file: Option<&ConfigFile>,
    ) -> Result<Self, ConfigError> {
        let l = Layers { env, file };

        let data_dir = or_default(
            l.pick_os(
                "--data-dir",
                false,
                args.data_dir.clone(),
                |os| Ok(PathBuf::from(os)),
                |f| f.data_dir.clone().map(Ok),
            )?,
            || PathBuf::from(DEFAULT_DATA_DIR),
        );
        let socket = or_default(
            l.pick_os(
                "--socket",
                false,
                args.socket.clone(),
                |os| Ok(PathBuf::from(os)),
                |f| f.socket.clone().map(Ok),
            )?,
            || PathBuf::from(DEFAULT_SOCKET),
        );
        let admin_socket = l.pick_os(
            "--admin-socket",
            true,
            args.admin_socket.clone(),
            |os| Ok(PathBuf::from(os)),
            |f| f.admin_socket.clone().map(Ok),
        )?;
        // Given but empty disables it; not given: beside the data socket.
        let admin_socket = match admin_socket {
            Some(s) if s.value.as_os_str().is_empty() => None,
            Some(s) => Some(s.value),
            None => Some(crate::control::default_path(&socket.value)),
        };
        let socket_mode = or_default(
            l.pick("--socket-mode", args.socket_mode, parse_socket_mode, |f| {
                f.socket_mode.as_ref().map(mode_from_file)
            })?,
            || DEFAULT_SOCKET_MODE,
        );

        // Exports: whole list from the highest layer; duplicates rejected.
        let exports = l.pick(
            "--export",
            non_empty(args.export.clone()),
            parse_export_list,
            |f| {
                f.export
                    .as_ref()
                    .map(|v| v.iter().map(|s| parse_export(s)).collect())
            },
        )?;
        let exports = match exports {
            Some(Sourced { value, origin }) if !value.is_empty() => {
                for (i, e) in value.iter().enumerate() {
                    if value.iter().take(i).any(|p| p.name == e.name) {
                        return Err(ConfigError::DuplicateExport {
                            name: e.name.to_string(),
                            origin,
                        });
                    }
                }
                Exports::Explicit(value)
            }
            _ => Exports::Default,
        };

        let encryption = or_default(
            l.pick("--encryption", args.encryption, parse_on_off, |f| {
                f.encryption.as_ref().map(on_off_from_file)
            })?,
            || OnOff::On,
        );
        let kms_kind = l.pick("--kms", args.kms, parse_kms_kind, |f| {
            f.kms.as_deref().map(parse_kms_kind)
        })?;
        let local_kek_file = l.pick_os(
            "--local-kek-file",
            false,
            args.local_kek_file.clone(),
            |os| Ok(PathBuf::from(os)),
            |f| f.local_kek_file.clone().map(Ok),
        )?;
        let insecure_kek = or_default(
            l.pick(
                "--insecure-kek-in-data-dir",
                args.insecure_kek_in_data_dir.then_some(OnOff::On),
                parse_on_off,
                |f| f.insecure_kek_in_data_dir.as_ref().map(on_off_from_file),
            )?,
            || OnOff::Off,
        );
        let key_id = l.pick("--kms-key-id", args.kms_key_id.clone(), check_key_id, |f| {
            f.kms_key_id.as_deref().map(check_key_id)
        })?;
        let endpoint = l.pick(
            "--kms-endpoint",
            args.kms_endpoint.clone(),
            check_endpoint,
            |f| f.kms_endpoint.as_deref().map(check_endpoint),
        )?;
        let region = l.pick("--kms-region", args.kms_region.clone(), check_region, |f| {
            f.kms_region.as_deref().map(check_region)
        })?;
        // Command-line values of these were only syntax-checked by clap.
        let key_id = recheck(key_id, "--kms-key-id", check_key_id)?;
        let endpoint = recheck(endpoint, "--kms-endpoint", check_endpoint)?;
        let region = recheck(region, "--kms-region", check_region)?;

        let kms = resolve_kms(
            &encryption,
            KmsInputs {
                kind: kms_kind,
                local_kek_file,
                insecure_kek: insecure_kek.value == OnOff::On,
                key_id,
                endpoint,
                region,
            },
            &data_dir.value,
            env,
        )?;

        let kms_startup_timeout = or_default(
            l.pick(
                "--kms-startup-timeout",
                args.kms_startup_timeout,
                parse_duration,
                |f| f.kms_startup_timeout.as_deref().map(parse_duration),
            )?,
            || DEFAULT_KMS_STARTUP_TIMEOUT,
        );
        if kms_startup_timeout.value.is_zero() {
            return Err(invalid(
                "--kms-startup-timeout",
                kms_startup_timeout.origin,
                ConfigError::value("0", "must be greater than zero"),
            ));
        }
        let kms_check_interval = or_default(
            l.pick(
                "--kms-check-interval",
                args.kms_check_interval,
                parse_duration,
                |f| f.kms_check_interval.as_deref().map(parse_duration),
            )?,
            || DEFAULT_KMS_CHECK_INTERVAL,
        );
        if kms_check_interval.value < MIN_KMS_CHECK_INTERVAL {
            return Err(invalid(
                "--kms-check-interval",
                kms_check_interval.origin,
                ConfigError::value(
                    format!("{:?}", kms_check_interval.value),
                    "must be at least 1s",
                ),
            ));
        }
        let kms_revocation_grace = or_default(
            l.pick(
                "--kms-revocation-grace",
                args.kms_revocation_grace,
                parse_duration,
                |f| f.kms_revocation_grace.as_deref().map(parse_duration),
            )?,
            || DEFAULT_KMS_REVOCATION_GRACE,
        );

        let allow_uids = l.pick(
            "--allow-uid",
            non_empty(args.allow_uid.clone()),
            parse_uid_list,
            |f| f.allow_uid.clone().map(Ok),
        )?;
        let mut allow_uids = allow_uids.map(|s| s.value).unwrap_or_default();
        allow_uids.sort_unstable();
        allow_uids.dedup();

        let max_request = or_default(
            l.pick("--max-request", args.max_request, parse_size, |f| {
                f.max_request.as_ref().map(size_from_file)
            })?,
            || u64::from(DEFAULT_MAX_REQUEST),
        );
        let max_request = u32::try_from(max_request.value)
            .ok()
            .filter(|v| (MIN_MAX_REQUEST..=MAX_MAX_REQUEST).contains(v))
            .ok_or_else(|| {
                invalid(
                    "--max-request",
                    max_request.origin.clone(),
                    ConfigError::value(
                        max_request.value.to_string(),
                        "must be between 4K (4096) and 1G (1073741824) bytes",
                    ),
                )
            })?;

        let max_connections = or_default(
            l.pick(
                "--max-connections",
                args.max_connections,
                parse_uint::<usize>,
                |f| f.max_connections.map(u64_to_usize),
            )?,
            || DEFAULT_MAX_CONNECTIONS,
        );
        if !(1..=MAX_MAX_CONNECTIONS).contains(&max_connections.value) {
            return Err(invalid(
                "--max-connections",
                max_connections.origin,
                ConfigError::value(
                    max_connections.value.to_string(),
                    format!("must be between 1 and {MAX_MAX_CONNECTIONS}"),
                ),
            ));
        }

        let key_cache_size = or_default(
            l.pick(
                "--key-cache-size",
                args.key_cache_size,
                parse_uint::<usize>,
                |f| f.key_cache_size.map(u64_to_usize),
            )?,
            || DEFAULT_KEY_CACHE_SIZE,
        );
        let key_cache_size = NonZeroUsize::new(key_cache_size.value)
            .filter(|n| n.get() <= MAX_KEY_CACHE_SIZE)
            .ok_or_else(|| {
                invalid(
                    "--key-cache-size",
                    key_cache_size.origin.clone(),
                    ConfigError::value(
                        key_cache_size.value.to_string(),
                        format!("must be between 1 and {MAX_KEY_CACHE_SIZE}"),
                    ),
                )
            })?;

        let metrics_addr = l.pick_os(
            "--metrics-addr",
            true,
            args.metrics_addr.as_deref().map(parse_metrics_addr),
            |os| parse_metrics_addr(&utf8(os)?).map(Ok),
            |f| f.metrics_addr.as_deref().map(|s| Ok(parse_metrics_addr(s))),
        )?;
        let metrics_addr = match metrics_addr {
            Some(Sourced {
                value: Ok(v),
                origin: _,
            }) => v,
            Some(Sourced {
                value: Err(e),
                origin,
            }) => return Err(invalid("--metrics-addr", origin, e)),
            None => parse_metrics_addr(DEFAULT_METRICS_ADDR)?,
        };

        let log_format = or_default(
            l.pick("--log-format", args.log_format, parse_log_format, |f| {
                f.log_format.as_deref().map(parse_log_format)
            })?,
            || LogFormat::Text,
        );
        let log_level = or_default(
            l.pick(
                "--log-level",
                args.log_level.clone(),
                |s| Ok(s.to_owned()),
                |f| f.log_level.clone().map(Ok),
            )?,
            || DEFAULT_LOG_LEVEL.to_owned(),
        );
        let log_level = check_log_level(&log_level.value)
            .map_err(|e| invalid("--log-level", log_level.origin.clone(), e))?;

        let integrity = or_default(
            l.pick("--integrity", args.integrity, parse_on_off, |f| {
                f.integrity.as_ref().map(on_off_from_file)
            })?,
            || OnOff::Off,
        );
        if integrity.value == OnOff::On && encryption.value == OnOff::Off {
            return Err(ConfigError::Conflict(format!(
                "--integrity on ({}) requires --encryption on (--encryption off {})",
                integrity.origin, encryption.origin
            )));
        }

        Ok(ServeConfig {
            config_file: file.map(|f| f.path.clone()),
            data_dir: data_dir.value,
            socket: socket.value,
            socket_mode: socket_mode.value,
            admin_socket,
            exports,
            encryption: match encryption.value {
                OnOff::On => Encryption::On,
                OnOff::Off => Encryption::Off,
            },
            kms,
            kms_startup_timeout: kms_startup_timeout.value,
            kms_check_interval: kms_check_interval.value,
            kms_revocation_grace: kms_revocation_grace.value,
            allow_uids,
            max_request,
            max_connections: max_connections.value,
            key_cache_size,
            metrics_addr,
            log_format: log_format.value,
            log_level,
            integrity: integrity.value == OnOff::On,
            epoch_writes: args.epoch_writes,
            rotation: resolve_rotation(&l, &args.rotation)?,
        })
    }
}

pub(crate) fn u64_to_usize(n: u64) -> Result<usize, ConfigError> {
    usize::try_from(n).map_err(|_| ConfigError::value(n.to_string(), "too large"))
}

/// Re-validates a command-line string value (clap does not check these).
pub(crate) fn recheck(
    v: Option<Sourced<String>>,
    option: &'static str,
    check: fn(&str) -> Result<String, ConfigError>,
) -> Result<Option<Sourced<String>>, ConfigError> {
    v.map(|s| match check(&s.value) {
        Ok(value) => Ok(Sourced {
            value,
            origin: s.origin,
        }),
        Err(e) => Err(invalid(option, s.origin, e)),
    })
    .transpose()
}

/// The key-provider options as resolved from the layers.
pub(crate) struct KmsInputs {
    pub(crate) kind: Option<Sourced<KmsKind>>,
    pub(crate) local_kek_file: Option<Sourced<PathBuf>>,
    pub(crate) insecure_kek: bool,
    pub(crate) key_id: Option<Sourced<String>>,
    pub(crate) endpoint: Option<Sourced<String>>,
    pub(crate) region: Option<Sourced<String>>,
}

pub(crate) fn resolve_kms(
    encryption: &Sourced<OnOff>,
    inputs: KmsInputs,
    data_dir: &Path,
    env: &dyn Fn(&str) -> Option<OsString>,
) -> Result<Option<KmsConfig>, ConfigError> {
    let KmsInputs {
        kind,
        local_kek_file,
        insecure_kek,
        key_id,
        endpoint,
        region,
    } = inputs;
    let conflict = |msg: String| Err(ConfigError::Conflict(msg));
    if encryption.value == OnOff::Off {
        let enc = &encryption.origin;
        if let Some(k) = kind.as_ref().filter(|k| k.value == KmsKind::Aws) {
            return conflict(format!(
                "--kms aws ({}) makes no sense with --encryption off ({enc})",
                k.origin
            ));
        }
        for (opt, origin) in [
            ("--kms-key-id", key_id.as_ref().map(|s| &s.origin)),
            ("--kms-endpoint", endpoint.as_ref().map(|s| &s.origin)),
            ("--kms-region", region.as_ref().map(|s| &s.origin)),
            (
                "--local-kek-file",
                local_kek_file.as_ref().map(|s| &s.origin),
            ),
        ] {
            if let Some(origin) = origin {
                return conflict(format!(
                    "{opt} ({origin}) is set but --encryption is off ({enc}); \
                     a plaintext data directory uses no key"
                ));
            }
        }
        return Ok(None);
    }
    let kind = or_default(kind, || KmsKind::Local);
    match kind.value {
        KmsKind::Local => {
            for (opt, origin) in [
                ("--kms-key-id", key_id.as_ref().map(|s| &s.origin)),
                ("--kms-endpoint", endpoint.as_ref().map(|s| &s.origin)),
                ("--kms-region", region.as_ref().map(|s| &s.origin)),
            ] {
                if let Some(origin) = origin {
                    return conflict(format!(
                        "{opt} ({origin}) requires --kms aws, but the key provider is local ({})",
                        kind.origin
                    ));
                }
            }
            let kek_file = match local_kek_file {
                Some(s) => s.value,
                None => default_local_kek_file(env).ok_or_else(|| {
                    ConfigError::Conflict(
                        "--kms local needs a place for its KEK outside the data directory, and \
                         neither XDG_CONFIG_HOME nor HOME is set: pass --local-kek-file PATH"
                            .into(),
                    )
                })?,
            };
            if !insecure_kek && path_is_within(&kek_file, data_dir) {
                return conflict(format!(
                    "--local-kek-file {} is inside the data directory {}: any copy of the \
                     volume would carry its own key. Keep the KEK elsewhere (the default is \
                     ~/.config/ear-sidecar/local.kek), or pass --insecure-kek-in-data-dir for \
                     a throwaway trial",
                    kek_file.display(),
                    data_dir.display()
                ));
            }
            Ok(Some(KmsConfig::Local { kek_file }))
        }
        KmsKind::Aws => {
            if let Some(k) = &local_kek_file {
                return conflict(format!(
                    "--local-kek-file ({}) is only used with --kms local, but --kms is aws ({})",
                    k.origin, kind.origin
                ));
            }
            let Some(key_id) = key_id else {
                return conflict(format!(
                    "--kms aws ({}) requires --kms-key-id ARN (or EAR_KMS_KEY_ID, or kms_key_id \
                     in the config file)",
                    kind.origin
                ));
            };
            Ok(Some(KmsConfig::Aws {
                key_id: key_id.value,
                endpoint: endpoint.map(|s| s.value),
                region: region.map(|s| s.value),
            }))
        }
    }
}

/// `EAR_*` variables that are not options: read by the test suite, never by
/// the server, and accepted so a test run can set them.
const NON_OPTION_ENV: [&str; 3] = ["EAR_TEST_SEED", "EAR_CRASH_SEED", "EAR_SKIP_MOTO"];

/// Every `EAR_*` variable `serve` reads: one per long option.
pub fn known_env_names() -> Vec<String> {
    use clap::CommandFactory;
    let cli = super::Cli::command();
    let mut names: Vec<String> = cli
        .find_subcommand("serve")
        .map(|serve| {
            serve
                .get_arguments()
                .filter_map(|a| a.get_long())
                .filter(|l| *l != "help")
                .map(env_var_name)
                .collect()
        })
        .unwrap_or_default();
    names.extend(NON_OPTION_ENV.iter().map(|s| s.to_string()));
    names
}

/// Refuses an `EAR_*` variable that no option reads: a misspelt variable
/// would otherwise be silently ignored (`EAR_ALLOW_UIDS` once left a socket
/// open to every uid). Names the closest known variable.
pub fn check_env_names<'a>(present: impl Iterator<Item = &'a str>) -> Result<(), ConfigError> {
    let known = known_env_names();
    for name in present.filter(|n| n.starts_with(ENV_PREFIX)) {
        if known.iter().any(|k| k == name) {
            continue;
        }
        let closest = known
            .iter()
            .min_by_key(|k| strsim::levenshtein(k, name))
            .cloned()
            .unwrap_or_default();
        return Err(ConfigError::Conflict(format!(
            "unknown environment variable {name}: no option reads it (did you mean {closest}?); \
             `ear-sidecar serve --help` lists every option and its variable"
        )));
    }
    Ok(())
}
