//! Configuration: command line, environment and TOML file, resolved and
//! validated completely before anything binds or touches the data directory
//! (linkerd2-proxy style: a bad option is a start-up error, never a surprise
//! at the first request).
//!
//! Every `serve` option `--some-name` can come from four places, highest
//! precedence first:
//!
//! 1. the command line (`--some-name VALUE`);
//! 2. the environment (`EAR_SOME_NAME`; lists are comma-separated; an empty
//!    variable counts as unset, except `EAR_METRICS_ADDR=` which disables
//!    metrics);
//! 3. the TOML file given with `--config FILE` / `EAR_CONFIG` (key
//!    `some_name`; unknown keys are an error);
//! 4. the built-in default.
//!
//! List options (`--export`, `--allow-uid`) are taken whole from the highest
//! layer that sets them; layers are not merged.
//!
//! Clap parses the command line only (no clap `env` on `serve` options), and
//! [`ServeConfig::resolve`] takes the environment as an explicit lookup
//! function, so the layering is plain code that tests drive without touching
//! the process environment.

//!
//! Submodules: `cli` (clap), `env` (value parsers and variable names),
//! `file` (TOML), `layers` (precedence and validation).

mod cli;
mod env;
mod file;
mod layers;
mod rotation;
#[cfg(test)]
mod tests;

pub use cli::*;
pub use env::*;
pub use file::*;
pub use rotation::*;

use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::store::Exports;

/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "./ear-data";
/// Default Unix socket path.
pub const DEFAULT_SOCKET: &str = "./ear.sock";
/// Default socket file mode.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;
pub use crate::store::spec::{DEFAULT_EXPORT_NAME, DEFAULT_EXPORT_SIZE};
/// File name of the local KEK inside the data directory (default `--local-kek-file`).
pub const DEFAULT_LOCAL_KEK_FILE_NAME: &str = "local.kek";
/// Default `--kms-startup-timeout`.
pub const DEFAULT_KMS_STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Default `--kms-check-interval`.
pub const DEFAULT_KMS_CHECK_INTERVAL: Duration = Duration::from_secs(300);
/// Default `--kms-revocation-grace`.
pub const DEFAULT_KMS_REVOCATION_GRACE: Duration = Duration::from_secs(300);
/// Shortest `--kms-check-interval` (KMS request quotas are shared).
pub const MIN_KMS_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Longest duration [`parse_duration`] accepts (365 days).
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);
/// Default `--max-request` (32 MiB).
pub const DEFAULT_MAX_REQUEST: u32 = 32 << 20;
/// Smallest `--max-request` (4 KiB).
pub const MIN_MAX_REQUEST: u32 = 4 << 10;
/// Largest `--max-request` (1 GiB).
pub const MAX_MAX_REQUEST: u32 = 1 << 30;
/// Default `--max-connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// Largest `--max-connections`.
pub const MAX_MAX_CONNECTIONS: usize = 1 << 20;
/// Default `--key-cache-size`.
pub const DEFAULT_KEY_CACHE_SIZE: usize = 1024;
/// Largest `--key-cache-size`.
pub const MAX_KEY_CACHE_SIZE: usize = 1 << 24;
/// Default `--metrics-addr`.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9898";
/// Default `--log-level`.
pub const DEFAULT_LOG_LEVEL: &str = "info";
/// Prefix of every environment variable.
pub const ENV_PREFIX: &str = "EAR_";

/// Errors of the configuration layer. Each names the offending value; errors
/// about an option are wrapped in [`ConfigError::Invalid`], which names the
/// option and where its value came from.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A size that does not parse or is out of the representable range.
    #[error("invalid size '{value}': {reason}")]
    Size {
        /// The text given.
        value: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A duration that does not parse or is out of range.
    #[error("invalid duration '{value}': {reason}")]
    Duration {
        /// The text given.
        value: String,
        /// Why it was rejected.
        reason: String,
    },
    /// An export name that is not allowed.
    #[error("invalid export name '{name}': {reason}")]
    ExportName {
        /// The name given.
        name: String,
        /// Why it was rejected.
        reason: String,
    },
    /// An `NAME=SIZE` export specification that is not valid.
    #[error("invalid export '{value}': {reason}")]
    Export {
        /// The text given.
        value: String,
        /// Why it was rejected.
        reason: String,
    },
    /// Two exports with the same name.
    #[error("export '{name}' is given twice in --export ({origin})")]
    DuplicateExport {
        /// The repeated name.
        name: String,
        /// Where the export list came from.
        origin: Origin,
    },
    /// Any other invalid value (numbers, enums, addresses, modes…).
    #[error("invalid value '{value}': {reason}")]
    Value {
        /// The text given.
        value: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A value of one option was rejected; names the option and its origin.
    #[error("{option} ({origin}): {source}")]
    Invalid {
        /// Long flag, e.g. `--max-request`.
        option: &'static str,
        /// Where the value came from.
        origin: Origin,
        /// What was wrong with it.
        source: Box<ConfigError>,
    },
    /// Options that contradict each other, or a required option missing.
    #[error("{0}")]
    Conflict(String),
    /// The `--config` file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The `--config` file is not valid TOML for this schema (unknown key,
    /// wrong type…); the message names the key.
    #[error("invalid config file {}: {message}", path.display())]
    ParseFile {
        /// The file.
        path: PathBuf,
        /// The parser's message, naming the key and line.
        message: String,
    },
}

impl ConfigError {
    fn value(value: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Value {
            value: value.into(),
            reason: reason.into(),
        }
    }
}

/// Where a resolved value came from (for error messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Given on the command line.
    CommandLine,
    /// Taken from this environment variable.
    Env(String),
    /// Taken from this key of the TOML config file.
    File {
        /// The config file.
        path: PathBuf,
        /// The key in it.
        key: String,
    },
    /// The built-in default.
    Default,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::CommandLine => f.write_str("from the command line"),
            Origin::Env(var) => write!(f, "from environment variable {var}"),
            Origin::File { path, key } => {
                write!(f, "from key '{key}' of config file {}", path.display())
            }
            Origin::Default => f.write_str("built-in default"),
        }
    }
}

/// Whether data is encrypted at rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encryption {
    /// AES-256-CTR under derived per-file keys.
    On,
    /// Plaintext passthrough (same code paths, cipher removed), for measuring the cost of EAR.
    Off,
}

/// Which key provider wraps the universe key, and its settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KmsConfig {
    /// KEK in a local file.
    Local {
        /// Path of the KEK file.
        kek_file: PathBuf,
    },
    /// Customer-managed key in AWS KMS.
    Aws {
        /// Key ARN (or id/alias; full syntax is checked by the provider).
        key_id: String,
        /// Endpoint override (`http://` or `https://` URL).
        endpoint: Option<String>,
        /// Region override.
        region: Option<String>,
    },
}

/// The resolved, validated configuration of `ear-sidecar serve`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeConfig {
    /// The TOML file that was read, if any.
    pub config_file: Option<PathBuf>,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Unix socket path.
    pub socket: PathBuf,
    /// Socket file mode (permission bits only, `<= 0o777`).
    pub socket_mode: u32,
    /// Admin control socket (always mode 0600); `None` = disabled.
    pub admin_socket: Option<PathBuf>,
    /// Exports: configured ones in the order given (never empty, names
    /// unique), or the built-in default (created in a fresh data directory,
    /// not forced on an existing one).
    pub exports: Exports,
    /// Encryption mode.
    pub encryption: Encryption,
    /// Key provider: `Some` exactly when `encryption` is [`Encryption::On`].
    pub kms: Option<KmsConfig>,
    /// Bound on start-up KMS work (unwrap) before giving up.
    pub kms_startup_timeout: Duration,
    /// Period of the key-state (revocation) check; at least 1 s.
    pub kms_check_interval: Duration,
    /// Time to keep serving after the KMS reports the key revoked.
    pub kms_revocation_grace: Duration,
    /// Allowed peer uids, sorted and deduplicated; empty = no uid filter.
    pub allow_uids: Vec<u32>,
    /// Longest request length in bytes (4 KiB ..= 1 GiB).
    pub max_request: u32,
    /// Most concurrent connections (>= 1).
    pub max_connections: usize,
    /// Entries in the derived-key LRU cache.
    pub key_cache_size: NonZeroUsize,
    /// Metrics/health listener; `None` = disabled.
    pub metrics_addr: Option<SocketAddr>,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter directives (already checked to parse as a tracing `EnvFilter`).
    pub log_level: String,
    /// Per-block authentication tags (only with encryption on).
    pub integrity: bool,
    /// Test only: block writes per key epoch (`None`: the format's maximum).
    pub epoch_writes: Option<u64>,
    /// Key rotation schedule and the re-encryption sweep.
    pub rotation: RotationConfig,
}

/// Whether `path` lies inside `dir`, compared as absolute paths with `.` and
/// `..` resolved lexically (neither needs to exist) and, where they exist,
/// with symbolic links resolved.
pub fn path_is_within(path: &Path, dir: &Path) -> bool {
    fn normal(p: &Path) -> PathBuf {
        let abs = std::fs::canonicalize(p)
            .or_else(|_| std::path::absolute(p))
            .unwrap_or_else(|_| p.to_path_buf());
        let mut out = PathBuf::new();
        for c in abs.components() {
            match c {
                std::path::Component::ParentDir => {
                    out.pop();
                }
                std::path::Component::CurDir => {}
                other => out.push(other),
            }
        }
        out
    }
    // A file that does not exist yet: resolve its directory instead.
    let p = match (path.exists(), path.parent(), path.file_name()) {
        (false, Some(parent), Some(name)) => normal(parent).join(name),
        _ => normal(path),
    };
    p.starts_with(normal(dir))
}

/// Where the local KEK lives by default: outside any data directory, under
/// the user's configuration directory (`$XDG_CONFIG_HOME/ear-sidecar/` or
/// `~/.config/ear-sidecar/`), so a copied volume never carries its key.
/// `None` when neither variable is set.
pub fn default_local_kek_file(env: &dyn Fn(&str) -> Option<std::ffi::OsString>) -> Option<PathBuf> {
    let nonempty = |k: &str| env(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    let base =
        nonempty("XDG_CONFIG_HOME").or_else(|| nonempty("HOME").map(|h| h.join(".config")))?;
    Some(base.join("ear-sidecar").join(DEFAULT_LOCAL_KEK_FILE_NAME))
}
