//! The managed service's key checks and their [`ValidationReport`].

use std::fmt;

use super::*;

/// Check name: the ARN parses (`arn:aws:kms:<region>:<account>:key/<id>`).
pub const CHECK_ARN: &str = "key ARN syntax";
/// Check name: DescribeKey answers.
pub const CHECK_DESCRIBE: &str = "kms:DescribeKey permitted";
/// Check name: KeySpec is SYMMETRIC_DEFAULT.
pub const CHECK_SPEC: &str = "KeySpec SYMMETRIC_DEFAULT";
/// Check name: KeyUsage is ENCRYPT_DECRYPT.
pub const CHECK_USAGE: &str = "KeyUsage ENCRYPT_DECRYPT";
/// Check name: KeyState is Enabled.
pub const CHECK_STATE: &str = "KeyState Enabled";
/// Check name: not a multi-region key.
pub const CHECK_MULTI_REGION: &str = "single-region key";
/// Check name: ListAliases is permitted.
pub const CHECK_ALIASES: &str = "kms:ListAliases permitted";
/// Check name: GenerateDataKeyWithoutPlaintext (AES_256) works.
pub const CHECK_GENERATE: &str = "kms:GenerateDataKeyWithoutPlaintext (AES_256)";
/// Check name: Decrypt of the generated blob returns 32 bytes.
pub const CHECK_DECRYPT: &str = "kms:Decrypt returns 32 bytes";
/// Check name: Encrypt is permitted.
pub const CHECK_ENCRYPT: &str = "kms:Encrypt permitted";

/// Outcome of one validation check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckOutcome {
    /// Passed, with a short note.
    Passed(String),
    /// Failed, with the clear message.
    Failed(String),
    /// Not run (an earlier check made it meaningless).
    Skipped(String),
}

/// One named validation check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What was checked.
    pub name: &'static str,
    /// How it went.
    pub outcome: CheckOutcome,
}

impl Check {
    pub(crate) fn pass(name: &'static str, note: impl Into<String>) -> Self {
        Self {
            name,
            outcome: CheckOutcome::Passed(note.into()),
        }
    }
    pub(crate) fn fail(name: &'static str, msg: impl Into<String>) -> Self {
        Self {
            name,
            outcome: CheckOutcome::Failed(msg.into()),
        }
    }
    pub(crate) fn skip(name: &'static str, why: impl Into<String>) -> Self {
        Self {
            name,
            outcome: CheckOutcome::Skipped(why.into()),
        }
    }
}

/// Result of `validate-key`: every check and its outcome. `Display` prints one
/// line per check (`ok` / `FAIL` / `skip`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationReport {
    /// The key ARN as given.
    pub key_arn: String,
    /// The endpoint used (empty when the ARN did not parse).
    pub endpoint: String,
    /// The checks in order.
    pub checks: Vec<Check>,
}

impl ValidationReport {
    /// True when no check failed or was skipped.
    pub fn is_ok(&self) -> bool {
        self.checks
            .iter()
            .all(|c| matches!(c.outcome, CheckOutcome::Passed(_)))
    }

    /// The failure messages, in order.
    pub fn failures(&self) -> Vec<&str> {
        self.checks
            .iter()
            .filter_map(|c| match &c.outcome {
                CheckOutcome::Failed(m) => Some(m.as_str()),
                _ => None,
            })
            .collect()
    }

    /// The outcome of the check named `name`, if it ran.
    pub fn outcome(&self, name: &str) -> Option<&CheckOutcome> {
        self.checks
            .iter()
            .find(|c| c.name == name)
            .map(|c| &c.outcome)
    }
}

impl fmt::Display for ValidationReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "AWS KMS key {} via {}", self.key_arn, self.endpoint)?;
        for c in &self.checks {
            match &c.outcome {
                CheckOutcome::Passed(n) => writeln!(f, "  ok    {}: {n}", c.name)?,
                CheckOutcome::Failed(m) => writeln!(f, "  FAIL  {}: {m}", c.name)?,
                CheckOutcome::Skipped(w) => writeln!(f, "  skip  {}: {w}", c.name)?,
            }
        }
        if self.is_ok() {
            write!(f, "the key is usable")
        } else {
            write!(f, "the key is NOT usable")
        }
    }
}

/// `validate-key`: parses the ARN, builds a provider and runs
/// [`AwsKmsProvider::validate`]. A malformed ARN yields a report with one
/// failed check and everything else skipped.
pub async fn validate_key(opts: &AwsKmsOptions) -> ValidationReport {
    if let Err(e) = parse_key_arn(opts.key_arn.trim()) {
        let mut checks = vec![Check::fail(CHECK_ARN, e.to_string())];
        for &name in &CHECK_NAMES[1..] {
            checks.push(Check::skip(name, "the key ARN is invalid"));
        }
        return ValidationReport {
            key_arn: opts.key_arn.clone(),
            endpoint: String::new(),
            checks,
        };
    }
    match AwsKmsProvider::new(opts).await {
        Ok(p) => p.validate().await,
        Err(e) => ValidationReport {
            key_arn: opts.key_arn.clone(),
            endpoint: String::new(),
            checks: vec![Check::fail(CHECK_ARN, e.to_string())],
        },
    }
}

/// Names of the checks in [`ValidationReport::checks`], in order.
pub const CHECK_NAMES: [&str; 10] = [
    CHECK_ARN,
    CHECK_DESCRIBE,
    CHECK_SPEC,
    CHECK_USAGE,
    CHECK_STATE,
    CHECK_MULTI_REGION,
    CHECK_ALIASES,
    CHECK_GENERATE,
    CHECK_DECRYPT,
    CHECK_ENCRYPT,
];
