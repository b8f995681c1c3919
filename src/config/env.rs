//! Value parsers shared by the command line, the environment and the file
//! (all three carry strings), and the environment-variable naming rule.

use std::net::SocketAddr;
use std::time::Duration;

use clap::ValueEnum;

use crate::store::{ExportName, ExportSpec, NameError};

use super::*;

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

pub(crate) fn check_socket_mode(mode: u32) -> Result<u32, String> {
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

/// Checks an export name (see [`ExportName`]).
pub fn validate_export_name(name: &str) -> Result<ExportName, ConfigError> {
    ExportName::parse(name).map_err(|e| ConfigError::ExportName {
        name: name.to_owned(),
        reason: match e {
            NameError::Empty => "empty",
            NameError::TooLong(_) => "longer than 64 bytes",
            NameError::LeadingDot => "must not start with a dot",
            NameError::InvalidChar(_) => "only letters, digits, '.', '_' and '-' are allowed",
        }
        .to_owned(),
    })
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
    let name = validate_export_name(name.trim()).map_err(|e| err(e.to_string()))?;
    let size = parse_size(size).map_err(|e| err(e.to_string()))?;
    ExportSpec::new(name, size).map_err(|e| err(e.to_string()))
}

pub(crate) fn parse_on_off(s: &str) -> Result<OnOff, ConfigError> {
    OnOff::from_str(s.trim(), true).map_err(|_| ConfigError::value(s, "expected on or off"))
}

pub(crate) fn parse_kms_kind(s: &str) -> Result<KmsKind, ConfigError> {
    KmsKind::from_str(s.trim(), true).map_err(|_| ConfigError::value(s, "expected local or aws"))
}

pub(crate) fn parse_log_format(s: &str) -> Result<LogFormat, ConfigError> {
    LogFormat::from_str(s.trim(), true).map_err(|_| ConfigError::value(s, "expected text or json"))
}

pub(crate) fn parse_uint<T: std::str::FromStr>(s: &str) -> Result<T, ConfigError> {
    s.trim()
        .parse()
        .map_err(|_| ConfigError::value(s, "expected a non-negative integer"))
}

pub(crate) fn parse_uid_list(s: &str) -> Result<Vec<u32>, ConfigError> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(parse_uint::<u32>)
        .collect()
}

pub(crate) fn parse_export_list(s: &str) -> Result<Vec<ExportSpec>, ConfigError> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(parse_export)
        .collect()
}

pub(crate) fn parse_metrics_addr(s: &str) -> Result<Option<SocketAddr>, ConfigError> {
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

pub(crate) fn check_log_level(s: &str) -> Result<String, ConfigError> {
    tracing_subscriber::EnvFilter::try_new(s)
        .map(|_| s.to_owned())
        .map_err(|e| ConfigError::value(s, format!("not a valid log filter: {e}")))
}

pub(crate) fn check_key_id(s: &str) -> Result<String, ConfigError> {
    let t = s.trim();
    if t.is_empty() {
        return Err(ConfigError::value(s, "empty key id"));
    }
    if t.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ConfigError::value(s, "key id contains whitespace"));
    }
    Ok(t.to_owned())
}

pub(crate) fn check_endpoint(s: &str) -> Result<String, ConfigError> {
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

pub(crate) fn check_region(s: &str) -> Result<String, ConfigError> {
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

pub(crate) fn on_off_from_file(v: &BoolOrString) -> Result<OnOff, ConfigError> {
    match v {
        BoolOrString::Bool(true) => Ok(OnOff::On),
        BoolOrString::Bool(false) => Ok(OnOff::Off),
        BoolOrString::Str(s) => parse_on_off(s),
    }
}

pub(crate) fn size_from_file(v: &IntOrString) -> Result<u64, ConfigError> {
    match v {
        IntOrString::Int(n) => Ok(*n),
        IntOrString::Str(s) => parse_size(s),
    }
}

pub(crate) fn mode_from_file(v: &IntOrString) -> Result<u32, ConfigError> {
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

pub(crate) fn invalid(option: &'static str, origin: Origin, source: ConfigError) -> ConfigError {
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

pub(crate) fn file_key(option: &str) -> String {
    option.trim_start_matches('-').replace('-', "_")
}
