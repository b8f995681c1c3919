//! AWS KMS provider against a real moto server (library level): wrap/unwrap
//! round trips, the validate-key checks, key-state reporting, the revocation
//! watcher, and bounded failure when KMS is unreachable.
//!
//! moto does not enforce IAM and still decrypts under a Disabled key; the
//! error mapping for those cases is unit-tested in `src/keys/aws.rs`.

#[path = "common/moto.rs"]
mod moto;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_kms::types::KeySpec;
use ear_sidecar::crypto::{KeyRing, SecretKey};
use ear_sidecar::keys::aws::{
    validate_key, with_startup_deadline, AwsKmsOptions, AwsKmsProvider, CheckOutcome, KmsOp,
};
use ear_sidecar::keys::revocation::{watch_master_key, MasterKeyHealth, RevocationState};
use ear_sidecar::keys::{EncryptionContext, KeyError, KeyProvider, MasterKeyState, WrappedKey};

use moto::{free_port, kid, Moto};

macro_rules! moto_or_skip {
    () => {
        match Moto::start() {
            Some(m) => m,
            None => return,
        }
    };
}

fn opts(moto: &Moto, arn: &str) -> AwsKmsOptions {
    let mut o = AwsKmsOptions::new(arn);
    o.endpoint = Some(moto.endpoint.clone());
    o
}

async fn provider(moto: &Moto, arn: &str) -> AwsKmsProvider {
    AwsKmsProvider::new(&opts(moto, arn))
        .await
        .expect("provider")
}

fn ctx(dir: &str) -> EncryptionContext {
    BTreeMap::from([
        ("ear-sidecar:data-dir".to_string(), dir.to_string()),
        (
            "ear-sidecar:purpose".to_string(),
            "universe-key".to_string(),
        ),
    ])
}

/// Starts the master-key watch over `ring` (check every 200 ms, 1 s grace).
/// Dropping the sender stops it; await the handle to join it.
fn watch(
    p: &Arc<dyn KeyProvider>,
    ring: &Arc<KeyRing>,
) -> (
    Arc<RevocationState>,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let state = Arc::new(RevocationState::new());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(watch_master_key(
        p.clone(),
        ring.clone(),
        Duration::from_millis(200),
        Duration::from_secs(1),
        state.clone(),
        async move {
            let _ = rx.await;
        },
    ));
    (state, tx, task)
}

fn failed(r: &ear_sidecar::keys::aws::ValidationReport, name: &str) -> String {
    match r.outcome(name) {
        Some(CheckOutcome::Failed(m)) => m.clone(),
        other => panic!("check {name:?} should have failed, got {other:?}\n{r}"),
    }
}

/// Validates `arn` and asserts the report fails, with check `name` failing
/// for a reason that mentions `why`.
async fn assert_validation_fails(moto: &Moto, arn: &str, name: &str, why: &str) {
    let r = validate_key(&opts(moto, arn)).await;
    eprintln!("{r}");
    let m = failed(&r, name);
    assert!(m.contains(why), "{m}");
    assert!(!r.is_ok());
}

#[tokio::test]
async fn generate_unwrap_round_trip_with_context() {
    let moto = moto_or_skip!();
    let arn = moto.create_key(KeySpec::SymmetricDefault, false).await;
    let p = provider(&moto, &arn).await;
    assert_eq!(p.kind(), "aws");
    assert_eq!(p.master_key_id(), arn);

    let c = ctx("dir-1");
    let wrapped = p.generate_wrapped(&c).await.expect("generate");
    assert!(wrapped.0.len() > 32, "a KMS blob, not a raw key");

    let t = Instant::now();
    let k1 = p.unwrap(&wrapped, &c).await.expect("unwrap");
    let first = t.elapsed();
    let t = Instant::now();
    let k2 = p.unwrap(&wrapped, &c).await.expect("unwrap again");
    let second = t.elapsed();
    eprintln!("moto unwrap latency: first {first:?}, second {second:?}");
    assert_eq!(k1.expose(), k2.expose());
    assert_ne!(k1.expose(), &[0u8; 32]);

    // Two generated keys differ.
    let other = p.generate_wrapped(&c).await.expect("generate 2");
    let k3 = p.unwrap(&other, &c).await.expect("unwrap 2");
    assert_ne!(k1.expose(), k3.expose());

    let stats = p.stats();
    let d = stats.op(KmsOp::Decrypt);
    assert_eq!(d.ok.load(std::sync::atomic::Ordering::Relaxed), 3);
}

#[tokio::test]
async fn different_context_or_tampered_blob_fails() {
    let moto = moto_or_skip!();
    let arn = moto.create_key(KeySpec::SymmetricDefault, false).await;
    let p = provider(&moto, &arn).await;
    let wrapped = p.generate_wrapped(&ctx("dir-1")).await.expect("generate");

    let err = p.unwrap(&wrapped, &ctx("dir-2")).await.unwrap_err();
    assert!(matches!(err, KeyError::WrongKey(_)), "{err}");

    let mut bad = wrapped.0.clone();
    if let Some(b) = bad.last_mut() {
        *b ^= 1;
    }
    let err = p.unwrap(&WrappedKey(bad), &ctx("dir-1")).await.unwrap_err();
    assert!(
        matches!(err, KeyError::WrongKey(_) | KeyError::Refused(_)),
        "{err}"
    );
}

#[tokio::test]
async fn blob_of_another_cmk_is_refused() {
    let moto = moto_or_skip!();
    let a = moto.create_key(KeySpec::SymmetricDefault, false).await;
    let b = moto.create_key(KeySpec::SymmetricDefault, false).await;
    let pa = provider(&moto, &a).await;
    let pb = provider(&moto, &b).await;
    let c = ctx("dir");
    let wrapped = pa.generate_wrapped(&c).await.expect("generate");
    let err = pb.unwrap(&wrapped, &c).await.unwrap_err();
    assert!(
        matches!(err, KeyError::WrongKey(_) | KeyError::Refused(_)),
        "{err}"
    );
}

#[tokio::test]
async fn validate_good_key() {
    let moto = moto_or_skip!();
    let arn = moto.create_key(KeySpec::SymmetricDefault, false).await;
    let r = validate_key(&opts(&moto, &arn)).await;
    eprintln!("{r}");
    assert!(r.is_ok(), "{r}");
    assert_eq!(r.checks.len(), ear_sidecar::keys::aws::CHECK_NAMES.len());
}

#[tokio::test]
async fn validate_nonexistent_key() {
    let moto = moto_or_skip!();
    let arn = "arn:aws:kms:us-east-1:123456789012:key/00000000-1111-2222-3333-444444444444";
    let r = validate_key(&opts(&moto, arn)).await;
    eprintln!("{r}");
    assert!(!r.is_ok());
    let m = failed(&r, "kms:DescribeKey permitted");
    assert!(m.contains("not found"), "{m}");
    assert!(matches!(
        r.outcome("KeyState Enabled"),
        Some(CheckOutcome::Skipped(_))
    ));
    assert!(matches!(
        r.outcome("kms:GenerateDataKeyWithoutPlaintext (AES_256)"),
        Some(CheckOutcome::Skipped(_))
    ));
}

#[tokio::test]
async fn validate_malformed_and_alias_arn() {
    let moto = moto_or_skip!();
    for (arn, want) in [
        ("arn:aws:kms:us-east-1:123456789012:key/nope", "key id"),
        ("not-an-arn", "not an ARN"),
        (
            "arn:aws:kms:us-east-1:123456789012:alias/my-key",
            "alias ARN",
        ),
    ] {
        let r = validate_key(&opts(&moto, arn)).await;
        let m = failed(&r, "key ARN syntax");
        assert!(m.contains(want), "{arn}: {m}");
        assert!(!r.is_ok());
    }
    let err = AwsKmsProvider::new(&opts(&moto, "arn:aws:kms:us-east-1:123456789012:alias/x"))
        .await
        .unwrap_err();
    assert!(matches!(err, KeyError::Config(_)), "{err}");
}

#[tokio::test]
async fn validate_rsa_key() {
    let moto = moto_or_skip!();
    let arn = moto.create_key(KeySpec::Rsa2048, false).await;
    assert_validation_fails(&moto, &arn, "KeySpec SYMMETRIC_DEFAULT", "RSA_2048").await;
}

#[tokio::test]
async fn validate_multi_region_key() {
    let moto = moto_or_skip!();
    let arn = moto.create_key(KeySpec::SymmetricDefault, true).await;
    assert_validation_fails(&moto, &arn, "single-region key", "multi-region").await;
}

#[tokio::test]
async fn validate_disabled_key() {
    let moto = moto_or_skip!();
    let arn = moto.create_key(KeySpec::SymmetricDefault, false).await;
    moto.set_enabled(&arn, false).await;
    assert_validation_fails(&moto, &arn, "KeyState Enabled", "Disabled").await;
}

#[tokio::test]
async fn key_state_follows_disable_enable_and_deletion() {
    let moto = moto_or_skip!();
    let arn = moto.create_key(KeySpec::SymmetricDefault, false).await;
    let p = provider(&moto, &arn).await;
    let admin = moto.admin_client();
    assert_eq!(p.master_key_state().await.unwrap(), MasterKeyState::Enabled);

    moto.set_enabled(&arn, false).await;
    match p.master_key_state().await.unwrap() {
        MasterKeyState::Revoked(r) => assert!(r.contains("Disabled"), "{r}"),
        other => panic!("{other:?}"),
    }
    moto.set_enabled(&arn, true).await;
    assert_eq!(p.master_key_state().await.unwrap(), MasterKeyState::Enabled);

    admin
        .schedule_key_deletion()
        .key_id(kid(&arn))
        .pending_window_in_days(7)
        .send()
        .await
        .expect("ScheduleKeyDeletion");
    match p.master_key_state().await.unwrap() {
        MasterKeyState::Revoked(r) => assert!(r.contains("PendingDeletion"), "{r}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn watcher_fails_closed_on_disable_and_survives_outage() {
    let mut moto = moto_or_skip!();
    let arn = moto.create_key(KeySpec::SymmetricDefault, false).await;
    let p: Arc<dyn KeyProvider> = Arc::new(provider(&moto, &arn).await);
    let c = ctx("dir");
    let wrapped = p.generate_wrapped(&c).await.expect("generate");
    let key = p.unwrap(&wrapped, &c).await.expect("unwrap");

    // 1. Disabled while running: fails closed after the grace period.
    let ring = Arc::new(KeyRing::new(BTreeMap::from([(1, key.duplicate())]), 1, 16).unwrap());
    let (state, tx, task) = watch(&p, &ring);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(state.snapshot().health, MasterKeyHealth::Ok);
    moto.set_enabled(&arn, false).await;
    let t = Instant::now();
    while !ring.is_failed_closed() && t.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = t.elapsed();
    eprintln!("failed closed {took:?} after DisableKey (grace 1 s, interval 200 ms)");
    assert!(ring.is_failed_closed());
    assert!(took >= Duration::from_millis(900), "{took:?}");
    assert!(ring.file_keys(&[0u8; 16], 1, 1).is_err());
    assert_eq!(state.snapshot().gauge(), 2);
    drop(tx);
    task.await.unwrap();

    // 2. Re-enable, "restart": a new ring; then KMS stops: still serving.
    moto.set_enabled(&arn, true).await;
    let key = p
        .unwrap(&wrapped, &c)
        .await
        .expect("unwrap after re-enable");
    let ring = Arc::new(KeyRing::new(BTreeMap::from([(1, key)]), 1, 16).unwrap());
    let (state, tx, task) = watch(&p, &ring);
    tokio::time::sleep(Duration::from_millis(300)).await;
    moto.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = state.snapshot();
    assert_eq!(s.health, MasterKeyHealth::Ok, "{s:?}");
    assert!(!s.provider_reachable, "{s:?}");
    assert!(!ring.is_failed_closed());
    assert!(ring.file_keys(&[0u8; 16], 1, 1).is_ok());
    drop(tx);
    task.await.unwrap();
}

#[tokio::test]
async fn unreachable_kms_fails_fast_and_clearly() {
    moto::init_env();
    let port = free_port(); // nothing listens there
    let endpoint = format!("http://127.0.0.1:{port}");
    let arn = "arn:aws:kms:us-east-1:123456789012:key/00000000-1111-2222-3333-444444444444";
    let mut o = AwsKmsOptions::new(arn);
    o.endpoint = Some(endpoint.clone());
    let p = AwsKmsProvider::new(&o).await.expect("provider");

    // One call with the default retry policy.
    let t = Instant::now();
    let err = p
        .unwrap(&WrappedKey(vec![1, 2, 3]), &ctx("d"))
        .await
        .unwrap_err();
    let single = t.elapsed();
    assert!(matches!(err, KeyError::Unavailable(_)), "{err}");
    eprintln!("single Decrypt against a closed port failed after {single:?}: {err}");

    // Start-up deadline.
    let t = Instant::now();
    let err = p
        .unwrap_with_deadline(
            &WrappedKey(vec![1, 2, 3]),
            &ctx("d"),
            Duration::from_secs(3),
        )
        .await
        .unwrap_err();
    let took = t.elapsed();
    let msg = err.to_string();
    eprintln!("start-up deadline 3 s: failed after {took:?}: {msg}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(
        msg.contains(&format!("AWS KMS at {endpoint} unreachable after 3s")),
        "{msg}"
    );

    // The generic helper works for create too.
    let empty = EncryptionContext::new();
    let err = with_startup_deadline(&endpoint, Duration::from_secs(2), || {
        p.generate_wrapped(&empty)
    })
    .await
    .unwrap_err();
    assert!(matches!(err, KeyError::Unavailable(_)), "{err}");

    // master_key_state: an outage is not a revocation.
    assert!(matches!(
        p.master_key_state().await,
        Err(KeyError::Unavailable(_))
    ));

    // validate-key reports and skips.
    let t = Instant::now();
    let r = validate_key(&o).await;
    eprintln!("{r}\n(validate took {:?})", t.elapsed());
    assert!(!r.is_ok());
    assert!(matches!(
        r.outcome("kms:Decrypt returns 32 bytes"),
        Some(CheckOutcome::Skipped(_))
    ));
}

#[tokio::test]
async fn secret_key_never_in_debug() {
    let moto = moto_or_skip!();
    let arn = moto.create_key(KeySpec::SymmetricDefault, false).await;
    let p = provider(&moto, &arn).await;
    let c = ctx("d");
    let w = p.generate_wrapped(&c).await.unwrap();
    let k: SecretKey = p.unwrap(&w, &c).await.unwrap();
    let dbg = format!("{k:?} {p:?}");
    assert!(!dbg.contains(&hex::encode(k.expose())), "{dbg}");
}

#[tokio::test]
async fn silent_kms_is_cut_by_timeouts() {
    moto::init_env();
    // Accepts connections and never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let _hold = std::thread::spawn(move || {
        let mut conns = Vec::new();
        for c in listener.incoming().take(64) {
            conns.push(c);
        }
    });
    let arn = "arn:aws:kms:us-east-1:123456789012:key/00000000-1111-2222-3333-444444444444";
    let mut o = AwsKmsOptions::new(arn);
    o.endpoint = Some(endpoint.clone());
    o.attempt_timeout = Duration::from_millis(500);
    o.read_timeout = Duration::from_millis(500);
    o.max_attempts = 2;
    let p = AwsKmsProvider::new(&o).await.expect("provider");

    let t = Instant::now();
    let err = p.master_key_state().await.unwrap_err();
    let took = t.elapsed();
    eprintln!("silent KMS, 2 attempts x 500 ms: failed after {took:?}: {err}");
    assert!(matches!(err, KeyError::Unavailable(_)), "{err}");
    assert!(took < Duration::from_secs(5), "{took:?}");

    // Default per-call timeouts are longer than the start-up deadline: the
    // deadline still wins.
    let p = AwsKmsProvider::new(&{
        let mut o = AwsKmsOptions::new(arn);
        o.endpoint = Some(endpoint.clone());
        o
    })
    .await
    .expect("provider");
    let t = Instant::now();
    let err = p
        .unwrap_with_deadline(&WrappedKey(vec![1; 8]), &ctx("d"), Duration::from_secs(2))
        .await
        .unwrap_err();
    let took = t.elapsed();
    eprintln!("silent KMS, deadline 2 s: failed after {took:?}: {err}");
    assert!(took < Duration::from_secs(4), "{took:?}");
    assert!(err.to_string().contains("unreachable after 2s"), "{err}");
}
