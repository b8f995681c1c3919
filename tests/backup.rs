//! End-to-end tests of the backup engine with the in-memory block source and
//! sink, against a real local directory and against moto_server's S3:
//! full + incremental backups restore to the model at each cut, an edited
//! manifest or chunk is refused, an interrupted backup leaves nothing listed
//! as complete and the next one works, prune keeps chains whole.
//!
//! Then the binary end to end: the store's cut taken through the admin
//! socket while fio writes a versioned pattern (restored images checked
//! against the model of a sequential writer), SIGKILL of an offline backup,
//! edited objects and another KEK refused by the CLI, AWS KMS + S3 on moto
//! (restore, restore under another CMK, a disabled CMK), and ext4 frozen
//! with a hook, restored, fscked and compared.

#[path = "common/attach.rs"]
mod attach;
mod common;
#[path = "common/moto.rs"]
mod moto;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use common::Rng;
use ear_sidecar::backup::{
    self, chain, BackupError, BackupId, BackupOptions, BackupRequest, BackupTarget, BlockRecord,
    Destination, LocalTarget, ManifestError, ManifestKey, ManifestKeys, MemorySink, MemorySource,
    ObjectKey, PruneOptions, S3Options,
};
use ear_sidecar::crypto::SecretKey;

const BLOCKS: u64 = 1024; // 4 MiB export

type Model = BTreeMap<u64, BlockRecord>;

/// A write: a fresh slot (random "nonce" bytes) and random "ciphertext".
fn write(model: &mut Model, rng: &mut Rng, i: u64) {
    let mut slot = [0u8; 64];
    rng.fill(&mut slot);
    slot[24..26].copy_from_slice(&1u16.to_le_bytes());
    let mut data = vec![0u8; 4096];
    rng.fill(&mut data);
    model.insert(
        i,
        BlockRecord::new(i, slot, Some(Bytes::from(data))).unwrap(),
    );
}

/// A trim: a fresh kind-2 slot.
fn trim(model: &mut Model, rng: &mut Rng, i: u64) {
    let mut slot = [0u8; 64];
    rng.fill(&mut slot);
    slot[24..26].copy_from_slice(&2u16.to_le_bytes());
    model.insert(i, BlockRecord::new(i, slot, None).unwrap());
}

fn keys() -> ManifestKeys {
    let mut raw = [0x42u8; 32];
    ManifestKeys::new(ManifestKey::derive(
        1,
        &SecretKey::take_from(&mut raw).unwrap(),
    ))
}

fn other_keys() -> ManifestKeys {
    let mut raw = [0x43u8; 32];
    ManifestKeys::new(ManifestKey::derive(
        1,
        &SecretKey::take_from(&mut raw).unwrap(),
    ))
}

fn opts() -> BackupOptions {
    // Small windows and chunks so a 4 MiB export makes many objects.
    BackupOptions {
        window_blocks: 64,
        min_chunk_bytes: 64 * 4096,
        parallel: 3,
        ..BackupOptions::default()
    }
}

/// A full backup of "vol0" (no key registry) signed with `keys`.
fn full_request(keys: &ManifestKeys) -> BackupRequest<'_> {
    BackupRequest {
        export: "vol0".into(),
        parent: None,
        key_registry: vec![],
        keys,
        options: opts(),
    }
}

async fn take(
    target: &Arc<dyn BackupTarget>,
    model: &Model,
    parent: Option<&BackupId>,
    keys: &ManifestKeys,
) -> (backup::Manifest, backup::BackupStats) {
    let calls = AtomicU64::new(0);
    let out = backup::backup(
        target.clone(),
        MemorySource::new(BLOCKS * 4096, model.clone()),
        BackupRequest {
            export: "vol0".into(),
            parent: parent.cloned(),
            key_registry: br#"{"format":1,"versions":[]}"#.to_vec(),
            keys,
            options: opts(),
        },
        &|_p| {
            calls.fetch_add(1, Ordering::Relaxed);
        },
    )
    .await
    .expect("backup");
    assert!(calls.load(Ordering::Relaxed) >= out.0.totals.chunks);
    out
}

async fn restore(
    target: &Arc<dyn BackupTarget>,
    id: &BackupId,
    keys: &ManifestKeys,
) -> Result<Model, BackupError> {
    let (sink, stats) =
        backup::restore(target.clone(), id, keys, MemorySink::default(), 4, &|_| {}).await?;
    assert!(sink.finished);
    let info = sink.info.unwrap();
    assert_eq!(info.export, "vol0");
    assert_eq!(info.export_size, BLOCKS * 4096);
    assert_eq!(info.key_registry, br#"{"format":1,"versions":[]}"#);
    assert_eq!(stats.blocks, sink.blocks.len() as u64);
    Ok(sink.blocks)
}

async fn complete(target: &Arc<dyn BackupTarget>, keys: &ManifestKeys) -> Vec<BackupId> {
    chain::list(&**target, keys)
        .await
        .unwrap()
        .into_iter()
        .filter(|b| b.manifest.is_ok())
        .map(|b| b.id)
        .collect()
}

async fn flip_byte(target: &Arc<dyn BackupTarget>, key: &ObjectKey, at: usize) -> Bytes {
    let orig = target.get(key).await.unwrap();
    let mut v = orig.to_vec();
    let at = at.min(v.len() - 1);
    v[at] ^= 0x20;
    target.put(key, Bytes::from(v)).await.unwrap();
    orig
}

/// The whole scenario, on any target.
async fn scenario(target: Arc<dyn BackupTarget>) {
    let k = keys();
    let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15);
    let mut model = Model::new();
    for i in (0..BLOCKS).filter(|i| i % 5 != 3) {
        write(&mut model, &mut rng, i);
    }
    trim(&mut model, &mut rng, 3);

    // Full backup.
    let (full, s1) = take(&target, &model, None, &k).await;
    assert_eq!(full.parent, None);
    assert_eq!(s1.blocks, model.len() as u64);
    assert!(s1.chunks > 4, "expected several chunks, got {}", s1.chunks);
    assert_eq!(s1.chunks_reused, 0);
    let cut1 = model.clone();

    // Changes: overwrite, trim, write fresh blocks.
    for i in [0, 1, 2, 500, 501, 1023] {
        write(&mut model, &mut rng, i);
    }
    trim(&mut model, &mut rng, 10);
    write(&mut model, &mut rng, 8); // was never written
    let (inc1, s2) = take(&target, &model, Some(&full.backup_id), &k).await;
    assert_eq!(inc1.parent.as_ref(), Some(&full.backup_id));
    assert_eq!(s2.blocks, 8, "only changed blocks go into an incremental");
    assert_eq!(inc1.totals.blocks_present, model.len() as u64);
    let cut2 = model.clone();

    for i in [1, 700] {
        write(&mut model, &mut rng, i);
    }
    trim(&mut model, &mut rng, 0);
    let (inc2, s3) = take(&target, &model, Some(&inc1.backup_id), &k).await;
    assert_eq!(s3.blocks, 3);
    let cut3 = model.clone();

    // An unchanged export makes an empty incremental.
    let (inc3, s4) = take(&target, &model, Some(&inc2.backup_id), &k).await;
    assert_eq!(s4.blocks, 0);
    assert_eq!(inc3.chunks.len(), 0);

    // Each restore equals the model at its cut.
    assert_eq!(restore(&target, &full.backup_id, &k).await.unwrap(), cut1);
    assert_eq!(restore(&target, &inc1.backup_id, &k).await.unwrap(), cut2);
    assert_eq!(restore(&target, &inc2.backup_id, &k).await.unwrap(), cut3);
    assert_eq!(restore(&target, &inc3.backup_id, &k).await.unwrap(), cut3);
    let v = backup::verify(target.clone(), &inc3.backup_id, &k, 4, &|_| {})
        .await
        .unwrap();
    assert_eq!(v.chain.len(), 4);
    assert_eq!(v.blocks, s1.blocks + s2.blocks + s3.blocks);

    // Another universe key: refused.
    let e = restore(&target, &inc2.backup_id, &other_keys())
        .await
        .unwrap_err();
    assert!(
        matches!(e, BackupError::Manifest(ManifestError::BadMac { .. })),
        "{e}"
    );

    // An edited manifest is refused by verify and restore.
    let mkey = inc1.backup_id.manifest_key();
    let orig = flip_byte(&target, &mkey, 300).await;
    let e = backup::verify(target.clone(), &inc1.backup_id, &k, 2, &|_| {})
        .await
        .unwrap_err();
    assert!(
        matches!(e, BackupError::Manifest(ManifestError::BadMac { .. })),
        "{e}"
    );
    assert!(restore(&target, &inc1.backup_id, &k).await.is_err());
    // ... and so is a chain through it.
    let e = restore(&target, &inc2.backup_id, &k).await.unwrap_err();
    assert!(matches!(e, BackupError::Chain { .. }), "{e}");
    assert!(e.to_string().contains("chain is broken"), "{e}");
    target.put(&mkey, orig).await.unwrap();

    // An edited chunk is refused by verify and restore.
    let ckey = ObjectKey::object(&inc1.chunks[0].sha256).unwrap();
    let orig = flip_byte(&target, &ckey, 5000).await;
    let e = backup::verify(target.clone(), &inc2.backup_id, &k, 2, &|_| {})
        .await
        .unwrap_err();
    assert!(matches!(e, BackupError::Chunk { .. }), "{e}");
    assert!(e.to_string().contains("SHA-256 mismatch"), "{e}");
    assert!(matches!(
        restore(&target, &inc2.backup_id, &k).await.unwrap_err(),
        BackupError::Chunk { .. }
    ));
    target.put(&ckey, orig).await.unwrap();
    backup::verify(target.clone(), &inc3.backup_id, &k, 4, &|_| {})
        .await
        .unwrap();

    // Interrupted backups: a failing source, then a dropped future. Neither
    // is listed as complete; the next backup works and re-uses chunks.
    let before = complete(&target, &k).await;
    assert_eq!(before.len(), 4);
    let mut failing = MemorySource::new(BLOCKS * 4096, model.clone());
    failing.fail_after = Some(600);
    let e = backup::backup(target.clone(), failing, full_request(&k), &|_| {})
        .await
        .unwrap_err();
    assert!(matches!(e, BackupError::Source(_)), "{e}");
    assert_eq!(complete(&target, &k).await, before);

    for i in 0..BLOCKS {
        write(&mut model, &mut rng, i); // every chunk new
    }
    let uploaded = Arc::new(tokio::sync::Notify::new());
    let n = uploaded.clone();
    let counter = AtomicU64::new(0);
    let notify_third = |_: &backup::Progress| {
        if counter.fetch_add(1, Ordering::Relaxed) == 2 {
            n.notify_one();
        }
    };
    let fut = backup::backup(
        target.clone(),
        MemorySource::new(BLOCKS * 4096, model.clone()),
        full_request(&k),
        &notify_third,
    );
    tokio::select! {
        r = fut => panic!("backup finished before it was interrupted: {:?}", r.map(|m| m.0.backup_id)),
        _ = uploaded.notified() => {}
    }
    assert_eq!(
        complete(&target, &k).await,
        before,
        "an interrupted backup is listed"
    );
    let (full2, s5) = take(&target, &model, None, &k).await;
    assert!(
        s5.chunks_reused >= 3,
        "chunks of the interrupted backup are re-used: {s5:?}"
    );
    assert_eq!(restore(&target, &full2.backup_id, &k).await.unwrap(), model);

    // Prune keeps chains whole: keep 1 of this export keeps full2 alone;
    // keep 2 would keep inc3 and therefore its whole chain.
    let mut p = PruneOptions {
        keep: 2,
        dry_run: true,
        ..Default::default()
    };
    let r = chain::prune(&*target, &k, &p).await.unwrap();
    assert_eq!(r.kept.len(), 5, "{r:?}");
    assert!(r.removed.is_empty());
    p.keep = 1;
    p.dry_run = false;
    let r = chain::prune(&*target, &k, &p).await.unwrap();
    assert_eq!(r.kept, vec![full2.backup_id.to_string()]);
    assert_eq!(r.removed.len(), 4);
    assert!(r.objects_removed > 0);
    assert_eq!(complete(&target, &k).await, vec![full2.backup_id.clone()]);
    backup::verify(target.clone(), &full2.backup_id, &k, 4, &|_| {})
        .await
        .unwrap();
    assert_eq!(restore(&target, &full2.backup_id, &k).await.unwrap(), model);
    // Everything the kept backup references is still there (objects left
    // by the interrupted backups and not re-used are younger than the
    // grace period, so they stay too).
    let listed: std::collections::BTreeSet<String> = target
        .list("objects/")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    for c in &full2.chunks {
        assert!(listed.contains(&format!("objects/{}", c.sha256)));
    }
    assert!(listed.contains(&format!("objects/{}", full2.slot_index.sha256)));

    // Incremental chain survives a prune that drops an older full backup.
    write(&mut model, &mut rng, 77);
    let (inc4, _) = take(&target, &model, Some(&full2.backup_id), &k).await;
    let keep = |keep| PruneOptions {
        keep,
        ..Default::default()
    };
    let r = chain::prune(&*target, &k, &keep(1)).await.unwrap();
    assert_eq!(
        r.removed.len(),
        0,
        "the parent of the kept backup must stay"
    );
    assert_eq!(r.kept.len(), 2);
    assert_eq!(restore(&target, &inc4.backup_id, &k).await.unwrap(), model);
    assert!(chain::prune(&*target, &k, &keep(0)).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_directory_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("backups");
    // Objects committed one by one, so that the interrupted backup of the
    // scenario leaves some for the next one to re-use (its data is far
    // smaller than a real batch).
    let target: Arc<dyn BackupTarget> = Arc::new(
        LocalTarget::open(root.clone())
            .await
            .unwrap()
            .with_batch_bytes(1),
    );
    scenario(target).await;
    // Nothing but objects and manifests (and the empty temp directory).
    let tmp: Vec<_> = std::fs::read_dir(root.join(".tmp")).unwrap().collect();
    assert!(tmp.is_empty(), "temporary files left behind: {tmp:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_on_moto_end_to_end() {
    let Some(moto) = moto::Moto::start() else {
        return;
    };
    // The SDK's standard variable: the target must pick it up (and use
    // path-style addressing, which moto needs).
    std::env::set_var("AWS_ENDPOINT_URL_S3", &moto.endpoint);
    let admin = {
        let conf = aws_sdk_s3::Config::builder()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(aws_sdk_s3::config::Region::new(moto::REGION))
            .endpoint_url(&moto.endpoint)
            .force_path_style(true)
            .credentials_provider(aws_sdk_s3::config::Credentials::new(
                "testing", "testing", None, None, "moto",
            ))
            .build();
        aws_sdk_s3::Client::from_conf(conf)
    };
    admin
        .create_bucket()
        .bucket("ear-backups")
        .send()
        .await
        .expect("CreateBucket on moto");

    let dest = Destination::parse("s3://ear-backups/cluster-a/tserver-0").unwrap();
    let target = dest.open(&S3Options::default()).await.unwrap();
    assert_eq!(target.describe(), "s3://ear-backups/cluster-a/tserver-0");

    // A large object goes up as a parallel multipart upload and reads back whole.
    let mut big = vec![0u8; 20 << 20];
    Rng::new(7).fill(&mut big);
    let key = ObjectKey::parse("objects/big").unwrap();
    target.put(&key, Bytes::from(big.clone())).await.unwrap();
    assert_eq!(target.get(&key).await.unwrap(), Bytes::from(big));
    let listed = target.list("objects/").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].size, 20 << 20);
    let mpu = admin
        .list_multipart_uploads()
        .bucket("ear-backups")
        .send()
        .await
        .unwrap();
    assert!(
        mpu.uploads().is_empty(),
        "no unfinished multipart upload left"
    );
    let head = admin
        .head_object()
        .bucket("ear-backups")
        .key("cluster-a/tserver-0/objects/big")
        .send()
        .await
        .unwrap();
    assert!(
        head.e_tag().unwrap_or_default().ends_with("-2\"")
            || head.e_tag().unwrap_or_default().ends_with("-2"),
        "expected a 2-part multipart ETag, got {:?}",
        head.e_tag()
    );
    target.delete(&key).await.unwrap();
    assert!(!target.exists(&key).await.unwrap());

    scenario(target).await;
}

// ------------------------------------------------------------------------
// The binary end to end: the store's cut while clients write, the CLI,
// restore into a new data directory served by a second sidecar.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{require_tool, run, run_ok, Output, Sidecar};

/// Size of the exports of the end-to-end tests.
const E2E_SIZE: u64 = 256 << 20;
/// fio request size: every request writes one pattern region.
const REGION: usize = 64 << 10;
/// fio queue depth: at the cut at most this many requests are in flight.
const DEPTH: usize = 4;

/// The bytes fio writes into the region at `offset` in pass `version`:
/// `verify_pattern=0x56<'0'+version>%o` repeats "V<digit>" followed by the
/// request's offset (le64) from the start of each request.
fn region_bytes(version: u8, offset: u64) -> Vec<u8> {
    let mut unit = vec![0x56, b'0' + version];
    unit.extend_from_slice(&offset.to_le_bytes());
    unit.iter().copied().cycle().take(REGION).collect()
}

/// Sequential writers of a throttled pass: each writes its own quarter of
/// the export from its start, so some write ahead of the backup reader
/// wherever it is (which exercises the copy-on-write path).
const WRITERS: usize = 4;

/// One pass of fio over the whole export writing `version`. Unthrottled it
/// is one sequential writer; at `rate` (per writer, e.g. "8m") it is
/// [`WRITERS`] sequential writers, one per quarter, so a cut lands in the
/// middle of each.
fn fio_pass(uri: &str, version: u8, rate: Option<&str>, dir: &Path) -> Child {
    let mut c = Command::new("fio");
    c.current_dir(dir).args([
        "--name=pass",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=write",
        &format!("--bs={REGION}"),
        &format!("--iodepth={DEPTH}"),
        "--verify=pattern",
        &format!("--verify_pattern=0x56{:02x}%o", b'0' + version),
        "--do_verify=0",
    ]);
    match rate {
        Some(r) => {
            let quarter = E2E_SIZE / WRITERS as u64;
            c.args([
                format!("--rate={r}"),
                format!("--numjobs={WRITERS}"),
                format!("--size={quarter}"),
                format!("--offset_increment={quarter}"),
            ]);
        }
        None => {
            c.arg(format!("--size={E2E_SIZE}"));
        }
    }
    c.stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run fio")
}

fn wait_ok(c: Child, what: &str) {
    let out = c.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Checks that `img` is the export at one instant of a fio pass writing
/// `new` over `old` with `writers` sequential writers, one per equal part:
/// every region holds one of the two versions (nothing torn, nothing
/// misplaced), and in each part the regions written form the requests its
/// writer had issued by some point, less at most `DEPTH` (those in flight at
/// that instant): before the part's last new region, at most `DEPTH`
/// regions are still old. A write after the cut leaking into the backup
/// shows as a new region far beyond the others. Returns the number of new
/// regions in each part.
fn check_cut(img: &[u8], new: u8, old: u8, writers: usize) -> Result<Vec<usize>, String> {
    let n = img.len() / REGION;
    let mut is_new = Vec::with_capacity(n);
    for r in 0..n {
        let off = (r * REGION) as u64;
        let got = &img[r * REGION..(r + 1) * REGION];
        if got == region_bytes(new, off).as_slice() {
            is_new.push(true);
        } else if got == region_bytes(old, off).as_slice() {
            is_new.push(false);
        } else {
            return Err(format!(
                "region {r} (offset {off}) is neither version {new} nor {old}: torn or misplaced"
            ));
        }
    }
    let per = n / writers;
    let mut out = vec![];
    for (w, part) in is_new.chunks(per).enumerate() {
        let Some(last) = part.iter().rposition(|&x| x) else {
            out.push(0);
            continue;
        };
        let holes = part[..last].iter().filter(|&&x| !x).count();
        if holes > DEPTH {
            return Err(format!(
                "region {} has version {new} but {holes} regions before it in its writer's part are still version {old} (at most {DEPTH} requests are in flight): a write after the cut leaked into the backup",
                w * per + last
            ));
        }
        out.push(part.iter().filter(|&&x| x).count());
    }
    Ok(out)
}

/// Runs `ear-sidecar ARGS` with the environment of sidecar `s` (its
/// default KEK) plus `env`.
fn cli(s: &Sidecar, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(common::sidecar_bin());
    c.args(args)
        .env_remove("EAR_CONFIG")
        .env("XDG_CONFIG_HOME", s.config_home());
    for (k, v) in env {
        c.env(k, v);
    }
    run(&mut c)
}

fn cli_ok(s: &Sidecar, args: &[&str], env: &[(&str, &str)]) -> Output {
    let out = cli(s, args, env);
    assert!(
        out.status.success(),
        "ear-sidecar {args:?} failed ({}):\n{}",
        out.status,
        out.both()
    );
    out
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", out.both()))
}

/// Serves data directory `dir` (KEK `kek`) with a second sidecar and reads
/// export `export` whole with nbdcopy.
fn read_restored(
    dir: &Path,
    kek: &Path,
    export: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Vec<u8> {
    let kek = kek.display().to_string();
    let mut args = vec!["--kms", "local", "--local-kek-file", kek.as_str()];
    if !extra.is_empty() {
        args = extra.to_vec();
    }
    let mut r = Sidecar::new_stopped(&args);
    for (k, v) in env {
        r.set_env(k, Some(v));
    }
    r.set_data_dir(dir.to_path_buf());
    r.start_again();
    let out = r.root().join("image");
    run_ok(Command::new("nbdcopy").arg(r.uri(export)).arg(&out));
    r.stop();
    std::fs::read(&out).expect("read the copied image")
}

#[test]
fn cut_under_fio_full_and_incremental_restore_to_the_image_at_each_cut() {
    require_tool("fio");
    require_tool("nbdcopy");
    let mut s = Sidecar::start(&["--export", "v=256M"]);
    let root = s.root().to_path_buf();
    let dest = root.join("backups").display().to_string();
    let adm = s.admin_socket().display().to_string();
    let uri = s.uri("v");

    let t0 = Instant::now();
    wait_ok(fio_pass(&uri, 1, None, &root), "fio pass 1");
    eprintln!("{:?}: fio pass 1 done", t0.elapsed());
    let mut reports = vec![];
    for version in [2u8, 3] {
        // The cut is taken while fio writes `version` over `version - 1`,
        // four writers at 8 MiB/s each (about 8 s for the export).
        let fio = fio_pass(&uri, version, Some("8m"), &root);
        // Cut once fio is under way (its start-up time varies with load):
        // the third region already holds the new version.
        let probe = (2 * REGION) as u64;
        let want = region_bytes(version, probe);
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut c = s.client("v");
        while c.read(probe, REGION as u32).unwrap().unwrap() != want {
            assert!(
                Instant::now() < deadline,
                "fio pass {version} did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        c.disconnect();
        let t = Instant::now();
        let out = cli_ok(
            &s,
            &[
                "backup",
                "--export",
                "v",
                "--to",
                &dest,
                "--admin-socket",
                &adm,
                "--json",
            ],
            &[],
        );
        let took = t.elapsed();
        wait_ok(fio, "fio pass");
        let r = json(&out);
        eprintln!(
            "backup during pass {version}: {:?} total, cut pause {} us, {} blocks preserved, {} bytes uploaded",
            took, r["cut"]["pause_us"], r["cut"]["preserved_blocks"], r["bytes_uploaded"]
        );
        reports.push(r);
    }
    assert_eq!(reports[0]["incremental"], false);
    assert_eq!(reports[1]["incremental"], true);
    assert_eq!(reports[1]["parent"], reports[0]["backup_id"]);
    assert!(
        reports
            .iter()
            .any(|r| r["cut"]["preserved_blocks"].as_u64() > Some(0)),
        "fio wrote ahead of the backup reader: some blocks must have been preserved: {reports:?}"
    );
    let metrics_free = s.log();
    assert!(metrics_free.contains("backup cut taken"), "{metrics_free}");

    let listed = json(&cli_ok(
        &s,
        &["backup", "list", "--from", &dest, "--json"],
        &[],
    ));
    assert_eq!(
        listed["backups"].as_array().map(Vec::len),
        Some(2),
        "{listed}"
    );
    eprintln!("{:?}: backups taken", t0.elapsed());
    cli_ok(
        &s,
        &["backup", "verify", "--from", &dest, "--decrypt-check"],
        &[],
    );
    eprintln!("{:?}: verified", t0.elapsed());

    for (i, (new, old)) in [(2u8, 1u8), (3, 2)].into_iter().enumerate() {
        let id = reports[i]["backup_id"].as_str().unwrap().to_string();
        let dir = root.join(format!("restored-{i}"));
        cli_ok(
            &s,
            &[
                "restore",
                "--from",
                &dest,
                "--backup",
                &id,
                "--data-dir",
                &dir.display().to_string(),
            ],
            &[],
        );
        eprintln!("{:?}: restored {id}", t0.elapsed());
        let img = read_restored(&dir, &s.kek_file(), "v", &[], &[]);
        eprintln!("{:?}: read back {id}", t0.elapsed());
        assert_eq!(img.len() as u64, E2E_SIZE);
        let parts =
            check_cut(&img, new, old, WRITERS).unwrap_or_else(|e| panic!("backup {id}: {e}"));
        let per = E2E_SIZE as usize / REGION / WRITERS;
        eprintln!(
            "backup {id}: the image at the cut had {parts:?} of {per} regions per writer of pass {new}"
        );
        assert!(
            parts.iter().all(|&p| p < per) && parts.iter().any(|&p| p > 0),
            "the cut must land inside the fio pass (got {parts:?} of {per} per writer)"
        );
    }
    s.stop();
}

/// The body of `GET path` on `addr` (HTTP/1.0, no keep-alive).
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).expect("connect to the metrics listener");
    write!(c, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    out
}

/// Flips one byte of `file` at `at` (from its end when negative).
fn flip(file: &Path, at: i64) {
    let mut b = std::fs::read(file).unwrap();
    let i = if at < 0 { b.len() as i64 + at } else { at } as usize;
    b[i] ^= 0x01;
    std::fs::write(file, b).unwrap();
}

fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn killed_backup_lists_nothing_tampering_and_a_wrong_kek_are_refused() {
    require_tool("fio");
    require_tool("nbdcopy");
    let mut s = Sidecar::start(&["--export", "v=256M"]);
    let root = s.root().to_path_buf();
    let dest = root.join("backups");
    let dest_s = dest.display().to_string();
    let data = s.data_dir().display().to_string();
    wait_ok(fio_pass(&s.uri("v"), 1, None, &root), "fio pass 1");
    s.stop();

    // SIGKILL in the middle of an offline backup (once its first chunk is stored).
    let mut child = Command::new(common::sidecar_bin())
        .args([
            "backup",
            "--export",
            "v",
            "--to",
            &dest_s,
            "--data-dir",
            &data,
        ])
        .env("XDG_CONFIG_HOME", s.config_home())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn backup");
    let t = Instant::now();
    while files(&dest.join("objects")).is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the backup stored nothing"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().expect("SIGKILL the backup");
    child.wait().unwrap();
    assert!(
        files(&dest.join("manifests")).is_empty(),
        "the backup finished before the kill; nothing was interrupted"
    );
    let out = cli(&s, &["backup", "list", "--from", &dest_s], &[]);
    assert!(!out.status.success(), "{}", out.both());
    assert!(out.stderr.contains("no backups"), "{}", out.both());
    // The directory lock died with the process: the next backup works.
    let r = json(&cli_ok(
        &s,
        &[
            "backup",
            "--export",
            "v",
            "--to",
            &dest_s,
            "--data-dir",
            &data,
            "--json",
        ],
        &[],
    ));
    assert_eq!(r["incremental"], false);
    let id = r["backup_id"].as_str().unwrap().to_string();
    let listed = json(&cli_ok(
        &s,
        &["backup", "list", "--from", &dest_s, "--json"],
        &[],
    ));
    assert_eq!(
        listed["backups"].as_array().map(Vec::len),
        Some(1),
        "{listed}"
    );
    cli_ok(
        &s,
        &["backup", "verify", "--from", &dest_s, "--decrypt-check"],
        &[],
    );

    // An edited chunk, then an edited manifest: verify and restore refuse.
    let chunk = files(&dest.join("objects"))
        .into_iter()
        .max_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .unwrap();
    let manifest = files(&dest.join("manifests")).pop().unwrap();
    for (what, file, at, needle) in [
        ("chunk", &chunk, -100, "SHA-256"),
        ("manifest", &manifest, -10, "authentic"),
    ] {
        flip(file, at);
        let v = cli(
            &s,
            &["backup", "verify", "--from", &dest_s, "--backup", &id],
            &[],
        );
        assert!(!v.status.success(), "verify accepted an edited {what}");
        assert!(v.stderr.contains(needle), "edited {what}: {}", v.both());
        let dir = root.join(format!("restored-{what}"));
        let r = cli(
            &s,
            &[
                "restore",
                "--from",
                &dest_s,
                "--data-dir",
                &dir.display().to_string(),
            ],
            &[],
        );
        assert!(!r.status.success(), "restore accepted an edited {what}");
        assert!(r.stderr.contains(needle), "edited {what}: {}", r.both());
        assert!(!dir.exists(), "a refused restore must leave nothing behind");
        eprintln!("edited {what}: {}", r.stderr.trim());
        flip(file, at);
    }

    // Another KEK cannot unwrap the backup's keys.
    let other = Sidecar::start(&[]);
    let dir = root.join("restored-other-kek");
    let r = cli(
        &s,
        &[
            "restore",
            "--from",
            &dest_s,
            "--data-dir",
            &dir.display().to_string(),
            "--local-kek-file",
            &other.kek_file().display().to_string(),
        ],
        &[],
    );
    assert!(!r.status.success(), "restored with another KEK");
    eprintln!("other KEK: {}", r.stderr.trim());
    assert!(r.stderr.contains("unwrap"), "{}", r.both());

    // The untouched backup restores to the image.
    let dir = root.join("restored");
    cli_ok(
        &s,
        &[
            "restore",
            "--from",
            &dest_s,
            "--data-dir",
            &dir.display().to_string(),
        ],
        &[],
    );
    let img = read_restored(&dir, &s.kek_file(), "v", &[], &[]);
    assert_eq!(
        check_cut(&img, 1, 1, 1),
        Ok(vec![E2E_SIZE as usize / REGION])
    );
}

#[test]
fn aws_kms_and_s3_online_backup_restores_and_a_disabled_cmk_fails_clearly() {
    require_tool("qemu-io");
    require_tool("nbdcopy");
    let Some(moto) = moto::Moto::start() else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let arn = rt.block_on(moto.create_key(aws_sdk_kms::types::KeySpec::SymmetricDefault, false));
    rt.block_on(async {
        let conf = aws_sdk_s3::Config::builder()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(aws_sdk_s3::config::Region::new(moto::REGION))
            .endpoint_url(&moto.endpoint)
            .force_path_style(true)
            .credentials_provider(aws_sdk_s3::config::Credentials::new(
                "testing", "testing", None, None, "moto",
            ))
            .build();
        aws_sdk_s3::Client::from_conf(conf)
            .create_bucket()
            .bucket("ear-e2e")
            .send()
            .await
            .expect("CreateBucket on moto");
    });
    let env: Vec<(&str, &str)> = vec![
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_SESSION_TOKEN", "testing"),
        ("AWS_REGION", moto::REGION),
        ("AWS_ENDPOINT_URL_KMS", &moto.endpoint),
        ("AWS_ENDPOINT_URL_S3", &moto.endpoint),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ];
    let aws_args = ["--kms", "aws", "--kms-key-id", arn.as_str()];
    let mut s = Sidecar::new_stopped(&[]);
    for (k, v) in &env {
        s.set_env(k, Some(v));
    }
    let mut args = aws_args.to_vec();
    args.extend(["--export", "v=32M"]);
    s.set_args(&args);
    s.set_metrics_addr(&format!("127.0.0.1:{}", moto::free_port()));
    s.start_again();
    common::qemu_io(
        &s.uri("v"),
        &[
            "write -P 0x5a 0 4M",
            "write -P 0xa5 20M 1M",
            "discard 1M 512k",
        ],
    );
    let dest = "s3://ear-e2e/cluster/node-0";
    let adm = s.admin_socket().display().to_string();
    let r = json(&cli_ok(
        &s,
        &[
            "backup",
            "--export",
            "v",
            "--to",
            dest,
            "--admin-socket",
            &adm,
            "--json",
        ],
        &env,
    ));
    common::qemu_io(&s.uri("v"), &["write -P 0x33 8M 1M"]);
    let r2 = json(&cli_ok(
        &s,
        &[
            "backup",
            "--export",
            "v",
            "--to",
            dest,
            "--admin-socket",
            &adm,
            "--json",
        ],
        &env,
    ));
    assert_eq!(r2["parent"], r["backup_id"]);
    let scrape = http_get(s.metrics_addr(), "/metrics");
    for m in [
        "ear_backup_last_success_timestamp_seconds{export=\"v\"}",
        "ear_backup_last_duration_seconds{export=\"v\"}",
        "ear_backup_last_bytes{export=\"v\"}",
        "ear_backup_last_cut_pause_seconds{export=\"v\"}",
    ] {
        assert!(scrape.contains(m), "{m} missing from /metrics:\n{scrape}");
    }
    let live = s.root().join("live.img");
    run_ok(Command::new("nbdcopy").arg(s.uri("v")).arg(&live));
    let live = std::fs::read(&live).unwrap();
    s.stop();

    let kms = ["--kms-endpoint", moto.endpoint.as_str()];
    let restore = |name: &str| {
        let dir = s.root().join(name);
        let mut a = vec!["restore", "--from", dest, "--data-dir"];
        let d = dir.display().to_string();
        a.push(&d);
        a.extend(kms);
        (dir.clone(), cli(&s, &a, &env))
    };
    let (dir, out) = restore("restored");
    assert!(out.status.success(), "{}", out.both());
    let mut serve = aws_args.to_vec();
    serve.extend(["--log-level", "warn"]);
    let img = read_restored(&dir, Path::new(""), "v", &serve, &env);
    if let Some(i) = img.iter().zip(&live).position(|(a, b)| a != b) {
        panic!(
            "the restored image differs from the export at byte {i} (lengths {} and {}): {:x} vs {:x}",
            img.len(),
            live.len(),
            img[i],
            live[i]
        );
    }
    assert_eq!(img.len(), live.len());

    // Under another CMK: the restored directory is served with it.
    let other = rt.block_on(moto.create_key(aws_sdk_kms::types::KeySpec::SymmetricDefault, false));
    let dir_b = s.root().join("restored-other-cmk");
    let d = dir_b.display().to_string();
    let mut a = vec![
        "restore",
        "--from",
        dest,
        "--data-dir",
        &d,
        "--kms-key-id",
        &other,
    ];
    a.extend(kms);
    cli_ok(&s, &a, &env);
    let reg = std::fs::read_to_string(dir_b.join("keys.json")).unwrap();
    assert!(reg.contains(&other) && !reg.contains(&arn), "{reg}");
    let serve_b = [
        "--kms",
        "aws",
        "--kms-key-id",
        other.as_str(),
        "--log-level",
        "warn",
    ];
    assert!(read_restored(&dir_b, Path::new(""), "v", &serve_b, &env) == live);

    // Disabled CMK: restore and the decrypt check fail and say why.
    rt.block_on(moto.set_enabled(&arn, false));
    let (dir, out) = restore("restored-disabled");
    assert!(!out.status.success(), "restored under a disabled CMK");
    eprintln!("disabled CMK, restore: {}", out.stderr.trim());
    assert!(
        out.stderr.to_lowercase().contains("disabled"),
        "{}",
        out.both()
    );
    assert!(!dir.exists());
    let mut v = vec!["backup", "verify", "--from", dest, "--decrypt-check"];
    v.extend(kms);
    let out = cli(&s, &v, &env);
    assert!(!out.status.success());
    assert!(
        out.stderr.to_lowercase().contains("disabled"),
        "{}",
        out.both()
    );
    rt.block_on(moto.set_enabled(&arn, true));
    cli_ok(&s, &v, &env);
}

#[test]
fn ext4_fsfreeze_backup_restores_to_a_clean_filesystem() {
    if let Some(why) =
        attach::missing_prerequisite(&["mkfs.ext4", "e2fsck", "fsfreeze", "sha256sum"])
    {
        println!("SKIPPED: ext4_fsfreeze_backup_restores_to_a_clean_filesystem: {why}");
        return;
    }
    let mut s = Sidecar::start(&["--export", "default=96M"]);
    let root = s.root().to_path_buf();
    let mut a = attach::Attached::new(&s.socket(), &root.join("live"));
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&a.loopdev));
    a.mount();
    let mnt = a.mnt.display().to_string();
    // Files whose content the restored filesystem must have, with their
    // checksums outside the volume.
    run_ok(Command::new("sh").arg("-c").arg(format!(
        "cd {mnt} && for i in $(seq 1 16); do head -c 1048576 /dev/urandom > f$i; done && sync && sha256sum f* > {}",
        root.join("sums").display()
    )));
    // A writer that keeps changing the filesystem during the backup.
    let mut writer = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "i=0; while :; do head -c 262144 /dev/urandom > {mnt}/w$((i % 8)); i=$((i+1)); done"
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let hook = root.join("hook.sh");
    let hook_log = root.join("hook.log");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\nset -e\ncase \"$1\" in\n  freeze) fsfreeze -f {mnt} ;;\n  thaw) fsfreeze -u {mnt} ;;\nesac\necho \"$1 $(date +%s%N)\" >> {}\n",
            hook_log.display()
        ),
    )
    .unwrap();
    let dest = root.join("backups").display().to_string();
    let adm = s.admin_socket().display().to_string();
    let hook_cmd = format!("sh {}", hook.display());
    let r = json(&cli_ok(
        &s,
        &[
            "backup",
            "--export",
            "default",
            "--to",
            &dest,
            "--admin-socket",
            &adm,
            "--freeze-hook",
            &hook_cmd,
            "--json",
        ],
        &[],
    ));
    let _ = writer.kill();
    let _ = writer.wait();
    let log = std::fs::read_to_string(&hook_log).unwrap();
    let stamps: Vec<u64> = log
        .lines()
        .filter_map(|l| l.split(' ').nth(1)?.parse().ok())
        .collect();
    assert!(
        log.starts_with("freeze ") && log.lines().nth(1).is_some_and(|l| l.starts_with("thaw ")),
        "{log}"
    );
    eprintln!(
        "filesystem frozen for {:.1} ms (the hook's own time included); cut pause {} us; backup took {} s",
        (stamps[1] - stamps[0]) as f64 / 1e6,
        r["cut"]["pause_us"],
        r["duration"]
    );
    a.detach();
    s.stop();

    let dir = root.join("restored");
    cli_ok(
        &s,
        &[
            "restore",
            "--from",
            &dest,
            "--data-dir",
            &dir.display().to_string(),
        ],
        &[],
    );
    let kek = s.kek_file().display().to_string();
    let mut r = Sidecar::new_stopped(&["--kms", "local", "--local-kek-file", &kek]);
    r.set_data_dir(dir);
    r.start_again();
    let mut b = attach::Attached::new(&r.socket(), &r.root().join("restored"));
    let fsck = run(Command::new("e2fsck").args(["-fn", &b.loopdev]));
    assert_eq!(
        fsck.status.code(),
        Some(0),
        "e2fsck of the restored image:\n{}",
        fsck.both()
    );
    b.mount();
    run_ok(Command::new("sh").arg("-c").arg(format!(
        "cd {} && sha256sum -c --quiet {}",
        b.mnt.display(),
        root.join("sums").display()
    )));
    b.detach();
    r.stop();
}

#[test]
fn sidecar_killed_during_an_online_backup_lists_nothing_and_the_next_backup_works() {
    require_tool("fio");
    let mut s = Sidecar::start(&["--export", "v=256M"]);
    let root = s.root().to_path_buf();
    let dest = root.join("backups");
    let dest_s = dest.display().to_string();
    let adm = s.admin_socket().display().to_string();
    wait_ok(fio_pass(&s.uri("v"), 1, None, &root), "fio pass 1");
    let child = Command::new(common::sidecar_bin())
        .args([
            "backup",
            "--export",
            "v",
            "--to",
            &dest_s,
            "--admin-socket",
            &adm,
        ])
        .env("XDG_CONFIG_HOME", s.config_home())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn backup");
    let t = Instant::now();
    while files(&dest.join("objects")).is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the backup stored nothing"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    s.kill9();
    let out = child.wait_with_output().unwrap();
    assert!(
        files(&dest.join("manifests")).is_empty(),
        "the backup finished before the kill; nothing was interrupted"
    );
    assert!(
        !out.status.success(),
        "the CLI must report the lost sidecar"
    );
    eprintln!(
        "CLI after the sidecar died: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    s.start_again();
    let out = cli(&s, &["backup", "list", "--from", &dest_s], &[]);
    assert!(out.stderr.contains("no backups"), "{}", out.both());
    let r = json(&cli_ok(
        &s,
        &[
            "backup",
            "--export",
            "v",
            "--to",
            &dest_s,
            "--admin-socket",
            &adm,
            "--json",
        ],
        &[],
    ));
    assert!(
        r["chunks_reused"].as_u64() > Some(0),
        "objects of the killed backup are re-used: {r}"
    );
    cli_ok(
        &s,
        &["backup", "verify", "--from", &dest_s, "--decrypt-check"],
        &[],
    );
    s.stop();
}
