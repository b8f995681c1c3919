//! The AWS KMS key provider: a customer-managed symmetric CMK wraps the
//! universe key; the sidecar never sees the CMK and keeps the universe key only
//! in memory.
//!
//! This module owns everything AWS-specific:
//!
//! * building an `aws-sdk-kms` client from the standard AWS chain (environment
//!   keys, profiles, web identity / IRSA, ECS, and last the instance metadata
//!   service with a short, single-attempt timeout so an absent IMDS cannot hang
//!   start-up), with the region taken from the key ARN unless configured, the
//!   endpoint from `--kms-endpoint` or the SDK's own `AWS_ENDPOINT_URL_KMS` /
//!   `AWS_ENDPOINT_URL`, and bounded connect / attempt / operation timeouts plus
//!   the SDK's standard (jittered, exponential) retry with a bounded attempt count;
//! * [`AwsKmsProvider`], the [`KeyProvider`] implementation
//!   (GenerateDataKeyWithoutPlaintext / Decrypt with the key id pinned / DescribeKey);
//! * the `validate-key` checks ([`AwsKmsProvider::validate`], [`validate_key`]),
//!   which return a [`ValidationReport`] with one clear line per check;
//! * the mapping from SDK errors to clear messages ([`classify_sdk_error`],
//!   [`classify_error_code`], [`describe_failure`]), kept pure so it is unit-tested;
//! * [`with_startup_deadline`], which bounds start-up against an unreachable KMS;
//! * [`KmsCallStats`], per-operation call counters for the metrics layer.
//!
//! Plaintext from Decrypt goes straight into [`SecretKey::take_from`], which
//! zeroizes the SDK-owned `Vec` it came in. Copies inside the HTTP/JSON layers
//! of the SDK (the base64 response body) are not reachable from here and are
//! freed, not wiped, by the SDK.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_config::default_provider::credentials::DefaultCredentialsChain;
use aws_config::provider_config::ProviderConfig;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_kms::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{DataKeySpec, KeyMetadata};
use zeroize::Zeroize;

use super::{DeadlineError, EncryptionContext, KeyError, KeyProvider, MasterKeyState, WrappedKey};
use crate::crypto::{SecretKey, KEY_LEN};

/// Provider name stored in the key registry.
pub const PROVIDER_KIND: &str = "aws";

// ---------------------------------------------------------------------------
// ARN syntax
// ---------------------------------------------------------------------------

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

fn is_hex(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn is_uuid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    let lens = [8usize, 4, 4, 4, 12];
    parts.len() == lens.len()
        && parts
            .iter()
            .zip(lens)
            .all(|(p, l)| p.len() == l && is_hex(p))
}

fn is_key_id(s: &str) -> bool {
    match s.strip_prefix("mrk-") {
        // AWS: mrk- + 32 hex digits; some emulators use mrk- + a UUID.
        Some(rest) => (rest.len() == 32 && is_hex(rest)) || is_uuid(rest),
        None => is_uuid(s),
    }
}

fn is_region(s: &str) -> bool {
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

// ---------------------------------------------------------------------------
// Call statistics
// ---------------------------------------------------------------------------

/// The KMS operations this provider calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KmsOp {
    /// `GenerateDataKeyWithoutPlaintext` (create a universe key).
    GenerateDataKeyWithoutPlaintext,
    /// `Decrypt` (unwrap a universe key).
    Decrypt,
    /// `DescribeKey` (validation and revocation check).
    DescribeKey,
    /// `Encrypt` (validation only).
    Encrypt,
    /// `ListAliases` (validation only).
    ListAliases,
}

impl KmsOp {
    /// Every operation, in a stable order.
    pub const ALL: [KmsOp; 5] = [
        KmsOp::GenerateDataKeyWithoutPlaintext,
        KmsOp::Decrypt,
        KmsOp::DescribeKey,
        KmsOp::Encrypt,
        KmsOp::ListAliases,
    ];

    /// The API name (also a good metric label).
    pub fn name(self) -> &'static str {
        match self {
            KmsOp::GenerateDataKeyWithoutPlaintext => "GenerateDataKeyWithoutPlaintext",
            KmsOp::Decrypt => "Decrypt",
            KmsOp::DescribeKey => "DescribeKey",
            KmsOp::Encrypt => "Encrypt",
            KmsOp::ListAliases => "ListAliases",
        }
    }

    /// The IAM permission the operation needs.
    pub fn permission(self) -> &'static str {
        match self {
            KmsOp::GenerateDataKeyWithoutPlaintext => "kms:GenerateDataKeyWithoutPlaintext",
            KmsOp::Decrypt => "kms:Decrypt",
            KmsOp::DescribeKey => "kms:DescribeKey",
            KmsOp::Encrypt => "kms:Encrypt",
            KmsOp::ListAliases => "kms:ListAliases",
        }
    }

    fn index(self) -> usize {
        match self {
            KmsOp::GenerateDataKeyWithoutPlaintext => 0,
            KmsOp::Decrypt => 1,
            KmsOp::DescribeKey => 2,
            KmsOp::Encrypt => 3,
            KmsOp::ListAliases => 4,
        }
    }
}

impl fmt::Display for KmsOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Counters of one KMS operation.
#[derive(Debug, Default)]
pub struct KmsOpCounters {
    /// Calls that succeeded.
    pub ok: AtomicU64,
    /// Calls that failed transiently (network, timeout, throttling, KMS internal).
    pub unavailable: AtomicU64,
    /// Calls KMS refused (permissions, key state, not found, bad ciphertext, …).
    pub refused: AtomicU64,
    /// Sum of call latencies (including SDK retries), in microseconds.
    pub latency_micros_sum: AtomicU64,
}

/// Per-operation KMS call counters, shared with the metrics layer.
#[derive(Debug, Default)]
pub struct KmsCallStats {
    ops: [KmsOpCounters; 5],
}

impl KmsCallStats {
    /// Counters of `op`.
    pub fn op(&self, op: KmsOp) -> &KmsOpCounters {
        // `index()` is always < 5 by construction.
        &self.ops[op.index()]
    }

    fn record(&self, op: KmsOp, kind: Option<FailureKind>, elapsed: Duration) {
        let c = self.op(op);
        let counter = match kind {
            None => &c.ok,
            Some(FailureKind::Unavailable) => &c.unavailable,
            Some(_) => &c.refused,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        c.latency_micros_sum.fetch_add(micros, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------
// Error mapping (pure)
// ---------------------------------------------------------------------------

/// What kind of failure a KMS call had, as far as the sidecar cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Network error, timeout, throttling, KMS-side transient error: retry later.
    Unavailable,
    /// `AccessDeniedException`: a permission is missing.
    AccessDenied,
    /// `DisabledException`: the CMK is disabled.
    Disabled,
    /// `KMSInvalidStateException`: e.g. PendingDeletion / PendingImport.
    InvalidState,
    /// `NotFoundException`: no such key (wrong ARN, region or account).
    NotFound,
    /// `InvalidCiphertextException` / `IncorrectKeyException`: the blob is not
    /// for this key or this encryption context.
    InvalidCiphertext,
    /// `InvalidKeyUsageException`: the key cannot encrypt/decrypt (e.g. a signing key).
    InvalidKeyUsage,
    /// The credentials were rejected or could not be loaded.
    Credentials,
    /// Anything else.
    Other,
}

/// Classifies a KMS error code (the `__type` of the error response).
pub fn classify_error_code(code: Option<&str>) -> FailureKind {
    match code {
        Some("AccessDeniedException") | Some("AccessDenied") => FailureKind::AccessDenied,
        Some("DisabledException") => FailureKind::Disabled,
        Some("KMSInvalidStateException") => FailureKind::InvalidState,
        Some("NotFoundException") => FailureKind::NotFound,
        Some("InvalidCiphertextException") | Some("IncorrectKeyException") => {
            FailureKind::InvalidCiphertext
        }
        Some("InvalidKeyUsageException") => FailureKind::InvalidKeyUsage,
        Some("KeyUnavailableException")
        | Some("DependencyTimeoutException")
        | Some("KMSInternalException")
        | Some("ThrottlingException")
        | Some("Throttling")
        | Some("LimitExceededException")
        | Some("RequestTimeout")
        | Some("RequestTimeoutException")
        | Some("ServiceUnavailable")
        | Some("InternalFailure") => FailureKind::Unavailable,
        Some("UnrecognizedClientException")
        | Some("InvalidSignatureException")
        | Some("IncompleteSignature")
        | Some("InvalidClientTokenId")
        | Some("ExpiredTokenException")
        | Some("ExpiredToken")
        | Some("MissingAuthenticationToken") => FailureKind::Credentials,
        _ => FailureKind::Other,
    }
}

/// The one clear message for a failed `op` on `key_arn`; `detail` is the SDK's
/// full error context.
pub fn describe_failure(op: KmsOp, kind: FailureKind, key_arn: &str, detail: &str) -> String {
    match kind {
        FailureKind::AccessDenied => format!(
            "AWS KMS denied {op} on {key_arn}: permission {perm} is missing \
             (grant it to this identity in the key policy or an IAM policy): {detail}",
            perm = op.permission()
        ),
        FailureKind::Disabled => format!(
            "the CMK {key_arn} is disabled (KeyState Disabled), so {op} was refused; \
             enable it (aws kms enable-key) or use another key: {detail}"
        ),
        FailureKind::InvalidState => format!(
            "the CMK {key_arn} is in a state that does not allow {op} \
             (e.g. PendingDeletion or PendingImport); cancel the deletion or import the \
             key material: {detail}"
        ),
        FailureKind::NotFound => format!(
            "the CMK {key_arn} was not found (check the ARN, its region and account, and \
             the endpoint): {detail}"
        ),
        FailureKind::InvalidCiphertext => format!(
            "{op} under {key_arn} failed: the wrapped key was not produced by this CMK \
             with this encryption context: {detail}"
        ),
        FailureKind::InvalidKeyUsage => format!(
            "the CMK {key_arn} cannot be used for {op}: a symmetric ENCRYPT_DECRYPT key is \
             required: {detail}"
        ),
        FailureKind::Credentials => format!(
            "AWS credentials for {op} were missing or rejected (check AWS_ACCESS_KEY_ID / \
             AWS_PROFILE / web identity settings): {detail}"
        ),
        FailureKind::Unavailable => {
            format!("AWS KMS {op} failed (unreachable, timed out or throttled): {detail}")
        }
        FailureKind::Other => format!("AWS KMS {op} on {key_arn} failed: {detail}"),
    }
}

fn looks_like_credentials_problem(detail: &str) -> bool {
    let d = detail.to_ascii_lowercase();
    (d.contains("credentials")
        && (d.contains("loading credentials")
            || d.contains("failed to load")
            || d.contains("no provider")))
        || d.contains("no credentials")
}

/// Classifies an SDK error and renders its message. Non-service errors
/// (timeouts, dispatch and response failures) are [`FailureKind::Unavailable`];
/// a construction failure caused by missing credentials is
/// [`FailureKind::Credentials`].
pub fn classify_sdk_error<E, R>(
    op: KmsOp,
    key_arn: &str,
    err: &SdkError<E, R>,
) -> (FailureKind, String)
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: fmt::Debug + 'static,
{
    let detail = error_chain(err);
    let kind = match err {
        SdkError::ServiceError(se) => classify_error_code(se.err().code()),
        SdkError::TimeoutError(_) | SdkError::ResponseError(_) => FailureKind::Unavailable,
        SdkError::DispatchFailure(_) | SdkError::ConstructionFailure(_) => {
            if looks_like_credentials_problem(&detail) {
                // The credential source itself unreachable (STS, IMDS, ECS
                // endpoint) is an outage; anything else is a setup problem.
                let d = detail.to_ascii_lowercase();
                if ["timed out", "timeout", "connect", "io error", "dns"]
                    .iter()
                    .any(|w| d.contains(w))
                {
                    FailureKind::Unavailable
                } else {
                    FailureKind::Credentials
                }
            } else if matches!(err, SdkError::DispatchFailure(_)) {
                FailureKind::Unavailable
            } else {
                FailureKind::Other
            }
        }
        _ => FailureKind::Other,
    };
    let msg = describe_failure(op, kind, key_arn, &detail);
    (kind, msg)
}

/// The error and its sources joined with ": " (what the user needs, without
/// the SDK's `Debug` dump, which goes to the log via `DisplayErrorContext`).
/// Repeated adjacent texts are dropped.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = vec![err.to_string()];
    let mut cur = err.source();
    while let Some(e) = cur {
        let t = e.to_string();
        if parts.last().is_none_or(|l| !l.ends_with(&t)) {
            parts.push(t);
        }
        cur = e.source();
    }
    parts.join(": ")
}

fn key_error(kind: FailureKind, msg: String) -> KeyError {
    match kind {
        FailureKind::Unavailable => KeyError::Unavailable(msg),
        FailureKind::InvalidCiphertext => KeyError::WrongKey(msg),
        _ => KeyError::Refused(msg),
    }
}

/// The revocation verdict for a failed DescribeKey: KMS itself saying the key
/// is gone, disabled, or no longer ours to use is a revocation; anything
/// transient is not.
pub fn describe_failure_is_revocation(kind: FailureKind) -> bool {
    matches!(
        kind,
        FailureKind::AccessDenied
            | FailureKind::Disabled
            | FailureKind::InvalidState
            | FailureKind::NotFound
    )
}

/// Maps a DescribeKey `KeyState` string to the master-key state: `Enabled` is
/// usable; Disabled, PendingDeletion, PendingImport, PendingReplicaDeletion and
/// Unavailable (disconnected custom key store) are revocations; transitional
/// states (Creating, Updating, unknown) are `Err(Unavailable)` so the caller
/// keeps serving and checks again.
pub fn key_state_verdict(state: &str) -> Result<MasterKeyState, KeyError> {
    match state {
        "Enabled" => Ok(MasterKeyState::Enabled),
        "Disabled"
        | "PendingDeletion"
        | "PendingImport"
        | "PendingReplicaDeletion"
        | "Unavailable" => Ok(MasterKeyState::Revoked(format!("KeyState {state}"))),
        other => Err(KeyError::Unavailable(format!(
            "the CMK is in transitional KeyState {other}"
        ))),
    }
}

// ---------------------------------------------------------------------------
// Options and provider
// ---------------------------------------------------------------------------

/// How to reach and use the CMK. Everything not given here comes from the
/// standard AWS chain.
#[derive(Debug, Clone)]
pub struct AwsKmsOptions {
    /// The CMK's key ARN (`--kms-key-id`).
    pub key_arn: String,
    /// Region override (`--kms-region`); default: the ARN's region.
    pub region: Option<String>,
    /// Endpoint override (`--kms-endpoint`); default: `AWS_ENDPOINT_URL_KMS`,
    /// `AWS_ENDPOINT_URL`, then the regional AWS endpoint.
    pub endpoint: Option<String>,
    /// TCP/TLS connect timeout per attempt.
    pub connect_timeout: Duration,
    /// Socket read timeout.
    pub read_timeout: Duration,
    /// Timeout of one attempt.
    pub attempt_timeout: Duration,
    /// Timeout of one operation including SDK retries.
    pub operation_timeout: Duration,
    /// Attempts per operation (SDK standard retry, exponential backoff with jitter).
    pub max_attempts: u32,
    /// First retry backoff.
    pub initial_backoff: Duration,
    /// Timeout of the instance metadata service when the chain reaches it
    /// (single attempt); it only matters on hosts with no other credentials.
    pub imds_timeout: Duration,
}

impl AwsKmsOptions {
    /// Options for `key_arn` with the default timeouts: connect 3 s, read 10 s,
    /// attempt 10 s, operation 30 s, 3 attempts from 500 ms backoff, IMDS 1 s.
    pub fn new(key_arn: impl Into<String>) -> Self {
        Self {
            key_arn: key_arn.into(),
            region: None,
            endpoint: None,
            connect_timeout: Duration::from_secs(3),
            read_timeout: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(10),
            operation_timeout: Duration::from_secs(30),
            max_attempts: 3,
            initial_backoff: Duration::from_millis(500),
            imds_timeout: Duration::from_secs(1),
        }
    }
}

/// The AWS KMS key provider. Cheap to share behind an `Arc`.
pub struct AwsKmsProvider {
    client: aws_sdk_kms::Client,
    arn: KeyArn,
    arn_string: String,
    endpoint: String,
    stats: Arc<KmsCallStats>,
}

impl fmt::Debug for AwsKmsProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsKmsProvider")
            .field("key_arn", &self.arn_string)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn to_hash_map(ctx: &EncryptionContext) -> HashMap<String, String> {
    ctx.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

impl AwsKmsProvider {
    /// Builds the client. No network I/O happens here: credentials are
    /// resolved lazily on the first call (bounded by the identity cache's load
    /// timeout; IMDS gets one short attempt). Fails only on a bad ARN.
    pub async fn new(opts: &AwsKmsOptions) -> Result<Self, KeyError> {
        let arn =
            parse_key_arn(opts.key_arn.trim()).map_err(|e| KeyError::Config(e.to_string()))?;
        let region_name = opts.region.clone().unwrap_or_else(|| arn.region.clone());
        if region_name != arn.region {
            tracing::warn!(
                configured = %region_name,
                arn_region = %arn.region,
                "the configured KMS region differs from the key ARN's region; KMS will not find the key there"
            );
        }
        let region = Region::new(region_name.clone());
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(opts.connect_timeout)
            .read_timeout(opts.read_timeout)
            .operation_attempt_timeout(opts.attempt_timeout)
            .operation_timeout(opts.operation_timeout)
            .build();
        let retry = RetryConfig::standard()
            .with_max_attempts(opts.max_attempts.max(1))
            .with_initial_backoff(opts.initial_backoff)
            .with_max_backoff(Duration::from_secs(5));

        // The default chain, with the region pinned (no IMDS region lookup) and
        // an IMDS client that gives up quickly when there is no metadata service.
        let imds = aws_config::imds::Client::builder()
            .connect_timeout(opts.imds_timeout)
            .read_timeout(opts.imds_timeout)
            .max_attempts(1)
            .build();
        let provider_config = ProviderConfig::default()
            .with_behavior_version(Some(BehaviorVersion::latest()))
            .with_region(Some(region.clone()))
            .with_timeout_config(timeouts.clone())
            .with_retry_config(retry.clone());
        let credentials = DefaultCredentialsChain::builder()
            .configure(provider_config)
            .region(region.clone())
            .imds_client(imds)
            .build()
            .await;

        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(region)
            .credentials_provider(credentials)
            .timeout_config(timeouts)
            .retry_config(retry);
        if let Some(ep) = opts.endpoint.as_deref().filter(|e| !e.trim().is_empty()) {
            loader = loader.endpoint_url(ep.trim());
        }
        let sdk_config = loader.load().await;
        let client = aws_sdk_kms::Client::new(&sdk_config);

        let endpoint = opts
            .endpoint
            .clone()
            .filter(|e| !e.trim().is_empty())
            .or_else(|| env_nonempty("AWS_ENDPOINT_URL_KMS"))
            .or_else(|| env_nonempty("AWS_ENDPOINT_URL"))
            .unwrap_or_else(|| format!("https://kms.{region_name}.amazonaws.com"));
        let arn_string = arn.to_string();
        Ok(Self {
            client,
            arn,
            arn_string,
            endpoint,
            stats: Arc::new(KmsCallStats::default()),
        })
    }

    /// The CMK ARN.
    pub fn key_arn(&self) -> &KeyArn {
        &self.arn
    }

    /// The endpoint calls go to (for messages).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Call counters (shared; the metrics layer may keep the `Arc`).
    pub fn stats(&self) -> Arc<KmsCallStats> {
        Arc::clone(&self.stats)
    }

    /// Records a call outcome and turns an SDK error into (kind, message),
    /// logging it with the SDK's full error context.
    fn finish<T, E, R>(
        &self,
        op: KmsOp,
        started: Instant,
        res: Result<T, SdkError<E, R>>,
    ) -> Result<T, (FailureKind, String)>
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: fmt::Debug + 'static,
    {
        let elapsed = started.elapsed();
        match res {
            Ok(v) => {
                self.stats.record(op, None, elapsed);
                tracing::debug!(
                    op = op.name(),
                    elapsed_ms = elapsed.as_millis() as u64,
                    "AWS KMS call ok"
                );
                Ok(v)
            }
            Err(e) => {
                let (kind, msg) = classify_sdk_error(op, &self.arn_string, &e);
                self.stats.record(op, Some(kind), elapsed);
                tracing::warn!(
                    op = op.name(),
                    endpoint = %self.endpoint,
                    kind = ?kind,
                    error = %DisplayErrorContext(&e),
                    "AWS KMS call failed"
                );
                Err((kind, msg))
            }
        }
    }

    async fn describe(&self) -> Result<KeyMetadata, (FailureKind, String)> {
        let started = Instant::now();
        let res = self
            .client
            .describe_key()
            .key_id(&self.arn_string)
            .send()
            .await;
        let out = self.finish(KmsOp::DescribeKey, started, res)?;
        out.key_metadata.ok_or_else(|| {
            (
                FailureKind::Other,
                "DescribeKey returned no KeyMetadata".to_string(),
            )
        })
    }

    async fn generate(&self, ctx: &EncryptionContext) -> Result<Vec<u8>, (FailureKind, String)> {
        let started = Instant::now();
        let res = self
            .client
            .generate_data_key_without_plaintext()
            .key_id(&self.arn_string)
            .key_spec(DataKeySpec::Aes256)
            .set_encryption_context(Some(to_hash_map(ctx)))
            .send()
            .await;
        let out = self.finish(KmsOp::GenerateDataKeyWithoutPlaintext, started, res)?;
        match out.ciphertext_blob {
            Some(b) if !b.as_ref().is_empty() => Ok(b.into_inner()),
            _ => Err((
                FailureKind::Other,
                "GenerateDataKeyWithoutPlaintext returned no CiphertextBlob".to_string(),
            )),
        }
    }

    async fn decrypt(
        &self,
        wrapped: &[u8],
        ctx: &EncryptionContext,
    ) -> Result<SecretKey, (FailureKind, String)> {
        let started = Instant::now();
        let res = self
            .client
            .decrypt()
            .key_id(&self.arn_string)
            .ciphertext_blob(Blob::new(wrapped.to_vec()))
            .set_encryption_context(Some(to_hash_map(ctx)))
            .send()
            .await;
        let mut out = self.finish(KmsOp::Decrypt, started, res)?;
        let mut plain = out
            .plaintext
            .take()
            .map(Blob::into_inner)
            .unwrap_or_default();
        if let Some(id) = out.key_id.as_deref() {
            if id != self.arn_string && !self.arn_string.ends_with(&format!("/{id}")) {
                plain.zeroize();
                return Err((
                    FailureKind::InvalidCiphertext,
                    format!("Decrypt answered for key {id}, not {}", self.arn_string),
                ));
            }
        }
        let len = plain.len();
        // `take_from` wipes `plain` in both outcomes.
        SecretKey::take_from(&mut plain).map_err(|_| {
            (
                FailureKind::Other,
                format!("Decrypt returned {len} bytes of plaintext, expected {KEY_LEN}"),
            )
        })
    }

    async fn encrypt_probe(&self) -> Result<(), (FailureKind, String)> {
        let started = Instant::now();
        let res = self
            .client
            .encrypt()
            .key_id(&self.arn_string)
            .plaintext(Blob::new(b"ear-sidecar validate-key".to_vec()))
            .set_encryption_context(Some(to_hash_map(&validation_context())))
            .send()
            .await;
        self.finish(KmsOp::Encrypt, started, res).map(|_| ())
    }

    async fn list_aliases_probe(&self) -> Result<usize, (FailureKind, String)> {
        let started = Instant::now();
        let res = self
            .client
            .list_aliases()
            .key_id(&self.arn_string)
            .limit(10)
            .send()
            .await;
        let out = self.finish(KmsOp::ListAliases, started, res)?;
        Ok(out.aliases.map(|a| a.len()).unwrap_or(0))
    }

    /// Unwraps with a start-up deadline: transient failures are retried until
    /// `deadline`; see [`with_startup_deadline`].
    pub async fn unwrap_with_deadline(
        &self,
        wrapped: &WrappedKey,
        ctx: &EncryptionContext,
        deadline: Duration,
    ) -> Result<SecretKey, KeyError> {
        with_startup_deadline(&self.endpoint, deadline, || self.unwrap(wrapped, ctx)).await
    }

    /// Runs the managed service's key checks (see [`ValidationReport`]). Never
    /// touches a data directory. Later checks are skipped when KMS is
    /// unreachable or the key does not exist.
    pub async fn validate(&self) -> ValidationReport {
        let mut report = ValidationReport {
            key_arn: self.arn_string.clone(),
            endpoint: self.endpoint.clone(),
            checks: vec![Check::pass(
                CHECK_ARN,
                format!("{} (region {})", self.arn_string, self.arn.region),
            )],
        };
        let mut skip_reason: Option<String> = None;
        match self.describe().await {
            Ok(md) => {
                report.checks.push(Check::pass(CHECK_DESCRIBE, "permitted"));
                let spec = md.key_spec().map(|s| s.as_str()).unwrap_or("(none)");
                report.checks.push(if spec == "SYMMETRIC_DEFAULT" {
                    Check::pass(CHECK_SPEC, "KeySpec SYMMETRIC_DEFAULT")
                } else {
                    Check::fail(
                        CHECK_SPEC,
                        format!(
                            "KeySpec is {spec}: a symmetric CMK (SYMMETRIC_DEFAULT) is required"
                        ),
                    )
                });
                let usage = md.key_usage().map(|s| s.as_str()).unwrap_or("(none)");
                report.checks.push(if usage == "ENCRYPT_DECRYPT" {
                    Check::pass(CHECK_USAGE, "KeyUsage ENCRYPT_DECRYPT")
                } else {
                    Check::fail(
                        CHECK_USAGE,
                        format!("KeyUsage is {usage}: ENCRYPT_DECRYPT is required"),
                    )
                });
                let state = md.key_state().map(|s| s.as_str()).unwrap_or("(none)");
                report.checks.push(if state == "Enabled" {
                    Check::pass(CHECK_STATE, "KeyState Enabled")
                } else {
                    Check::fail(
                        CHECK_STATE,
                        format!("KeyState is {state}: the CMK must be Enabled"),
                    )
                });
                report.checks.push(if md.multi_region() == Some(true) {
                    Check::fail(
                        CHECK_MULTI_REGION,
                        "the CMK is a multi-region key: only single-region keys are supported",
                    )
                } else {
                    Check::pass(CHECK_MULTI_REGION, "single-region key")
                });
            }
            Err((kind, msg)) => {
                report.checks.push(Check::fail(CHECK_DESCRIBE, msg));
                for name in [CHECK_SPEC, CHECK_USAGE, CHECK_STATE, CHECK_MULTI_REGION] {
                    report
                        .checks
                        .push(Check::skip(name, "no key metadata (DescribeKey failed)"));
                }
                if kind != FailureKind::AccessDenied {
                    skip_reason = Some(format!("DescribeKey failed ({kind:?})"));
                }
            }
        }
        if let Some(why) = skip_reason {
            for name in [CHECK_ALIASES, CHECK_GENERATE, CHECK_DECRYPT, CHECK_ENCRYPT] {
                report.checks.push(Check::skip(name, why.clone()));
            }
            return report;
        }
        report.checks.push(match self.list_aliases_probe().await {
            Ok(n) => Check::pass(
                CHECK_ALIASES,
                format!("permitted ({n} alias(es) on the key)"),
            ),
            Err((_, msg)) => Check::fail(CHECK_ALIASES, msg),
        });
        let ctx = validation_context();
        match self.generate(&ctx).await {
            Ok(blob) => {
                report.checks.push(Check::pass(
                    CHECK_GENERATE,
                    format!("AES_256 data key generated ({} byte blob)", blob.len()),
                ));
                report.checks.push(match self.decrypt(&blob, &ctx).await {
                    Ok(_key) => Check::pass(CHECK_DECRYPT, "the blob decrypts to 32 bytes"),
                    Err((_, msg)) => Check::fail(CHECK_DECRYPT, msg),
                });
            }
            Err((_, msg)) => {
                report.checks.push(Check::fail(CHECK_GENERATE, msg));
                report.checks.push(Check::skip(
                    CHECK_DECRYPT,
                    "no data key to decrypt (GenerateDataKeyWithoutPlaintext failed)",
                ));
            }
        }
        report.checks.push(match self.encrypt_probe().await {
            Ok(()) => Check::pass(CHECK_ENCRYPT, "permitted"),
            Err((_, msg)) => Check::fail(CHECK_ENCRYPT, msg),
        });
        report
    }
}

fn validation_context() -> EncryptionContext {
    EncryptionContext::from([("ear-sidecar".to_string(), "validate-key".to_string())])
}

#[async_trait]
impl KeyProvider for AwsKmsProvider {
    fn kind(&self) -> &'static str {
        PROVIDER_KIND
    }

    fn master_key_id(&self) -> String {
        self.arn_string.clone()
    }

    async fn generate_wrapped(&self, ctx: &EncryptionContext) -> Result<WrappedKey, KeyError> {
        self.generate(ctx)
            .await
            .map(WrappedKey)
            .map_err(|(k, m)| key_error(k, m))
    }

    async fn unwrap(
        &self,
        wrapped: &WrappedKey,
        ctx: &EncryptionContext,
    ) -> Result<SecretKey, KeyError> {
        self.decrypt(&wrapped.0, ctx)
            .await
            .map_err(|(k, m)| key_error(k, m))
    }

    /// DescribeKey. `Enabled` → usable. Disabled / PendingDeletion / … →
    /// revoked. A DescribeKey refused by KMS with AccessDenied, NotFound,
    /// Disabled or invalid-state also counts as a revocation (the key policy
    /// or grant was withdrawn, or the key deleted). Network errors, throttling
    /// and credential problems are `Err(Unavailable/Refused)`, never revocation.
    async fn master_key_state(&self) -> Result<MasterKeyState, KeyError> {
        match self.describe().await {
            Ok(md) => match md.key_state() {
                Some(s) => key_state_verdict(s.as_str()),
                None => Err(KeyError::Unavailable(
                    "DescribeKey returned no KeyState".to_string(),
                )),
            },
            Err((kind, msg)) if describe_failure_is_revocation(kind) => {
                Ok(MasterKeyState::Revoked(msg))
            }
            Err((kind, msg)) => Err(key_error(kind, msg)),
        }
    }
}

// ---------------------------------------------------------------------------
// Start-up deadline
// ---------------------------------------------------------------------------

/// Runs `op` until it succeeds, fails with something other than
/// [`KeyError::Unavailable`], or `deadline` passes (see
/// [`super::with_deadline`]). On the deadline the error is
/// `Unavailable("AWS KMS at <endpoint> unreachable after <N>s: <last error>")`.
pub async fn with_startup_deadline<T, F, Fut>(
    endpoint: &str,
    deadline: Duration,
    op: F,
) -> Result<T, KeyError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, KeyError>>,
{
    let end = tokio::time::Instant::now() + deadline;
    super::with_deadline(end, op).await.map_err(|e| match e {
        DeadlineError::Failed(e) => e,
        DeadlineError::TimedOut { last } => KeyError::Unavailable(format!(
            "AWS KMS at {endpoint} unreachable after {}: {}",
            human_duration(deadline),
            last.as_deref()
                .unwrap_or("no response (the request was still pending at the deadline)")
        )),
    })
}

fn human_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

// ---------------------------------------------------------------------------
// Validation report
// ---------------------------------------------------------------------------

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
    fn pass(name: &'static str, note: impl Into<String>) -> Self {
        Self {
            name,
            outcome: CheckOutcome::Passed(note.into()),
        }
    }
    fn fail(name: &'static str, msg: impl Into<String>) -> Self {
        Self {
            name,
            outcome: CheckOutcome::Failed(msg.into()),
        }
    }
    fn skip(name: &'static str, why: impl Into<String>) -> Self {
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
        for name in [
            CHECK_DESCRIBE,
            CHECK_SPEC,
            CHECK_USAGE,
            CHECK_STATE,
            CHECK_MULTI_REGION,
            CHECK_ALIASES,
            CHECK_GENERATE,
            CHECK_DECRYPT,
            CHECK_ENCRYPT,
        ] {
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

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_kms::error::ErrorMetadata;
    use aws_sdk_kms::operation::decrypt::DecryptError;
    use aws_sdk_kms::operation::describe_key::DescribeKeyError;
    use aws_sdk_kms::types::error::{
        DisabledException, KmsInvalidStateException, NotFoundException,
    };

    const GOOD: &str =
        "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab";

    #[test]
    fn arn_good_and_partitions() {
        let a = parse_key_arn(GOOD).unwrap();
        assert_eq!(a.region, "us-east-1");
        assert_eq!(a.account, "123456789012");
        assert_eq!(a.to_string(), GOOD);
        for ok in [
            "arn:aws-us-gov:kms:us-gov-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
            "arn:aws-cn:kms:cn-north-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
            "arn:aws:kms:eu-west-1:123456789012:key/mrk-1234abcd12ab34cd56ef1234567890ab",
        ] {
            assert!(parse_key_arn(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn arn_rejections_are_specific() {
        let alias = "arn:aws:kms:us-east-1:123456789012:alias/my-key";
        assert!(matches!(parse_key_arn(alias), Err(ArnError::Alias(_))));
        assert!(parse_key_arn(alias)
            .unwrap_err()
            .to_string()
            .contains("alias ARN"));
        assert!(matches!(
            parse_key_arn("1234abcd-12ab-34cd-56ef-1234567890ab"),
            Err(ArnError::NotAnArn(_))
        ));
        let cases = [
            ("arn:aws:kms:us-east-1:123456789012", "too few"),
            (
                "arn:gcp:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
                "partition",
            ),
            (
                "arn:aws:s3:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
                "service",
            ),
            (
                "arn:aws:kms::123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
                "region",
            ),
            (
                "arn:aws:kms:us-east-1:1234:key/1234abcd-12ab-34cd-56ef-1234567890ab",
                "account",
            ),
            (
                "arn:aws:kms:us-east-1:123456789012:key/not-a-uuid",
                "key id",
            ),
            (
                "arn:aws:kms:us-east-1:123456789012:keys/1234abcd-12ab-34cd-56ef-1234567890ab",
                "resource",
            ),
        ];
        for (arn, want) in cases {
            let msg = parse_key_arn(arn).unwrap_err().to_string();
            assert!(msg.contains(want), "{arn}: {msg}");
        }
    }

    proptest::proptest! {
        #[test]
        fn arn_parser_never_panics(s in "\\PC{0,120}") {
            let _ = parse_key_arn(&s);
        }

        #[test]
        fn arn_roundtrip(region in "[a-z]{2}-[a-z]{4,9}-[1-9]", acct in "[0-9]{12}",
                         id in "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}") {
            let s = format!("arn:aws:kms:{region}:{acct}:key/{id}");
            let a = parse_key_arn(&s).unwrap();
            proptest::prop_assert_eq!(a.to_string(), s);
        }
    }

    fn generic(code: &str, msg: &str) -> ErrorMetadata {
        ErrorMetadata::builder().code(code).message(msg).build()
    }

    #[test]
    fn access_denied_names_the_permission() {
        for op in KmsOp::ALL {
            let err: SdkError<DecryptError, ()> = SdkError::service_error(
                DecryptError::generic(generic("AccessDeniedException", "User is not authorized")),
                (),
            );
            let (kind, msg) = classify_sdk_error(op, GOOD, &err);
            assert_eq!(kind, FailureKind::AccessDenied);
            assert!(msg.contains(op.permission()), "{msg}");
            assert!(
                msg.contains("User is not authorized"),
                "full context kept: {msg}"
            );
        }
    }

    #[test]
    fn modeled_service_errors_map() {
        let e: SdkError<DescribeKeyError, ()> = SdkError::service_error(
            DescribeKeyError::NotFoundException(
                NotFoundException::builder()
                    .message("nope")
                    .meta(generic("NotFoundException", "nope"))
                    .build(),
            ),
            (),
        );
        let (kind, msg) = classify_sdk_error(KmsOp::DescribeKey, GOOD, &e);
        assert_eq!(kind, FailureKind::NotFound);
        assert!(msg.contains("not found") && msg.contains("nope"), "{msg}");

        let e: SdkError<DecryptError, ()> = SdkError::service_error(
            DecryptError::DisabledException(
                DisabledException::builder()
                    .message("off")
                    .meta(generic("DisabledException", "off"))
                    .build(),
            ),
            (),
        );
        let (kind, msg) = classify_sdk_error(KmsOp::Decrypt, GOOD, &e);
        assert_eq!(kind, FailureKind::Disabled);
        assert!(msg.contains("disabled"), "{msg}");
        assert!(matches!(key_error(kind, msg), KeyError::Refused(_)));

        let e: SdkError<DecryptError, ()> = SdkError::service_error(
            DecryptError::KmsInvalidStateException(
                KmsInvalidStateException::builder()
                    .message("pending deletion")
                    .meta(generic("KMSInvalidStateException", "pending deletion"))
                    .build(),
            ),
            (),
        );
        let (kind, msg) = classify_sdk_error(KmsOp::Decrypt, GOOD, &e);
        assert_eq!(kind, FailureKind::InvalidState);
        assert!(msg.contains("PendingDeletion"), "{msg}");
        assert!(describe_failure_is_revocation(kind));
    }

    #[test]
    fn codes_classify() {
        assert_eq!(
            classify_error_code(Some("InvalidCiphertextException")),
            FailureKind::InvalidCiphertext
        );
        assert_eq!(
            classify_error_code(Some("IncorrectKeyException")),
            FailureKind::InvalidCiphertext
        );
        assert_eq!(
            classify_error_code(Some("ThrottlingException")),
            FailureKind::Unavailable
        );
        assert_eq!(
            classify_error_code(Some("KMSInternalException")),
            FailureKind::Unavailable
        );
        assert_eq!(
            classify_error_code(Some("UnrecognizedClientException")),
            FailureKind::Credentials
        );
        assert_eq!(
            classify_error_code(Some("InvalidKeyUsageException")),
            FailureKind::InvalidKeyUsage
        );
        assert_eq!(classify_error_code(Some("Whatever")), FailureKind::Other);
        assert_eq!(classify_error_code(None), FailureKind::Other);
        assert!(matches!(
            key_error(FailureKind::InvalidCiphertext, String::new()),
            KeyError::WrongKey(_)
        ));
        assert!(!describe_failure_is_revocation(FailureKind::Unavailable));
        assert!(!describe_failure_is_revocation(FailureKind::Credentials));
    }

    #[test]
    fn transport_errors_are_unavailable() {
        let e: SdkError<DecryptError, ()> = SdkError::timeout_error("operation timed out");
        let (kind, msg) = classify_sdk_error(KmsOp::Decrypt, GOOD, &e);
        assert_eq!(kind, FailureKind::Unavailable);
        assert!(msg.contains("timed out"), "{msg}");
        assert!(matches!(key_error(kind, msg), KeyError::Unavailable(_)));
        let e: SdkError<DecryptError, ()> = SdkError::response_error("truncated body", ());
        assert_eq!(
            classify_sdk_error(KmsOp::Decrypt, GOOD, &e).0,
            FailureKind::Unavailable
        );
        let e: SdkError<DecryptError, ()> = SdkError::construction_failure(
            "failed to load credentials: no providers in chain provided credentials",
        );
        assert_eq!(
            classify_sdk_error(KmsOp::Decrypt, GOOD, &e).0,
            FailureKind::Credentials
        );
        // An unreachable credential source is an outage, not a setup error.
        let e: SdkError<DecryptError, ()> = SdkError::construction_failure(
            "an error occurred while loading credentials: dispatch failure: io error: connection timed out",
        );
        assert_eq!(
            classify_sdk_error(KmsOp::Decrypt, GOOD, &e).0,
            FailureKind::Unavailable
        );
        // error_chain keeps the sources but not the Debug dump.
        let e: SdkError<DecryptError, ()> = SdkError::service_error(
            DecryptError::generic(generic("AccessDeniedException", "not allowed")),
            (),
        );
        let c = error_chain(&e);
        assert!(c.contains("not allowed"), "{c}");
        assert!(!c.contains("ServiceError {"), "{c}");
    }

    #[test]
    fn key_states() {
        assert_eq!(
            key_state_verdict("Enabled").unwrap(),
            MasterKeyState::Enabled
        );
        for s in [
            "Disabled",
            "PendingDeletion",
            "PendingImport",
            "Unavailable",
        ] {
            assert_eq!(
                key_state_verdict(s).unwrap(),
                MasterKeyState::Revoked(format!("KeyState {s}"))
            );
        }
        assert!(matches!(
            key_state_verdict("Updating"),
            Err(KeyError::Unavailable(_))
        ));
    }

    #[test]
    fn report_display_and_verdict() {
        let r = ValidationReport {
            key_arn: GOOD.into(),
            endpoint: "http://x".into(),
            checks: vec![
                Check::pass(CHECK_ARN, "fine"),
                Check::fail(CHECK_STATE, "KeyState is Disabled"),
            ],
        };
        assert!(!r.is_ok());
        assert_eq!(r.failures(), vec!["KeyState is Disabled"]);
        let s = r.to_string();
        assert!(
            s.contains("FAIL  KeyState Enabled: KeyState is Disabled"),
            "{s}"
        );
        assert!(s.ends_with("NOT usable"));
    }

    #[tokio::test]
    async fn malformed_arn_report_skips_everything() {
        let r = validate_key(&AwsKmsOptions::new(
            "arn:aws:kms:us-east-1:123456789012:alias/x",
        ))
        .await;
        assert!(!r.is_ok());
        assert_eq!(r.checks.len(), CHECK_NAMES.len());
        assert!(
            matches!(r.outcome(CHECK_ARN), Some(CheckOutcome::Failed(m)) if m.contains("alias"))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn startup_deadline_bounds_and_reports() {
        let calls = std::sync::atomic::AtomicU32::new(0);
        let res: Result<(), KeyError> =
            with_startup_deadline("http://127.0.0.1:1", Duration::from_secs(60), || {
                calls.fetch_add(1, Ordering::Relaxed);
                async { Err(KeyError::Unavailable("connection refused".into())) }
            })
            .await;
        let msg = res.unwrap_err().to_string();
        assert!(
            msg.contains("AWS KMS at http://127.0.0.1:1 unreachable after 60s: connection refused"),
            "{msg}"
        );
        assert!(calls.load(Ordering::Relaxed) > 5);

        // A refusal is not retried.
        let calls = std::sync::atomic::AtomicU32::new(0);
        let res: Result<(), KeyError> = with_startup_deadline("e", Duration::from_secs(60), || {
            calls.fetch_add(1, Ordering::Relaxed);
            async { Err(KeyError::Refused("denied".into())) }
        })
        .await;
        assert!(matches!(res, Err(KeyError::Refused(_))));
        assert_eq!(calls.load(Ordering::Relaxed), 1);

        // A hanging call is cut at the deadline.
        let res: Result<(), KeyError> =
            with_startup_deadline("e", Duration::from_secs(5), || async {
                std::future::pending::<()>().await;
                Ok(())
            })
            .await;
        assert!(res
            .unwrap_err()
            .to_string()
            .contains("unreachable after 5s"));
    }

    #[test]
    fn stats_record() {
        let s = KmsCallStats::default();
        s.record(KmsOp::Decrypt, None, Duration::from_millis(3));
        s.record(
            KmsOp::Decrypt,
            Some(FailureKind::Unavailable),
            Duration::from_millis(1),
        );
        s.record(
            KmsOp::Decrypt,
            Some(FailureKind::AccessDenied),
            Duration::ZERO,
        );
        let d = s.op(KmsOp::Decrypt);
        assert_eq!(d.ok.load(Ordering::Relaxed), 1);
        assert_eq!(d.unavailable.load(Ordering::Relaxed), 1);
        assert_eq!(d.refused.load(Ordering::Relaxed), 1);
        assert_eq!(d.latency_micros_sum.load(Ordering::Relaxed), 4000);
        assert_eq!(s.op(KmsOp::Encrypt).ok.load(Ordering::Relaxed), 0);
    }
}
