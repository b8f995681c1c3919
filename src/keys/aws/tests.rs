//! Unit tests of the AWS KMS provider's pure parts.

use std::sync::atomic::Ordering;

use super::*;
use aws_sdk_kms::error::ErrorMetadata;
use aws_sdk_kms::operation::decrypt::DecryptError;
use aws_sdk_kms::operation::describe_key::DescribeKeyError;
use aws_sdk_kms::types::error::{DisabledException, KmsInvalidStateException, NotFoundException};

const GOOD: &str = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab";

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
    assert!(matches!(r.outcome(CHECK_ARN), Some(CheckOutcome::Failed(m)) if m.contains("alias")));
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
    let res: Result<(), KeyError> = with_startup_deadline("e", Duration::from_secs(5), || async {
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
