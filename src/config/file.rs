//! The TOML configuration file (`--config FILE`): its schema (unknown keys
//! are an error) and the value forms it accepts.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::*;

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
    /// `admin_socket` (`""` disables)
    pub admin_socket: Option<PathBuf>,
    /// `export = ["name=SIZE", ...]`
    pub export: Option<Vec<String>>,
    /// `encryption`
    pub encryption: Option<BoolOrString>,
    /// `kms`
    pub kms: Option<String>,
    /// `local_kek_file`
    pub local_kek_file: Option<PathBuf>,
    /// `insecure_kek_in_data_dir`
    pub insecure_kek_in_data_dir: Option<BoolOrString>,
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
    /// `rotate_every`
    pub rotate_every: Option<String>,
    /// `reencrypt_rate` (MiB/s)
    pub reencrypt_rate: Option<u64>,
    /// `retire_after_sweep`
    pub retire_after_sweep: Option<BoolOrString>,
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
