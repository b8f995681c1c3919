//! The mapping from SDK errors to clear one-line messages and to
//! [`KeyError`] kinds; pure, so it is unit-tested without a KMS.

use std::fmt;

use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};

use crate::keys::{KeyError, MasterKeyState};

use super::*;

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

pub(crate) fn looks_like_credentials_problem(detail: &str) -> bool {
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

pub(crate) fn key_error(kind: FailureKind, msg: String) -> KeyError {
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
