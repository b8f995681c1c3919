//! Key ARN syntax: parsing and checking `arn:<partition>:kms:<region>:<account>:key/<id>`.

use std::fmt;

/// A parsed KMS key ARN: `arn:<partition>:kms:<region>:<account>:key/<key-id>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyArn {
    /// `aws`, `aws-cn`, `aws-us-gov`, …
    pub partition: String,
    /// Region the key lives in.
    pub region: String,
    /// 12-digit account id.
    pub account: String,
    /// Key id: a UUID, or `mrk-` + 32 hex digits for a multi-region key.
    pub key_id: String,
}

impl fmt::Display for KeyArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "arn:{}:kms:{}:{}:key/{}",
            self.partition, self.region, self.account, self.key_id
        )
    }
}

/// Why a string is not a usable KMS key ARN.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArnError {
    /// Not an ARN at all (a bare key id or alias name).
    #[error("{0:?} is not an ARN: a full key ARN is required (arn:aws:kms:<region>:<account>:key/<key-id>)")]
    NotAnArn(String),
    /// An alias ARN: aliases can be re-pointed, so a key id is required.
    #[error("{0:?} is an alias ARN: a key ARN is required (arn:aws:kms:<region>:<account>:key/<key-id>), because an alias can be re-pointed to another key; find the key ARN with `aws kms describe-key --key-id <alias>`")]
    Alias(String),
    /// Some field is malformed.
    #[error("{arn:?} is not a valid KMS key ARN: {what} (expected arn:aws:kms:<region>:<account>:key/<key-id>)")]
    Malformed {
        /// The input.
        arn: String,
        /// Which part is wrong.
        what: &'static str,
    },
}

pub(crate) fn is_hex(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_hexdigit())
}

pub(crate) fn is_uuid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    let lens = [8usize, 4, 4, 4, 12];
    parts.len() == lens.len()
        && parts
            .iter()
            .zip(lens)
            .all(|(p, l)| p.len() == l && is_hex(p))
}

pub(crate) fn is_key_id(s: &str) -> bool {
    match s.strip_prefix("mrk-") {
        // AWS: mrk- + 32 hex digits; some emulators use mrk- + a UUID.
        Some(rest) => (rest.len() == 32 && is_hex(rest)) || is_uuid(rest),
        None => is_uuid(s),
    }
}

pub(crate) fn is_region(s: &str) -> bool {
    // e.g. us-east-1, eu-central-2, us-gov-west-1, cn-north-1, us-isob-east-1
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() >= 3
        && parts
            .last()
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        && parts
            .iter()
            .take(parts.len().saturating_sub(1))
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase()))
}

/// Parses and checks a KMS key ARN (syntax only; no network).
pub fn parse_key_arn(s: &str) -> Result<KeyArn, ArnError> {
    let malformed = |what| ArnError::Malformed {
        arn: s.to_string(),
        what,
    };
    if !s.starts_with("arn:") {
        return Err(ArnError::NotAnArn(s.to_string()));
    }
    let fields: Vec<&str> = s.splitn(6, ':').collect();
    let [_, partition, service, region, account, resource] = fields[..] else {
        return Err(malformed("too few ':'-separated fields"));
    };
    if partition != "aws"
        && !partition.strip_prefix("aws-").is_some_and(|p| {
            !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
        })
    {
        return Err(malformed("the partition must be aws or aws-<name>"));
    }
    if service != "kms" {
        return Err(malformed("the service must be kms"));
    }
    if !is_region(region) {
        return Err(malformed("the region is missing or malformed"));
    }
    if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed("the account id must be 12 digits"));
    }
    if resource.starts_with("alias/") {
        return Err(ArnError::Alias(s.to_string()));
    }
    let Some(key_id) = resource.strip_prefix("key/") else {
        return Err(malformed("the resource must be key/<key-id>"));
    };
    if !is_key_id(key_id) {
        return Err(malformed(
            "the key id must be a UUID or mrk-<32 hex digits>",
        ));
    }
    Ok(KeyArn {
        partition: partition.to_string(),
        region: region.to_string(),
        account: account.to_string(),
        key_id: key_id.to_string(),
    })
}
