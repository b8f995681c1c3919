//! The command line: clap definitions of every subcommand and option. Only
//! parsing lives here; defaults and validation are applied by [`super::layers`].

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::store::ExportSpec;

use super::*;

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
    /// Take an encrypted point-in-time backup of an export (or list, prune, verify backups).
    Backup(BackupArgs),
    /// Restore a backup into a new data directory that a sidecar can serve.
    Restore(RestoreArgs),
    /// Universe-key lifecycle: offline under the directory lock, or online
    /// through a running sidecar's --admin-socket.
    #[command(subcommand)]
    Keys(KeysCommand),
}

/// `ear-sidecar keys ...`
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Re-wrap every universe-key version under a new AWS KMS CMK (also
    /// migrates a --kms local directory to AWS KMS); data blocks are untouched.
    Rewrap(RewrapArgs),
    /// Key versions, blocks per version and export, sweep progress.
    Status(KeysTarget),
    /// Make a new universe-key version active (online: the sweep re-encrypts in the
    /// background; offline: re-encrypts now).
    Rotate(KeysTarget),
    /// Remove key version N (refused while a block or header still uses it).
    Retire(RetireArgs),
    /// Pause or resume the re-encryption sweep.
    Sweep(SweepArgs),
    /// Encrypt a data directory initialised with --encryption off, online
    /// (reads and writes go on) or offline; encryption cannot be removed.
    Encrypt(EncryptArgs),
}

/// Options of `ear-sidecar keys encrypt`.
#[derive(Debug, Clone, Args)]
pub struct EncryptArgs {
    /// Key provider that will wrap the new universe key
    #[arg(long, value_name = "local|aws")]
    pub kms: KmsKind,

    /// AWS KMS key ARN (required with --kms aws)
    #[arg(long, value_name = "ARN")]
    pub kms_key_id: Option<String>,

    /// AWS KMS endpoint URL [default: from the AWS configuration]
    #[arg(long, value_name = "URL", env = "EAR_KMS_ENDPOINT")]
    pub kms_endpoint: Option<String>,

    /// AWS region [default: from the key ARN or the AWS configuration]
    #[arg(long, value_name = "REGION", env = "EAR_KMS_REGION")]
    pub kms_region: Option<String>,

    /// KEK file of the local provider, created 0600 when missing; refused
    /// inside the data directory [default: as for serve]
    #[arg(long, value_name = "PATH", env = "EAR_LOCAL_KEK_FILE")]
    pub local_kek_file: Option<PathBuf>,

    /// INSECURE, throwaway trials only: accept a local KEK inside the data directory
    #[arg(long)]
    pub insecure_kek_in_data_dir: bool,

    /// Encrypt online: the admin socket of the sidecar serving the directory
    #[arg(
        long,
        value_name = "PATH",
        env = "EAR_ADMIN_SOCKET",
        conflicts_with = "data_dir"
    )]
    pub admin_socket: Option<PathBuf>,

    /// Encrypt offline: the data directory (no sidecar may be running on it)
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Print one JSON object instead of the one-line summary
    #[arg(long)]
    pub json: bool,
}

/// Options of `ear-sidecar keys rewrap`.
#[derive(Debug, Clone, Args)]
pub struct RewrapArgs {
    /// Key provider to move the keys to (only aws)
    #[arg(long, value_name = "aws")]
    pub kms: KmsKind,

    /// ARN of the new AWS KMS CMK
    #[arg(long, value_name = "ARN")]
    pub kms_key_id: String,

    /// AWS KMS endpoint URL (for the old and the new CMK) [default: from the AWS configuration]
    #[arg(long, value_name = "URL", env = "EAR_KMS_ENDPOINT")]
    pub kms_endpoint: Option<String>,

    /// AWS region of the new CMK [default: from its ARN]
    #[arg(long, value_name = "REGION", env = "EAR_KMS_REGION")]
    pub kms_region: Option<String>,

    /// Rewrap online: the admin socket of the sidecar serving the directory
    #[arg(
        long,
        value_name = "PATH",
        env = "EAR_ADMIN_SOCKET",
        conflicts_with = "data_dir"
    )]
    pub admin_socket: Option<PathBuf>,

    /// Rewrap offline: the data directory (no sidecar may be running on it)
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// KEK file of a --kms local directory being migrated [default: as for serve]
    #[arg(long, value_name = "PATH", env = "EAR_LOCAL_KEK_FILE")]
    pub local_kek_file: Option<PathBuf>,

    /// Print one JSON object instead of the one-line summary
    #[arg(long)]
    pub json: bool,
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

    /// Admin control socket (mode 0600, same --allow-uid list) that `keys` and `backup` commands
    /// use to steer this sidecar; empty disables [env: EAR_ADMIN_SOCKET]
    /// [default: beside --socket, ear.sock -> ear.admin.sock]
    #[arg(long, value_name = "PATH", value_parser = path_or_empty)]
    pub admin_socket: Option<PathBuf>,

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

    /// KEK file of the local provider, created 0600; refused inside the data
    /// directory [env: EAR_LOCAL_KEK_FILE]
    /// [default: $XDG_CONFIG_HOME/ear-sidecar/local.kek or ~/.config/ear-sidecar/local.kek]
    #[arg(long, value_name = "PATH")]
    pub local_kek_file: Option<PathBuf>,

    /// INSECURE, throwaway trials only: accept a local KEK inside the data
    /// directory, where any copy of the volume carries its own key
    /// [env: EAR_INSECURE_KEK_IN_DATA_DIR]
    #[arg(long)]
    pub insecure_kek_in_data_dir: bool,

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
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true)]
    pub kms_startup_timeout: Option<Duration>,

    /// How often to check that the KMS key is still enabled (min 1s)
    /// [env: EAR_KMS_CHECK_INTERVAL] [default: 5m]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true)]
    pub kms_check_interval: Option<Duration>,

    /// How long to keep serving after the KMS reports the key disabled or pending deletion
    /// [env: EAR_KMS_REVOCATION_GRACE] [default: 5m]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true)]
    pub kms_revocation_grace: Option<Duration>,

    /// Allow only peers with this uid (SO_PEERCRED), repeatable [env: EAR_ALLOW_UID,
    /// comma-separated] [default: no uid filter]
    #[arg(long, value_name = "UID", value_parser = parse_uid_arg, allow_hyphen_values = true)]
    pub allow_uid: Vec<u32>,

    /// Longest request accepted, 4K..=1G; longer ones get an error reply
    /// [env: EAR_MAX_REQUEST] [default: 32M]
    #[arg(long, value_name = "SIZE", value_parser = parse_size, allow_hyphen_values = true)]
    pub max_request: Option<u64>,

    /// Most concurrent client connections [env: EAR_MAX_CONNECTIONS] [default: 256]
    #[arg(long, value_name = "N", value_parser = parse_max_connections_arg, allow_hyphen_values = true)]
    pub max_connections: Option<usize>,

    /// Entries in the derived-key cache [env: EAR_KEY_CACHE_SIZE] [default: 1024]
    #[arg(long, value_name = "N", value_parser = parse_key_cache_size_arg, allow_hyphen_values = true)]
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

    /// Key rotation and the re-encryption sweep.
    #[command(flatten)]
    pub rotation: RotationArgs,

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

    /// KEK file of the local provider [default: as for serve]
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
    /// Data directory to describe [default: ./ear-data, as for serve]
    #[arg(long, value_name = "DIR", env = "EAR_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,

    /// Ask the running sidecar on this admin socket instead (live view: loaded key versions,
    /// exports being served)
    #[arg(long, value_name = "PATH")]
    pub admin_socket: Option<PathBuf>,

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

impl RewrapArgs {
    /// The new CMK's configuration, validated like `serve`'s. Only AWS KMS is
    /// a rewrap target.
    pub fn target(&self) -> Result<KmsConfig, ConfigError> {
        if self.kms != KmsKind::Aws {
            return Err(ConfigError::Conflict(
                "--kms local: keys rewrap moves keys to an AWS KMS CMK; pass --kms aws \
                 --kms-key-id ARN"
                    .into(),
            ));
        }
        ValidateKeyArgs {
            kms_key_id: self.kms_key_id.clone(),
            kms_endpoint: self.kms_endpoint.clone(),
            kms_region: self.kms_region.clone(),
            kms_startup_timeout: Duration::from_secs(60),
        }
        .kms_config()
    }
}

/// A whole number in `lo..=hi`, with a message that states the range.
fn whole_in(s: &str, lo: u64, hi: u64) -> Result<u64, String> {
    s.trim()
        .parse::<u64>()
        .ok()
        .filter(|n| (lo..=hi).contains(n))
        .ok_or_else(|| format!("expected a whole number from {lo} to {hi}"))
}

fn parse_max_connections_arg(s: &str) -> Result<usize, String> {
    whole_in(s, 1, MAX_MAX_CONNECTIONS as u64).map(|n| n as usize)
}

fn parse_key_cache_size_arg(s: &str) -> Result<usize, String> {
    whole_in(s, 1, MAX_KEY_CACHE_SIZE as u64).map(|n| n as usize)
}

fn parse_uid_arg(s: &str) -> Result<u32, String> {
    // u32::MAX is (uid_t)-1, which no process can have.
    whole_in(s, 0, u64::from(u32::MAX) - 1).map(|n| n as u32)
}

/// How the backup commands reach the universe keys: the provider the key
/// registry names, with these options.
#[derive(Debug, Clone, Default, Args)]
pub struct BackupKeyArgs {
    /// KEK file of the local provider [default: as for serve]
    #[arg(long, value_name = "PATH", env = "EAR_LOCAL_KEK_FILE")]
    pub local_kek_file: Option<PathBuf>,

    /// AWS KMS endpoint URL [default: from the AWS configuration]
    #[arg(long, value_name = "URL", env = "EAR_KMS_ENDPOINT")]
    pub kms_endpoint: Option<String>,

    /// AWS region [default: from the key ARN or the AWS configuration]
    #[arg(long, value_name = "REGION", env = "EAR_KMS_REGION")]
    pub kms_region: Option<String>,
}

/// Options of `ear-sidecar backup`.
#[derive(Debug, Clone, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct BackupArgs {
    /// list, prune or verify (without one: take a backup).
    #[command(subcommand)]
    pub command: Option<BackupCommand>,

    /// Take a backup.
    #[command(flatten)]
    pub take: BackupTakeArgs,
}

/// Options of `ear-sidecar backup --export NAME --to DEST`.
#[derive(Debug, Clone, Args)]
pub struct BackupTakeArgs {
    /// Export to back up
    #[arg(long, value_name = "NAME", required = true)]
    pub export: Option<String>,

    /// Destination: a directory or s3://bucket/prefix
    #[arg(long, value_name = "DEST", required = true)]
    pub to: Option<String>,

    /// Require a parent: only blocks changed since the newest backup of the
    /// export (the default whenever a parent exists)
    #[arg(long, conflicts_with = "full")]
    pub incremental: bool,

    /// A full backup even when a parent exists
    #[arg(long)]
    pub full: bool,

    /// Offline: the data directory (no sidecar may be running on it)
    #[arg(long, value_name = "DIR", conflicts_with = "admin_socket")]
    pub data_dir: Option<PathBuf>,

    /// Online: the admin socket of the running sidecar
    #[arg(long, value_name = "PATH")]
    pub admin_socket: Option<PathBuf>,

    /// Command run as `sh -c 'CMD "$1"' hook freeze` just before the cut and
    /// with `thaw` right after it (e.g. a script running fsfreeze -f / -u)
    #[arg(long, value_name = "CMD")]
    pub freeze_hook: Option<String>,

    /// Read at most SIZE bytes of the export per second (e.g. 200M), to
    /// bound the backup's effect on the sidecar's clients; default: no limit
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub rate: Option<u64>,

    /// Print one JSON object instead of text
    #[arg(long)]
    pub json: bool,

    /// Key provider options (offline).
    #[command(flatten)]
    pub keys: BackupKeyArgs,
}

/// `ear-sidecar backup` subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum BackupCommand {
    /// List the backups at a destination (unusable ones with the reason).
    List(BackupListArgs),
    /// Remove all but the newest N backups per export (never a kept chain's parent).
    Prune(BackupPruneArgs),
    /// Check MACs, the chain and every object's hash (and with --decrypt-check, decrypt every block).
    Verify(BackupVerifyArgs),
}

/// Options of `ear-sidecar backup list`.
#[derive(Debug, Clone, Args)]
pub struct BackupListArgs {
    /// Destination: a directory or s3://bucket/prefix
    #[arg(long, value_name = "DEST")]
    pub from: String,

    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,

    /// Key provider options.
    #[command(flatten)]
    pub keys: BackupKeyArgs,
}

/// Options of `ear-sidecar backup prune`.
#[derive(Debug, Clone, Args)]
pub struct BackupPruneArgs {
    /// Destination: a directory or s3://bucket/prefix
    #[arg(long, value_name = "DEST")]
    pub from: String,

    /// Newest backups to keep per export (their parents are kept too)
    #[arg(long, value_name = "N")]
    pub keep: usize,

    /// Only this export's backups
    #[arg(long, value_name = "NAME")]
    pub export: Option<String>,

    /// Unreferenced objects younger than this are kept (a backup may be running)
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_duration)]
    pub orphan_grace: Duration,

    /// Report only, delete nothing
    #[arg(long)]
    pub dry_run: bool,

    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,

    /// Key provider options.
    #[command(flatten)]
    pub keys: BackupKeyArgs,
}

/// Options of `ear-sidecar backup verify`.
#[derive(Debug, Clone, Args)]
pub struct BackupVerifyArgs {
    /// Destination: a directory or s3://bucket/prefix
    #[arg(long, value_name = "DEST")]
    pub from: String,

    /// Backup to verify [default: the newest]
    #[arg(long, value_name = "ID")]
    pub backup: Option<String>,

    /// Also decrypt every block through the CMK (no plaintext is written)
    #[arg(long)]
    pub decrypt_check: bool,

    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,

    /// Key provider options.
    #[command(flatten)]
    pub keys: BackupKeyArgs,
}

/// Options of `ear-sidecar restore`.
#[derive(Debug, Clone, Args)]
pub struct RestoreArgs {
    /// Destination the backups are in: a directory or s3://bucket/prefix
    #[arg(long, value_name = "DEST")]
    pub from: String,

    /// Backup to restore [default: the newest of the export]
    #[arg(long, value_name = "ID")]
    pub backup: Option<String>,

    /// New data directory to create (must not exist or be empty)
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,

    /// Export whose newest backup to restore (when the destination holds several)
    #[arg(long, value_name = "NAME")]
    pub export: Option<String>,

    /// Restore under another AWS KMS key (rewraps the universe keys)
    #[arg(long, value_name = "ARN")]
    pub kms_key_id: Option<String>,

    /// Print one JSON object instead of text
    #[arg(long)]
    pub json: bool,

    /// Key provider options.
    #[command(flatten)]
    pub keys: BackupKeyArgs,
}

/// A path where an empty value is allowed (it disables the feature).
fn path_or_empty(s: &str) -> Result<PathBuf, std::convert::Infallible> {
    Ok(PathBuf::from(s))
}

// ---- key rotation ----------------------------------------------------------

/// `serve` options of key rotation and the re-encryption sweep.
#[derive(Debug, Clone, Default, Args)]
pub struct RotationArgs {
    /// Rotate the universe key on this period, e.g. 2160h; the sweep then
    /// re-encrypts older blocks [env: EAR_ROTATE_EVERY] [default: off]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true)]
    pub rotate_every: Option<Duration>,

    /// Rate limit of the re-encryption sweep in MiB/s of blocks rewritten; 0 = unlimited
    /// [env: EAR_REENCRYPT_RATE] [default: 8]
    #[arg(long, value_name = "MIB_PER_SEC", value_parser = parse_reencrypt_rate, allow_hyphen_values = true)]
    pub reencrypt_rate: Option<u64>,

    /// Retire older key versions (remove their wrapped keys) as soon as the
    /// sweep has moved every block and header off them [env: EAR_RETIRE_AFTER_SWEEP]
    #[arg(long)]
    pub retire_after_sweep: bool,
}

fn parse_reencrypt_rate(s: &str) -> Result<u64, String> {
    whole_in(s, 0, MAX_REENCRYPT_RATE_MIB)
}

impl KeysCommand {
    /// The target options of a rotation-lifecycle operation (`None` for
    /// `rewrap`, which has its own).
    pub fn target(&self) -> Option<&KeysTarget> {
        match self {
            KeysCommand::Rewrap(_) | KeysCommand::Encrypt(_) => None,
            KeysCommand::Status(t) | KeysCommand::Rotate(t) => Some(t),
            KeysCommand::Retire(a) => Some(&a.target),
            KeysCommand::Sweep(s) => match &s.action {
                SweepAction::Pause(t) | SweepAction::Resume(t) => Some(t),
            },
        }
    }
}

/// `keys retire N`.
#[derive(Debug, Clone, Args)]
pub struct RetireArgs {
    /// The key version to retire.
    #[arg(value_name = "N")]
    pub version: u32,
    /// Where.
    #[command(flatten)]
    pub target: KeysTarget,
}

/// `keys sweep pause|resume`.
#[derive(Debug, Clone, Args)]
pub struct SweepArgs {
    /// Pause or resume.
    #[command(subcommand)]
    pub action: SweepAction,
}

/// What to do with the sweep.
#[derive(Debug, Clone, Subcommand)]
pub enum SweepAction {
    /// Pause the sweep (persisted across restarts).
    Pause(KeysTarget),
    /// Resume the sweep (offline: run it to the end now).
    Resume(KeysTarget),
}

/// Which sidecar or data directory a `keys` command acts on.
#[derive(Debug, Clone, Args)]
pub struct KeysTarget {
    /// Admin socket of the running sidecar
    #[arg(
        long,
        value_name = "PATH",
        env = "EAR_ADMIN_SOCKET",
        conflicts_with = "data_dir"
    )]
    pub admin_socket: Option<PathBuf>,

    /// Data directory, offline (no sidecar may be running on it)
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Print the result as JSON
    #[arg(long)]
    pub json: bool,

    /// Offline: KEK file of the local provider [default: as for serve]
    #[arg(long, value_name = "PATH", env = "EAR_LOCAL_KEK_FILE")]
    pub local_kek_file: Option<PathBuf>,

    /// Offline: AWS KMS endpoint URL [default: from the AWS configuration]
    #[arg(long, value_name = "URL", env = "EAR_KMS_ENDPOINT")]
    pub kms_endpoint: Option<String>,

    /// Offline: AWS region [default: from the key ARN or the AWS configuration]
    #[arg(long, value_name = "REGION", env = "EAR_KMS_REGION")]
    pub kms_region: Option<String>,
}
