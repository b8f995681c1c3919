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

use std::ffi::OsString;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;

/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "./ear-data";
/// Default Unix socket path.
pub const DEFAULT_SOCKET: &str = "./ear.sock";
/// Default socket file mode.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;
/// Name of the export created when none is configured.
pub const DEFAULT_EXPORT_NAME: &str = "default";
/// Size of the export created when none is configured (1 GiB).
pub const DEFAULT_EXPORT_SIZE: u64 = 1 << 30;
/// Largest export size accepted (2^50 bytes = 1 PiB).
pub const MAX_EXPORT_SIZE: u64 = 1 << 50;
/// Export sizes must be a multiple of this.
pub const EXPORT_SIZE_ALIGN: u64 = 512;
/// Longest export name, in bytes.
pub const MAX_EXPORT_NAME_LEN: usize = 64;
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

// ---------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------

/// The `ear-sidecar` command line.
#[derive(Debug, Parser)]
#[command(
    name = "ear-sidecar",
    version,
    about = "Encryption-at-rest sidecar: an NBD server on a Unix socket that stores only ciphertext",
    after_help = "Every `serve` option --some-name can also be set with the environment variable \
                  EAR_SOME_NAME (lists comma-separated) or with the key some_name in the TOML file \
                  given with --config. Precedence: command line > environment > file > default."
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once at start-up; boxing would only add noise
pub enum Command {
    /// Serve the exports over NBD on a Unix socket.
    Serve(ServeArgs),
    /// Show provider, key versions, exports and encryption mode of a data directory (never a secret).
    Status(StatusArgs),
    /// Check that an AWS KMS key is usable for EAR, without touching any data directory.
    ValidateKey(ValidateKeyArgs),
    /// Verify (and with --repair, repair) the backing files of a data directory offline.
    Check(CheckArgs),
}

/// `on` / `off` switch as written on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

/// Key provider kind as written on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KmsKind {
    /// KEK in a local file (development only: a KEK beside the data protects nothing).
    Local,
    /// Customer-managed key in AWS KMS.
    Aws,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Options of `ear-sidecar serve`, exactly as given on the command line
/// (`None` / empty = not given). Resolve with [`ServeConfig::load`].
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// TOML file with options (keys = long option names in snake_case) [env: EAR_CONFIG]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Data directory (key registry and backing files) [env: EAR_DATA_DIR] [default: ./ear-data]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Unix socket path; a stale socket there is replaced [env: EAR_SOCKET] [default: ./ear.sock]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// Socket file mode in octal: 600, 0600 or 0o600 [env: EAR_SOCKET_MODE] [default: 0600]
    #[arg(long, value_name = "OCTAL", value_parser = parse_socket_mode)]
    pub socket_mode: Option<u32>,

    /// Export NAME=SIZE, repeatable; SIZE in bytes or with K/M/G/T (1024-based), multiple of 512;
    /// created when missing, grown when larger [env: EAR_EXPORT, comma-separated]
    /// [default: default=1G]
    #[arg(long, value_name = "NAME=SIZE", value_parser = parse_export)]
    pub export: Vec<ExportSpec>,

    /// Encrypt data at rest; fixed when the data directory is initialised
    /// [env: EAR_ENCRYPTION] [default: on]
    #[arg(long, value_name = "on|off")]
    pub encryption: Option<OnOff>,

    /// Key provider that wraps the universe key [env: EAR_KMS] [default: local]
    #[arg(long, value_name = "local|aws")]
    pub kms: Option<KmsKind>,

    /// KEK file of the local provider, created 0600 [env: EAR_LOCAL_KEK_FILE]
    /// [default: <data-dir>/local.kek]
    #[arg(long, value_name = "PATH")]
    pub local_kek_file: Option<PathBuf>,

    /// AWS KMS key ARN (required with --kms aws) [env: EAR_KMS_KEY_ID]
    #[arg(long, value_name = "ARN")]
    pub kms_key_id: Option<String>,

    /// AWS KMS endpoint URL, e.g. for a local test server [env: EAR_KMS_ENDPOINT]
    /// [default: from the AWS configuration]
    #[arg(long, value_name = "URL")]
    pub kms_endpoint: Option<String>,

    /// AWS region [env: EAR_KMS_REGION] [default: from the key ARN or the AWS configuration]
    #[arg(long, value_name = "REGION")]
    pub kms_region: Option<String>,

    /// Give up start-up when the KMS cannot unwrap the key within this time
    /// [env: EAR_KMS_STARTUP_TIMEOUT] [default: 60s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub kms_startup_timeout: Option<Duration>,

    /// How often to check that the KMS key is still enabled (min 1s)
    /// [env: EAR_KMS_CHECK_INTERVAL] [default: 5m]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub kms_check_interval: Option<Duration>,

    /// How long to keep serving after the KMS reports the key disabled or pending deletion
    /// [env: EAR_KMS_REVOCATION_GRACE] [default: 5m]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub kms_revocation_grace: Option<Duration>,

    /// Allow only peers with this uid (SO_PEERCRED), repeatable [env: EAR_ALLOW_UID,
    /// comma-separated] [default: no uid filter]
    #[arg(long, value_name = "UID")]
    pub allow_uid: Vec<u32>,

    /// Longest request accepted, 4K..=1G; longer ones get an error reply
    /// [env: EAR_MAX_REQUEST] [default: 32M]
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_request: Option<u64>,

    /// Most concurrent client connections [env: EAR_MAX_CONNECTIONS] [default: 256]
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,

    /// Entries in the derived-key cache [env: EAR_KEY_CACHE_SIZE] [default: 1024]
    #[arg(long, value_name = "N")]
    pub key_cache_size: Option<usize>,

    /// Metrics and health HTTP address; empty disables [env: EAR_METRICS_ADDR]
    /// [default: 127.0.0.1:9898]
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<String>,

    /// Log format [env: EAR_LOG_FORMAT] [default: text]
    #[arg(long, value_name = "text|json")]
    pub log_format: Option<LogFormat>,

    /// Log filter (tracing EnvFilter syntax; RUST_LOG overrides) [env: EAR_LOG_LEVEL]
    /// [default: info]
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,

    /// Per-block authentication tags (requires encryption) [env: EAR_INTEGRITY] [default: off]
    #[arg(long, value_name = "on|off")]
    pub integrity: Option<OnOff>,

    /// TEST ONLY: block writes per key epoch (default 2^32), so tests can cross
    /// many epochs in seconds. Not a tuning knob.
    #[arg(long, hide = true, env = "EAR_EPOCH_WRITES", value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..=(1u64 << 32)))]
    pub epoch_writes: Option<u64>,
}

/// Options of `ear-sidecar check`.
#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    /// Data directory to check (no sidecar may be running on it)
    #[arg(long, value_name = "DIR", env = "EAR_DATA_DIR")]
    pub data_dir: PathBuf,

    /// Check only this export
    #[arg(long, value_name = "NAME")]
    pub export: Option<String>,

    /// Resolve what can be resolved (never inventing data) and record every
    /// change in <data-dir>/repairs.jsonl
    #[arg(long)]
    pub repair: bool,

    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,

    /// KEK file of the local provider [default: <data-dir>/local.kek]
    #[arg(long, value_name = "PATH", env = "EAR_LOCAL_KEK_FILE")]
    pub local_kek_file: Option<PathBuf>,

    /// AWS KMS endpoint URL [default: from the AWS configuration]
    #[arg(long, value_name = "URL", env = "EAR_KMS_ENDPOINT")]
    pub kms_endpoint: Option<String>,

    /// AWS region [default: from the key ARN or the AWS configuration]
    #[arg(long, value_name = "REGION", env = "EAR_KMS_REGION")]
    pub kms_region: Option<String>,
}

/// Options of `ear-sidecar status`.
#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// Data directory to describe
    #[arg(long, value_name = "DIR", env = "EAR_DATA_DIR")]
    pub data_dir: PathBuf,

    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,
}

/// Options of `ear-sidecar validate-key`.
#[derive(Debug, Clone, Args)]
pub struct ValidateKeyArgs {
    /// AWS KMS key ARN to validate
    #[arg(long, value_name = "ARN", env = "EAR_KMS_KEY_ID")]
    pub kms_key_id: String,

    /// AWS KMS endpoint URL [default: from the AWS configuration]
    #[arg(long, value_name = "URL", env = "EAR_KMS_ENDPOINT")]
    pub kms_endpoint: Option<String>,

    /// AWS region [default: from the key ARN or the AWS configuration]
    #[arg(long, value_name = "REGION", env = "EAR_KMS_REGION")]
    pub kms_region: Option<String>,

    /// Give up when the KMS does not answer within this time
    #[arg(long, value_name = "DURATION", env = "EAR_KMS_STARTUP_TIMEOUT",
          default_value = "60s", value_parser = parse_duration)]
    pub kms_startup_timeout: Duration,
}

impl ValidateKeyArgs {
    /// The AWS provider configuration these options describe, validated like `serve`'s.
    pub fn kms_config(&self) -> Result<KmsConfig, ConfigError> {
        let key_id = check_key_id(&self.kms_key_id)
            .map_err(|e| invalid("--kms-key-id", Origin::CommandLine, e))?;
        let endpoint = self
            .kms_endpoint
            .as_deref()
            .map(check_endpoint)
            .transpose()
            .map_err(|e| invalid("--kms-endpoint", Origin::CommandLine, e))?;
        let region = self
            .kms_region
            .as_deref()
            .map(check_region)
            .transpose()
            .map_err(|e| invalid("--kms-region", Origin::CommandLine, e))?;
        Ok(KmsConfig::Aws {
            key_id,
            endpoint,
            region,
        })
    }
}

// ---------------------------------------------------------------------------
// Resolved configuration
// ---------------------------------------------------------------------------

/// One export to serve: a validated name and a size in bytes
/// (non-zero, a multiple of 512, at most 2^50).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSpec {
    /// Export name: `[A-Za-z0-9._-]{1,64}`, no leading dot.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
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
    /// Exports, in the order given; never empty, names unique.
    pub exports: Vec<ExportSpec>,
    /// True when exports were configured; false when `exports` is only the
    /// built-in default (created in a fresh data directory, not forced on an
    /// existing one).
    pub exports_explicit: bool,
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
}

// ---------------------------------------------------------------------------
// TOML file
// ---------------------------------------------------------------------------

/// The `--config` TOML file. Keys are the long option names in snake_case;
/// unknown keys are rejected. Sizes may be integers (bytes) or strings
/// (`"32M"`), `socket_mode` an integer (`0o600`) or an octal string
/// (`"0600"`), on/off options a string or a boolean, durations strings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Path the file was read from (not a key).
    #[serde(skip)]
    pub path: PathBuf,
    /// `data_dir`
    pub data_dir: Option<PathBuf>,
    /// `socket`
    pub socket: Option<PathBuf>,
    /// `socket_mode`
    pub socket_mode: Option<IntOrString>,
    /// `export = ["name=SIZE", ...]`
    pub export: Option<Vec<String>>,
    /// `encryption`
    pub encryption: Option<BoolOrString>,
    /// `kms`
    pub kms: Option<String>,
    /// `local_kek_file`
    pub local_kek_file: Option<PathBuf>,
    /// `kms_key_id`
    pub kms_key_id: Option<String>,
    /// `kms_endpoint`
    pub kms_endpoint: Option<String>,
    /// `kms_region`
    pub kms_region: Option<String>,
    /// `kms_startup_timeout`
    pub kms_startup_timeout: Option<String>,
    /// `kms_check_interval`
    pub kms_check_interval: Option<String>,
    /// `kms_revocation_grace`
    pub kms_revocation_grace: Option<String>,
    /// `allow_uid = [1000, ...]`
    pub allow_uid: Option<Vec<u32>>,
    /// `max_request`
    pub max_request: Option<IntOrString>,
    /// `max_connections`
    pub max_connections: Option<u64>,
    /// `key_cache_size`
    pub key_cache_size: Option<u64>,
    /// `metrics_addr` (`""` disables)
    pub metrics_addr: Option<String>,
    /// `log_format`
    pub log_format: Option<String>,
    /// `log_level`
    pub log_level: Option<String>,
    /// `integrity`
    pub integrity: Option<BoolOrString>,
}

/// A TOML value that may be written as an integer or a string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IntOrString {
    /// Integer form.
    Int(u64),
    /// String form.
    Str(String),
}

/// A TOML value that may be written as a boolean or a string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BoolOrString {
    /// Boolean form (`true` = on).
    Bool(bool),
    /// String form (`"on"` / `"off"`).
    Str(String),
}

impl<'de> Deserialize<'de> for IntOrString {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = IntOrString;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a non-negative integer or a string")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<IntOrString, E> {
                Ok(IntOrString::Int(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<IntOrString, E> {
                u64::try_from(v)
                    .map(IntOrString::Int)
                    .map_err(|_| E::custom(format!("negative value {v}")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<IntOrString, E> {
                Ok(IntOrString::Str(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for BoolOrString {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = BoolOrString;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a boolean or \"on\"/\"off\"")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<BoolOrString, E> {
                Ok(BoolOrString::Bool(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<BoolOrString, E> {
                Ok(BoolOrString::Str(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

impl ConfigFile {
    /// Parses TOML text; `path` is only used in messages.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let mut file: ConfigFile = toml::from_str(text).map_err(|e| ConfigError::ParseFile {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        file.path = path.to_path_buf();
        Ok(file)
    }

    /// Reads and parses a TOML file.
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }
}

// ---------------------------------------------------------------------------
// Value parsers (shared by all three layers)
// ---------------------------------------------------------------------------

/// Parses a size: plain bytes, or a number with a 1024-based suffix
/// `K`/`M`/`G`/`T` (also `Ki`/`KiB`…, any case; `B` = bytes). No fractions.
/// Fails on empty input, unknown suffixes and overflow of `u64`; range checks
/// (non-zero, alignment, maximum) belong to the option using the size.
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let err = |reason: &str| ConfigError::Size {
        value: s.to_owned(),
        reason: reason.to_owned(),
    };
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(err(
            "expected a number of bytes, optionally followed by K, M, G or T",
        ));
    }
    let n: u64 = num.parse().map_err(|_| err("number too large"))?;
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "ki" | "kib" => 10,
        "m" | "mi" | "mib" => 20,
        "g" | "gi" | "gib" => 30,
        "t" | "ti" | "tib" => 40,
        _ => return Err(err("unknown suffix (use K, M, G or T, powers of 1024)")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| err("too large (overflows 64 bits)"))
}

/// Parses a duration: a whole number followed by `ms`, `s`, `m` or `h`
/// (e.g. `500ms`, `30s`, `5m`, `1h`). The unit is required (except for `0`);
/// at most 365 days.
pub fn parse_duration(s: &str) -> Result<Duration, ConfigError> {
    let err = |reason: &str| ConfigError::Duration {
        value: s.to_owned(),
        reason: reason.to_owned(),
    };
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(err(
            "expected a whole number followed by ms, s, m or h (e.g. 30s)",
        ));
    }
    let n: u64 = num.parse().map_err(|_| err("number too large"))?;
    let d = match unit.trim() {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        "h" => n.checked_mul(3600).map(Duration::from_secs),
        "" if n == 0 => Some(Duration::ZERO),
        "" => return Err(err("missing unit (ms, s, m or h)")),
        _ => return Err(err("unknown unit (use ms, s, m or h)")),
    };
    match d {
        Some(d) if d <= MAX_DURATION => Ok(d),
        _ => Err(err("too long (at most 365 days)")),
    }
}

/// Parses a socket mode in octal: `600`, `0600` or `0o600`; at most `0777`.
pub fn parse_socket_mode(s: &str) -> Result<u32, ConfigError> {
    let t = s.trim();
    let digits = t
        .strip_prefix("0o")
        .or_else(|| t.strip_prefix("0O"))
        .unwrap_or(t);
    if digits.is_empty() || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return Err(ConfigError::value(s, "expected an octal mode such as 0600"));
    }
    let mode = u32::from_str_radix(digits, 8)
        .map_err(|_| ConfigError::value(s, "expected an octal mode such as 0600"))?;
    check_socket_mode(mode).map_err(|reason| ConfigError::value(s, reason))
}

fn check_socket_mode(mode: u32) -> Result<u32, String> {
    if mode > 0o777 {
        return Err(format!(
            "mode {mode:#o} has bits beyond 0777 (only permission bits are allowed)"
        ));
    }
    if mode & 0o200 == 0 {
        return Err("the owner needs write permission to connect to the socket".to_owned());
    }
    Ok(mode)
}

/// Checks an export name: 1..=64 bytes of `[A-Za-z0-9._-]`, no leading dot.
pub fn validate_export_name(name: &str) -> Result<(), ConfigError> {
    let err = |reason: &str| ConfigError::ExportName {
        name: name.to_owned(),
        reason: reason.to_owned(),
    };
    if name.is_empty() {
        return Err(err("empty"));
    }
    if name.len() > MAX_EXPORT_NAME_LEN {
        return Err(err("longer than 64 bytes"));
    }
    if name.starts_with('.') {
        return Err(err("must not start with a dot"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(err("only letters, digits, '.', '_' and '-' are allowed"));
    }
    Ok(())
}

/// Checks an export size: non-zero, a multiple of 512, at most 2^50 bytes.
pub fn validate_export_size(size: u64) -> Result<(), String> {
    if size == 0 {
        Err("size must be greater than zero".to_owned())
    } else if !size.is_multiple_of(EXPORT_SIZE_ALIGN) {
        Err(format!("size {size} is not a multiple of 512 bytes"))
    } else if size > MAX_EXPORT_SIZE {
        Err(format!(
            "size {size} is larger than the maximum 2^50 bytes (1P)"
        ))
    } else {
        Ok(())
    }
}

/// Parses `NAME=SIZE` into a validated [`ExportSpec`].
pub fn parse_export(s: &str) -> Result<ExportSpec, ConfigError> {
    let err = |reason: String| ConfigError::Export {
        value: s.to_owned(),
        reason,
    };
    let (name, size) = s
        .trim()
        .split_once('=')
        .ok_or_else(|| err("expected NAME=SIZE, e.g. default=1G".to_owned()))?;
    let name = name.trim();
    validate_export_name(name).map_err(|e| err(e.to_string()))?;
    let size = parse_size(size).map_err(|e| err(e.to_string()))?;
    validate_export_size(size).map_err(err)?;
    Ok(ExportSpec {
        name: name.to_owned(),
        size,
    })
}

fn parse_on_off(s: &str) -> Result<OnOff, ConfigError> {
    OnOff::from_str(s.trim(), true).map_err(|_| ConfigError::value(s, "expected on or off"))
}

fn parse_kms_kind(s: &str) -> Result<KmsKind, ConfigError> {
    KmsKind::from_str(s.trim(), true).map_err(|_| ConfigError::value(s, "expected local or aws"))
}

fn parse_log_format(s: &str) -> Result<LogFormat, ConfigError> {
    LogFormat::from_str(s.trim(), true).map_err(|_| ConfigError::value(s, "expected text or json"))
}

fn parse_uint<T: std::str::FromStr>(s: &str) -> Result<T, ConfigError> {
    s.trim()
        .parse()
        .map_err(|_| ConfigError::value(s, "expected a non-negative integer"))
}

fn parse_uid_list(s: &str) -> Result<Vec<u32>, ConfigError> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(parse_uint::<u32>)
        .collect()
}

fn parse_export_list(s: &str) -> Result<Vec<ExportSpec>, ConfigError> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(parse_export)
        .collect()
}

fn parse_metrics_addr(s: &str) -> Result<Option<SocketAddr>, ConfigError> {
    let t = s.trim();
    if t.is_empty() {
        return Ok(None);
    }
    t.parse().map(Some).map_err(|_| {
        ConfigError::value(
            s,
            "expected IP:PORT (e.g. 127.0.0.1:9898), or empty to disable",
        )
    })
}

fn check_log_level(s: &str) -> Result<String, ConfigError> {
    tracing_subscriber::EnvFilter::try_new(s)
        .map(|_| s.to_owned())
        .map_err(|e| ConfigError::value(s, format!("not a valid log filter: {e}")))
}

fn check_key_id(s: &str) -> Result<String, ConfigError> {
    let t = s.trim();
    if t.is_empty() {
        return Err(ConfigError::value(s, "empty key id"));
    }
    if t.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ConfigError::value(s, "key id contains whitespace"));
    }
    Ok(t.to_owned())
}

fn check_endpoint(s: &str) -> Result<String, ConfigError> {
    let t = s.trim();
    let rest = t
        .strip_prefix("https://")
        .or_else(|| t.strip_prefix("http://"))
        .ok_or_else(|| ConfigError::value(s, "expected an http:// or https:// URL"))?;
    if rest.is_empty() || rest.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ConfigError::value(
            s,
            "expected an http:// or https:// URL with a host",
        ));
    }
    Ok(t.to_owned())
}

fn check_region(s: &str) -> Result<String, ConfigError> {
    let t = s.trim();
    if t.is_empty()
        || !t
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(ConfigError::value(
            s,
            "expected a region name such as eu-west-1",
        ));
    }
    Ok(t.to_owned())
}

fn on_off_from_file(v: &BoolOrString) -> Result<OnOff, ConfigError> {
    match v {
        BoolOrString::Bool(true) => Ok(OnOff::On),
        BoolOrString::Bool(false) => Ok(OnOff::Off),
        BoolOrString::Str(s) => parse_on_off(s),
    }
}

fn size_from_file(v: &IntOrString) -> Result<u64, ConfigError> {
    match v {
        IntOrString::Int(n) => Ok(*n),
        IntOrString::Str(s) => parse_size(s),
    }
}

fn mode_from_file(v: &IntOrString) -> Result<u32, ConfigError> {
    match v {
        IntOrString::Int(n) => {
            let mode = u32::try_from(*n).unwrap_or(u32::MAX);
            check_socket_mode(mode).map_err(|reason| {
                ConfigError::value(
                    n.to_string(),
                    format!("{reason}; write octal as 0o600 or \"0600\""),
                )
            })
        }
        IntOrString::Str(s) => parse_socket_mode(s),
    }
}

fn invalid(option: &'static str, origin: Origin, source: ConfigError) -> ConfigError {
    ConfigError::Invalid {
        option,
        origin,
        source: Box::new(source),
    }
}

/// Environment variable for a long option: `--data-dir` → `EAR_DATA_DIR`.
pub fn env_var_name(option: &str) -> String {
    let bare = option.trim_start_matches('-');
    let mut name = String::with_capacity(ENV_PREFIX.len() + bare.len());
    name.push_str(ENV_PREFIX);
    name.extend(bare.chars().map(|c| {
        if c == '-' {
            '_'
        } else {
            c.to_ascii_uppercase()
        }
    }));
    name
}

fn file_key(option: &str) -> String {
    option.trim_start_matches('-').replace('-', "_")
}

// ---------------------------------------------------------------------------
// Layering
// ---------------------------------------------------------------------------

/// A value with the layer it came from.
struct Sourced<T> {
    value: T,
    origin: Origin,
}

/// The environment and file layers.
struct Layers<'a> {
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
    fn pick<T>(
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

fn utf8(os: OsString) -> Result<String, ConfigError> {
    os.into_string()
        .map_err(|os| ConfigError::value(os.to_string_lossy().into_owned(), "not valid UTF-8"))
}

fn or_default<T>(v: Option<Sourced<T>>, default: impl FnOnce() -> T) -> Sourced<T> {
    v.unwrap_or_else(|| Sourced {
        value: default(),
        origin: Origin::Default,
    })
}

fn non_empty<T>(v: Vec<T>) -> Option<Vec<T>> {
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
        let exports_explicit = matches!(&exports, Some(Sourced { value, .. }) if !value.is_empty());
        let exports = match exports {
            Some(Sourced { value, origin }) if !value.is_empty() => {
                for (i, e) in value.iter().enumerate() {
                    if value.iter().take(i).any(|p| p.name == e.name) {
                        return Err(ConfigError::DuplicateExport {
                            name: e.name.clone(),
                            origin,
                        });
                    }
                }
                value
            }
            _ => vec![ExportSpec {
                name: DEFAULT_EXPORT_NAME.to_owned(),
                size: DEFAULT_EXPORT_SIZE,
            }],
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
            kms_kind,
            local_kek_file,
            key_id,
            endpoint,
            region,
            &data_dir.value,
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
            exports,
            exports_explicit,
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
        })
    }
}

fn u64_to_usize(n: u64) -> Result<usize, ConfigError> {
    usize::try_from(n).map_err(|_| ConfigError::value(n.to_string(), "too large"))
}

/// Re-validates a command-line string value (clap does not check these).
fn recheck(
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

fn resolve_kms(
    encryption: &Sourced<OnOff>,
    kind: Option<Sourced<KmsKind>>,
    local_kek_file: Option<Sourced<PathBuf>>,
    key_id: Option<Sourced<String>>,
    endpoint: Option<Sourced<String>>,
    region: Option<Sourced<String>>,
    data_dir: &Path,
) -> Result<Option<KmsConfig>, ConfigError> {
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
            let kek_file = local_kek_file
                .map(|s| s.value)
                .unwrap_or_else(|| data_dir.join(DEFAULT_LOCAL_KEK_FILE_NAME));
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn no_env(_: &str) -> Option<OsString> {
        None
    }

    fn serve_args(argv: &[&str]) -> ServeArgs {
        let mut full = vec!["ear-sidecar", "serve"];
        full.extend_from_slice(argv);
        match Cli::try_parse_from(full) {
            Ok(Cli {
                command: Command::Serve(a),
            }) => a,
            Ok(other) => panic!("not serve: {other:?}"),
            Err(e) => panic!("parse failed: {e}"),
        }
    }

    fn resolve(
        argv: &[&str],
        env: &[(&str, &str)],
        toml: Option<&str>,
    ) -> Result<ServeConfig, ConfigError> {
        let args = serve_args(argv);
        let map: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let lookup = move |k: &str| map.get(k).map(OsString::from);
        let file = toml
            .map(|t| ConfigFile::parse(Path::new("test.toml"), t))
            .transpose()?;
        ServeConfig::resolve(&args, &lookup, file.as_ref())
    }

    fn err_text(r: Result<ServeConfig, ConfigError>) -> String {
        match r {
            Ok(c) => panic!("expected an error, got {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("0").unwrap(), 0);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("4K").unwrap(), 4096);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("4KiB").unwrap(), 4096);
        assert_eq!(parse_size("4kib").unwrap(), 4096);
        assert_eq!(parse_size("32M").unwrap(), 32 << 20);
        assert_eq!(parse_size("32MiB").unwrap(), 32 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("1 GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("2T").unwrap(), 2 << 40);
        assert_eq!(parse_size("7b").unwrap(), 7);
        assert_eq!(parse_size("16777215T").unwrap(), 16_777_215u64 << 40);
        for bad in [
            "",
            "K",
            "-1",
            "1.5G",
            "1X",
            "1KB",
            "G1",
            "18446744073709551616",
            "16777216T1",
        ] {
            assert!(parse_size(bad).is_err(), "{bad} accepted");
        }
        // Overflow of the multiplication.
        let e = parse_size("16777216T").unwrap_err().to_string();
        assert!(e.contains("too large") && e.contains("16777216T"), "{e}");
    }

    #[test]
    fn export_sizes() {
        assert_eq!(
            parse_export("a=1G").unwrap(),
            ExportSpec {
                name: "a".into(),
                size: 1 << 30
            }
        );
        assert_eq!(parse_export("a=512").unwrap().size, 512);
        assert_eq!(parse_export("a=1024T").unwrap().size, 1 << 50);
        let zero = parse_export("a=0").unwrap_err().to_string();
        assert!(zero.contains("greater than zero"), "{zero}");
        let odd = parse_export("a=1000").unwrap_err().to_string();
        assert!(odd.contains("multiple of 512"), "{odd}");
        let big = parse_export("a=1025T").unwrap_err().to_string();
        assert!(big.contains("maximum"), "{big}");
        assert!(parse_export("a").is_err());
        assert!(parse_export("a=").is_err());
        assert!(parse_export("=1G").is_err());
    }

    #[test]
    fn export_names() {
        for good in ["default", "a", "A-b_c.d", "x.", &"n".repeat(64)] {
            validate_export_name(good).unwrap();
        }
        let long = "n".repeat(65);
        for bad in [
            "",
            ".hidden",
            "..",
            "a/b",
            "../x",
            "a b",
            "é",
            "a,b",
            "a=b",
            long.as_str(),
        ] {
            assert!(validate_export_name(bad).is_err(), "{bad:?} accepted");
        }
        let e = err_text(resolve(&[], &[("EAR_EXPORT", "ok=1G,../etc=1G")], None));
        assert!(
            e.contains("--export") && e.contains("EAR_EXPORT") && e.contains("../etc"),
            "{e}"
        );
        assert!(Cli::try_parse_from(["ear-sidecar", "serve", "--export", ".x=1G"]).is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("8760h").unwrap(), MAX_DURATION);
        for bad in [
            "",
            "s",
            "5",
            "1.5s",
            "5d",
            "5 min",
            "-1s",
            "8761h",
            "99999999999999999999s",
            "307445734561825861h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn socket_modes() {
        assert_eq!(parse_socket_mode("600").unwrap(), 0o600);
        assert_eq!(parse_socket_mode("0600").unwrap(), 0o600);
        assert_eq!(parse_socket_mode("0o660").unwrap(), 0o660);
        for bad in ["", "0o", "800", "1777", "abc", "0400"] {
            assert!(parse_socket_mode(bad).is_err(), "{bad} accepted");
        }
        let c = resolve(&[], &[], Some("socket_mode = 0o660")).unwrap();
        assert_eq!(c.socket_mode, 0o660);
        let c = resolve(&[], &[], Some("socket_mode = \"0640\"")).unwrap();
        assert_eq!(c.socket_mode, 0o640);
        assert!(resolve(&[], &[], Some("socket_mode = 600")).is_err());
    }

    #[test]
    fn defaults() {
        let c = resolve(&[], &[], None).unwrap();
        assert_eq!(
            c,
            ServeConfig {
                config_file: None,
                data_dir: PathBuf::from("./ear-data"),
                socket: PathBuf::from("./ear.sock"),
                socket_mode: 0o600,
                exports: vec![ExportSpec {
                    name: "default".into(),
                    size: 1 << 30
                }],
                exports_explicit: false,
                encryption: Encryption::On,
                kms: Some(KmsConfig::Local {
                    kek_file: PathBuf::from("./ear-data/local.kek")
                }),
                kms_startup_timeout: Duration::from_secs(60),
                kms_check_interval: Duration::from_secs(300),
                kms_revocation_grace: Duration::from_secs(300),
                allow_uids: vec![],
                max_request: 32 << 20,
                max_connections: 256,
                key_cache_size: NonZeroUsize::new(1024).unwrap(),
                metrics_addr: Some("127.0.0.1:9898".parse().unwrap()),
                log_format: LogFormat::Text,
                log_level: "info".into(),
                integrity: false,
            }
        );
        // The KEK default follows the resolved data dir.
        let c = resolve(&["--data-dir", "/d"], &[], None).unwrap();
        assert_eq!(
            c.kms,
            Some(KmsConfig::Local {
                kek_file: PathBuf::from("/d/local.kek")
            })
        );
    }

    #[test]
    fn precedence_cli_env_file_default() {
        let toml = r#"
            data_dir = "/file"
            socket = "/file.sock"
            max_connections = 7
            log_format = "json"
            export = ["f=1G"]
            allow_uid = [3]
        "#;
        let env = [
            ("EAR_DATA_DIR", "/env"),
            ("EAR_MAX_CONNECTIONS", "8"),
            ("EAR_EXPORT", "e1=1M, e2=2M"),
        ];
        // All four layers at once: data_dir from CLI, max_connections/export
        // from env, socket/log_format/allow_uid from file, the rest default.
        let c = resolve(&["--data-dir", "/cli"], &env, Some(toml)).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/cli"));
        assert_eq!(c.max_connections, 8);
        assert_eq!(
            c.exports
                .iter()
                .map(|e| e.name.as_str())
                .collect::<Vec<_>>(),
            ["e1", "e2"]
        );
        assert_eq!(c.socket, PathBuf::from("/file.sock"));
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.allow_uids, [3]);
        assert_eq!(c.key_cache_size.get(), 1024);
        assert_eq!(c.config_file, Some(PathBuf::from("test.toml")));
        // Env over file.
        let c = resolve(&[], &env, Some(toml)).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/env"));
        // File over default.
        let c = resolve(&[], &[], Some(toml)).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/file"));
        assert_eq!(c.max_connections, 7);
        assert_eq!(c.exports, [parse_export("f=1G").unwrap()]);
        // CLI lists replace env lists; repeated flags accumulate.
        let c = resolve(
            &[
                "--export",
                "c=1M",
                "--export",
                "d=1M",
                "--allow-uid",
                "5",
                "--allow-uid",
                "4",
            ],
            &env,
            Some(toml),
        )
        .unwrap();
        assert_eq!(c.exports.len(), 2);
        assert_eq!(c.exports[0].name, "c");
        assert_eq!(c.allow_uids, [4, 5]);
        // An empty env var counts as unset.
        let c = resolve(&[], &[("EAR_DATA_DIR", "")], Some(toml)).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/file"));
    }

    #[test]
    fn env_values_are_validated_with_origin() {
        let e = err_text(resolve(&[], &[("EAR_MAX_REQUEST", "2G")], None));
        assert!(
            e.contains("--max-request") && e.contains("EAR_MAX_REQUEST"),
            "{e}"
        );
        let e = err_text(resolve(&[], &[("EAR_ENCRYPTION", "maybe")], None));
        assert!(e.contains("--encryption") && e.contains("maybe"), "{e}");
        let e = err_text(resolve(&[], &[], Some("max_request = \"1K\"")));
        assert!(e.contains("max_request") && e.contains("test.toml"), "{e}");
        let e = err_text(resolve(&["--max-request", "2K"], &[], None));
        assert!(
            e.contains("--max-request") && e.contains("command line"),
            "{e}"
        );
        assert_eq!(
            resolve(&[], &[("EAR_MAX_REQUEST", "1G")], None)
                .unwrap()
                .max_request,
            1 << 30
        );
        assert!(resolve(&[], &[("EAR_KEY_CACHE_SIZE", "0")], None).is_err());
        assert!(resolve(&["--max-connections", "0"], &[], None).is_err());
        assert!(resolve(&[], &[("EAR_KMS_CHECK_INTERVAL", "500ms")], None).is_err());
        assert!(resolve(&[], &[("EAR_KMS_STARTUP_TIMEOUT", "0")], None).is_err());
        assert!(resolve(&[], &[("EAR_LOG_LEVEL", "info,[[[")], None).is_err());
        assert_eq!(
            resolve(&[], &[("EAR_LOG_LEVEL", "warn,ear_sidecar=debug")], None)
                .unwrap()
                .log_level,
            "warn,ear_sidecar=debug"
        );
        let c = resolve(&[], &[("EAR_ALLOW_UID", "1000,0,1000")], None).unwrap();
        assert_eq!(c.allow_uids, [0, 1000]);
        assert!(resolve(&[], &[("EAR_ALLOW_UID", "-1")], None).is_err());
    }

    #[test]
    fn metrics_addr_empty_disables() {
        assert_eq!(
            resolve(&["--metrics-addr", ""], &[], None)
                .unwrap()
                .metrics_addr,
            None
        );
        assert_eq!(
            resolve(&[], &[("EAR_METRICS_ADDR", "")], None)
                .unwrap()
                .metrics_addr,
            None
        );
        assert_eq!(
            resolve(&[], &[], Some("metrics_addr = \"\""))
                .unwrap()
                .metrics_addr,
            None
        );
        assert_eq!(
            resolve(&[], &[("EAR_METRICS_ADDR", "[::1]:9000")], None)
                .unwrap()
                .metrics_addr,
            Some("[::1]:9000".parse().unwrap())
        );
        let e = err_text(resolve(&["--metrics-addr", "localhost"], &[], None));
        assert!(
            e.contains("--metrics-addr") && e.contains("localhost"),
            "{e}"
        );
    }

    #[test]
    fn toml_unknown_key_rejected() {
        let e = ConfigFile::parse(
            Path::new("x.toml"),
            "data_dir = \"/d\"\nexprot = [\"a=1G\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("exprot") && e.contains("x.toml"), "{e}");
        // `config` and `path` are not file keys either.
        assert!(ConfigFile::parse(Path::new("x"), "config = \"y\"").is_err());
        assert!(ConfigFile::parse(Path::new("x"), "path = \"y\"").is_err());
        // Wrong type names the key.
        let e = ConfigFile::parse(Path::new("x"), "allow_uid = \"1000\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("allow_uid"), "{e}");
    }

    #[test]
    fn toml_value_forms() {
        let c = resolve(
            &[],
            &[],
            Some("max_request = 65536\nencryption = true\nintegrity = \"on\"\nkms_revocation_grace = \"0\""),
        )
        .unwrap();
        assert_eq!(c.max_request, 65536);
        assert_eq!(c.encryption, Encryption::On);
        assert!(c.integrity);
        assert_eq!(c.kms_revocation_grace, Duration::ZERO);
        assert!(resolve(&[], &[], Some("max_request = -1")).is_err());
    }

    #[test]
    fn load_reads_config_file_from_cli_or_env() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ear.toml");
        std::fs::write(&path, "data_dir = \"/from-file\"\n").unwrap();
        let p = path.to_str().unwrap();
        let args = serve_args(&["--config", p]);
        let c = ServeConfig::load(&args, &no_env).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/from-file"));
        assert_eq!(c.config_file.as_deref(), Some(path.as_path()));
        let env = |k: &str| (k == "EAR_CONFIG").then(|| OsString::from(p));
        let c = ServeConfig::load(&serve_args(&[]), &env).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/from-file"));
        let missing = serve_args(&["--config", "/nonexistent/ear.toml"]);
        let e = ServeConfig::load(&missing, &no_env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/ear.toml"), "{e}");
    }

    #[test]
    fn duplicate_export_rejected() {
        let e = err_text(resolve(
            &["--export", "a=1G", "--export", "a=2G"],
            &[],
            None,
        ));
        assert!(e.contains("'a'") && e.contains("twice"), "{e}");
        assert!(resolve(&[], &[("EAR_EXPORT", "a=1G,b=1G,a=1G")], None).is_err());
        assert!(resolve(&[], &[], Some("export = [\"x=1G\", \"x=1G\"]")).is_err());
    }

    #[test]
    fn kms_rules() {
        let e = err_text(resolve(&["--kms", "aws"], &[], None));
        assert!(e.contains("--kms-key-id"), "{e}");
        let arn = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";
        let c = resolve(
            &["--kms", "aws", "--kms-endpoint", "http://127.0.0.1:5000"],
            &[("EAR_KMS_KEY_ID", arn)],
            Some("kms_region = \"eu-west-1\""),
        )
        .unwrap();
        assert_eq!(
            c.kms,
            Some(KmsConfig::Aws {
                key_id: arn.into(),
                endpoint: Some("http://127.0.0.1:5000".into()),
                region: Some("eu-west-1".into())
            })
        );
        // Key id with encryption off.
        let e = err_text(resolve(
            &["--encryption", "off", "--kms-key-id", arn],
            &[],
            None,
        ));
        assert!(e.contains("--kms-key-id") && e.contains("off"), "{e}");
        assert!(resolve(&["--encryption", "off", "--kms", "aws"], &[], None).is_err());
        // Key id with the local provider.
        let e = err_text(resolve(&[], &[("EAR_KMS_KEY_ID", arn)], None));
        assert!(
            e.contains("--kms-key-id") && e.contains("EAR_KMS_KEY_ID"),
            "{e}"
        );
        assert!(resolve(
            &[
                "--kms",
                "aws",
                "--kms-key-id",
                arn,
                "--local-kek-file",
                "/k"
            ],
            &[],
            None
        )
        .is_err());
        assert!(resolve(
            &[
                "--kms",
                "aws",
                "--kms-key-id",
                arn,
                "--kms-endpoint",
                "ftp://x"
            ],
            &[],
            None
        )
        .is_err());
        assert!(resolve(&["--kms", "aws", "--kms-key-id", " "], &[], None).is_err());
        // Encryption off: no provider at all.
        let c = resolve(&["--encryption", "off"], &[], None).unwrap();
        assert_eq!((c.encryption, c.kms), (Encryption::Off, None));
        assert!(resolve(&["--encryption", "off", "--integrity", "on"], &[], None).is_err());
        let c = resolve(&["--local-kek-file", "/k"], &[], None).unwrap();
        assert_eq!(
            c.kms,
            Some(KmsConfig::Local {
                kek_file: PathBuf::from("/k")
            })
        );
    }

    #[test]
    fn other_subcommands() {
        let c =
            Cli::try_parse_from(["ear-sidecar", "status", "--data-dir", "/d", "--json"]).unwrap();
        match c.command {
            Command::Status(s) => {
                assert_eq!(s.data_dir, PathBuf::from("/d"));
                assert!(s.json);
            }
            other => panic!("{other:?}"),
        }
        let c = Cli::try_parse_from([
            "ear-sidecar",
            "validate-key",
            "--kms-key-id",
            "arn:aws:kms:us-east-1:111122223333:key/x",
            "--kms-region",
            "us-east-1",
        ])
        .unwrap();
        match c.command {
            Command::ValidateKey(v) => {
                assert_eq!(v.kms_startup_timeout, Duration::from_secs(60));
                assert!(
                    matches!(v.kms_config().unwrap(), KmsConfig::Aws { region: Some(r), .. } if r == "us-east-1")
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["ear-sidecar", "serve", "--bogus"]).is_err());
        assert!(Cli::try_parse_from(["ear-sidecar", "serve", "--encryption", "maybe"]).is_err());
    }

    #[test]
    fn help_documents_env_and_defaults() {
        use clap::CommandFactory;
        let mut cmd = Cli::command();
        cmd.clone().debug_assert();
        let serve = cmd.find_subcommand_mut("serve").unwrap();
        let help = serve.render_long_help().to_string();
        for needle in [
            "EAR_DATA_DIR",
            "./ear-data",
            "EAR_EXPORT",
            "default=1G",
            "EAR_METRICS_ADDR",
            "127.0.0.1:9898",
            "EAR_KMS_REVOCATION_GRACE",
            "<data-dir>/local.kek",
        ] {
            assert!(help.contains(needle), "help lacks {needle}:\n{help}");
        }
    }

    #[test]
    fn env_var_names() {
        assert_eq!(env_var_name("--data-dir"), "EAR_DATA_DIR");
        assert_eq!(
            env_var_name("--kms-revocation-grace"),
            "EAR_KMS_REVOCATION_GRACE"
        );
    }
}
