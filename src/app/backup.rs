//! `ear-sidecar backup` (take, list, prune, verify) and `ear-sidecar
//! restore`: key unwrapping, the destination, progress and reports around
//! the engine of [`crate::backup`] and the store's cut and restore sink.
//!
//! Keys: an offline backup uses the data directory's registry; every other
//! command uses the key registry carried in the backup (wrapped keys only),
//! unwrapped through the provider it names. So restoring needs exactly the
//! CMK (or the local KEK file), and nothing from the original node.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;

use crate::backup::{
    self, chain, manifest, BackupId, BackupOptions, BackupRequest, BackupTarget, Destination,
    Manifest, ManifestKeys, PruneOptions, S3Options,
};
use crate::config::{
    BackupArgs, BackupCommand, BackupKeyArgs, BackupListArgs, BackupPruneArgs, BackupTakeArgs,
    BackupVerifyArgs, RestoreArgs,
};
use crate::crypto::KeyRing;
use crate::keys::registry::Registry;
use crate::store::{self, DecryptCheckSink, Export, RestoreSink};

/// Unwraps every universe key of `reg`.
async fn unwrap(reg: &Registry, k: &BackupKeyArgs) -> Result<Arc<KeyRing>> {
    if !reg.encryption_on() {
        bail!("backups need encryption: the data directory is unencrypted");
    }
    let p = super::keys_wrap::registry_provider(
        reg,
        k.local_kek_file.clone(),
        &k.kms_endpoint,
        &k.kms_region,
    )
    .await?;
    // KMS may still decrypt under a key it reports disabled or pending
    // deletion (moto does); the key's state decides, as at serve start-up.
    if let crate::keys::MasterKeyState::Revoked(why) = p
        .master_key_state()
        .await
        .context("check the CMK's state")?
    {
        bail!(
            "the CMK {} is not usable ({why}); every backup made under it is unreadable until it is enabled again",
            reg.master_key_id().unwrap_or("?")
        );
    }
    let ring = reg
        .unwrap_all(p.as_ref(), 64)
        .await
        .context("unwrap the universe key of the backup (the CMK must be usable)")?;
    Ok(Arc::new(ring))
}

fn manifest_keys(ring: &KeyRing) -> Result<ManifestKeys> {
    ManifestKeys::from_ring(ring).context("derive the backup manifest keys")
}

pub(crate) async fn open_target(dest: &str) -> Result<Arc<dyn BackupTarget>> {
    let d = Destination::parse(dest)?;
    d.open(&S3Options::default())
        .await
        .with_context(|| format!("open backup destination {dest}"))
}

/// The key registry a destination's backups carry: that of `id`, else of
/// the newest backup (of `export`, when given). Read before authentication;
/// every manifest is then authenticated under the keys it unwraps to.
async fn carried_registry(
    target: &dyn BackupTarget,
    id: Option<&BackupId>,
    export: Option<&str>,
) -> Result<(Registry, Vec<u8>)> {
    let ids: Vec<BackupId> = match id {
        Some(id) => vec![id.clone()],
        None => {
            let mut v: Vec<BackupId> = target
                .list("manifests/")
                .await?
                .iter()
                .filter_map(|o| BackupId::from_manifest_key(&o.key))
                .collect();
            v.sort();
            v.reverse();
            v
        }
    };
    for id in &ids {
        let bytes = match target.get(&id.manifest_key()).await {
            Ok(b) => b,
            Err(e) if ids.len() == 1 => return Err(anyhow!(e).context(format!("backup {id}"))),
            Err(_) => continue,
        };
        let m = match manifest::parse_unauthenticated(id, &bytes) {
            Ok(m) => m,
            Err(e) if ids.len() == 1 => return Err(anyhow!(e).context(format!("backup {id}"))),
            Err(_) => continue,
        };
        if export.is_some_and(|x| x != m.export) {
            continue;
        }
        let raw = m.key_registry_bytes();
        let reg = Registry::parse(Path::new("keys.json (from the backup)"), &raw)?;
        return Ok((reg, raw));
    }
    match export {
        Some(x) => bail!(
            "no backup of export {x:?} in {}; take one with ear-sidecar backup --export {x} --to {}",
            target.describe(),
            target.describe()
        ),
        None => bail!(
            "no backups in {}; take one with ear-sidecar backup --export NAME --to {}",
            target.describe(),
            target.describe()
        ),
    }
}

/// Keys for a destination: the registry carried by its backups, unwrapped.
async fn destination_keys(
    target: &dyn BackupTarget,
    id: Option<&BackupId>,
    export: Option<&str>,
    k: &BackupKeyArgs,
) -> Result<(Arc<KeyRing>, ManifestKeys, Registry, Vec<u8>)> {
    let (reg, raw) = carried_registry(target, id, export).await?;
    let ring = unwrap(&reg, k).await?;
    let keys = manifest_keys(&ring)?;
    Ok((ring, keys, reg, raw))
}

/// The newest usable backup of `export`.
async fn newest(
    target: &dyn BackupTarget,
    keys: &ManifestKeys,
    export: Option<&str>,
) -> Result<Option<Manifest>> {
    let list = chain::list(target, keys).await?;
    Ok(list
        .into_iter()
        .rev()
        .filter_map(|b| b.manifest.ok())
        .find(|m| export.is_none_or(|x| m.export == x)))
}

/// The newest usable backup (of `export`), or an error naming why each
/// listed backup is unusable.
async fn newest_usable(
    target: &dyn BackupTarget,
    keys: &ManifestKeys,
    export: Option<&str>,
) -> Result<BackupId> {
    let list = chain::list(target, keys).await?;
    if let Some(m) = list
        .iter()
        .rev()
        .filter_map(|b| b.manifest.as_ref().ok())
        .find(|m| export.is_none_or(|x| m.export == x))
    {
        return Ok(m.backup_id.clone());
    }
    let bad: Vec<String> = list
        .iter()
        .filter_map(|b| b.manifest.as_ref().err().map(|e| format!("{}: {e}", b.id)))
        .collect();
    let what = export.map_or(String::new(), |x| format!(" of export {x:?}"));
    if bad.is_empty() {
        bail!("no backup{what} in {}", target.describe());
    }
    bail!(
        "no usable backup{what} in {}: {}",
        target.describe(),
        bad.join("; ")
    )
}

/// A progress bar on a terminal (never with `--json`).
struct Bar(Option<indicatif::ProgressBar>);

impl Bar {
    fn new(json: bool, what: &str) -> Bar {
        if json || !std::io::stderr().is_terminal() {
            return Bar(None);
        }
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:<10} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} {elapsed}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.set_message(what.to_string());
        Bar(Some(b))
    }

    fn update(&self, p: &backup::Progress) {
        if let Some(b) = &self.0 {
            if let Some(t) = p.total_bytes {
                b.set_length(t);
            } else {
                b.set_length(p.bytes);
            }
            b.set_position(p.bytes);
        }
    }

    fn done(&self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}

/// Runs the freeze hook with `phase` (`freeze` or `thaw`).
pub(crate) fn run_hook(cmd: &str, phase: &str) -> Result<()> {
    let st = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{cmd} \"$1\""))
        .arg("ear-freeze-hook")
        .arg(phase)
        .status()
        .with_context(|| format!("run the freeze hook ({phase})"))?;
    if !st.success() {
        bail!("the freeze hook failed at {phase} ({st}); fix --freeze-hook");
    }
    Ok(())
}

/// Entry point of `ear-sidecar backup …`.
pub fn run_backup(args: &BackupArgs) -> Result<()> {
    let rt = super::runtime()?;
    match &args.command {
        None => rt.block_on(take(&args.take)),
        Some(BackupCommand::List(a)) => rt.block_on(list(a)),
        Some(BackupCommand::Prune(a)) => rt.block_on(prune(a)),
        Some(BackupCommand::Verify(a)) => rt.block_on(verify(a)),
    }
}

/// Entry point of `ear-sidecar restore`.
pub fn run_restore(args: &RestoreArgs) -> Result<()> {
    super::runtime()?.block_on(restore(args))
}

/// What a finished backup reports (CLI and admin socket).
#[derive(Debug, Clone, serde::Serialize)]
pub struct TakeReport {
    /// Engine statistics.
    #[serde(flatten)]
    pub stats: backup::BackupStats,
    /// Full or incremental.
    pub incremental: bool,
    /// Cut statistics (pause, preserved blocks).
    pub cut: store::CutStats,
    /// Where it went.
    pub destination: String,
}

impl TakeReport {
    /// One line for people.
    pub fn summary(&self) -> String {
        format!(
            "backup {} of export {} ({}, parent {}): {} blocks in {} chunks, {} bytes uploaded ({} chunks reused), {:.1}s, cut pause {} us, {} blocks preserved",
            self.stats.backup_id,
            self.stats.export,
            if self.incremental { "incremental" } else { "full" },
            self.stats.parent.as_deref().unwrap_or("-"),
            self.stats.blocks,
            self.stats.chunks,
            self.stats.bytes_uploaded,
            self.stats.chunks_reused,
            self.stats.duration.as_secs_f64(),
            self.cut.pause.as_micros(),
            self.cut.preserved_blocks,
        )
    }
}

/// The parent a new backup of `export` uses: the newest usable backup of
/// the export unless `full`; `incremental` insists on one.
pub(crate) async fn choose_parent(
    target: &dyn BackupTarget,
    keys: &ManifestKeys,
    export: &str,
    full: bool,
    incremental: bool,
) -> Result<Option<BackupId>> {
    if full {
        return Ok(None);
    }
    let parent = newest(target, keys, Some(export))
        .await?
        .map(|m| m.backup_id);
    if incremental && parent.is_none() {
        bail!(
            "--incremental: there is no complete backup of export {export:?} in {} to build on; take a full backup first (omit --incremental)",
            target.describe()
        );
    }
    Ok(parent)
}

/// Refuses a backup while `keys encrypt` still has plaintext blocks to
/// re-encrypt or purge: a backup ships stored blocks, and only ciphertext
/// may leave the node.
pub(crate) fn refuse_plaintext_left(data_dir: &std::path::Path) -> Result<()> {
    if store::sweep::SweepFile::load(data_dir).purge_plaintext {
        bail!(
            "data directory {} still holds plaintext blocks from before `keys encrypt`: back up \
             once the sweep has finished (keys status shows no v0 blocks)",
            data_dir.display()
        );
    }
    Ok(())
}

/// Takes a backup of `export` at a cut taken now (with the freeze hook
/// around the cut), into `target`. Shared by the offline CLI and the
/// admin-socket operation.
#[allow(clippy::too_many_arguments)]
pub async fn take_backup(
    export: &Arc<Export>,
    target: Arc<dyn BackupTarget>,
    ring: &KeyRing,
    key_registry: Vec<u8>,
    full: bool,
    incremental: bool,
    options: BackupOptions,
    on_cut: impl FnOnce(&store::CutStats),
    progress: &(dyn Fn(&backup::Progress) + Send + Sync),
) -> Result<TakeReport> {
    let keys = manifest_keys(ring)?;
    let parent = choose_parent(&*target, &keys, export.name(), full, incremental).await?;
    let e = Arc::clone(export);
    let snap = tokio::task::spawn_blocking(move || e.begin_cut())
        .await
        .map_err(|e| anyhow!("cut task failed: {e}"))??;
    on_cut(&snap.stats());
    let handle = snap.stats_handle();
    let req = BackupRequest {
        export: export.name().to_string(),
        parent: parent.clone(),
        key_registry,
        keys: &keys,
        options,
    };
    let destination = target.describe();
    let (_, stats) = backup::backup(target, snap, req, progress).await?;
    Ok(TakeReport {
        stats,
        incremental: parent.is_some(),
        cut: handle.get(),
        destination,
    })
}

async fn take(a: &BackupTakeArgs) -> Result<()> {
    let name = a
        .export
        .as_deref()
        .ok_or_else(|| anyhow!("--export is required"))?;
    let dest = a.to.as_deref().ok_or_else(|| anyhow!("--to is required"))?;
    let report = match (&a.data_dir, &a.admin_socket) {
        (Some(dir), None) => take_offline(a, dir, name, dest).await?,
        (None, Some(sock)) => return take_online(a, sock, name, dest).await,
        _ => bail!(
            "say where the export is: --data-dir DIR (offline, no sidecar running) or --admin-socket PATH (through the running sidecar)"
        ),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}", report.summary());
    }
    Ok(())
}

/// A backup through the running sidecar: it takes the cut and copies; the
/// freeze hook thaws as soon as the sidecar reports the cut.
async fn take_online(a: &BackupTakeArgs, sock: &Path, name: &str, dest: &str) -> Result<()> {
    use crate::control::{client, Request, BACKUP_CUT_TAKEN};
    // A local destination is opened by the sidecar: make the path absolute.
    let to = match Destination::parse(dest)? {
        Destination::Local(p) if p.is_relative() => {
            std::env::current_dir()?.join(p).display().to_string()
        }
        _ => dest.to_string(),
    };
    let req = Request::Backup {
        export: name.to_string(),
        to,
        full: a.full,
        incremental: a.incremental,
        rate: a.rate,
    };
    let rep = super::report::Reporter::new(a.json);
    if let Some(h) = &a.freeze_hook {
        run_hook(h, "freeze")?;
    }
    let mut thawed = a.freeze_hook.is_none();
    let mut thaw_err = None;
    let r = client::call(sock, &req, |p| {
        if !thawed && p.message == BACKUP_CUT_TAKEN {
            thawed = true;
            if let Some(h) = &a.freeze_hook {
                thaw_err = run_hook(h, "thaw").err();
            }
        }
        rep.progress(p);
    })
    .await;
    if !thawed {
        if let Some(h) = &a.freeze_hook {
            thaw_err = run_hook(h, "thaw").err();
        }
    }
    let v = match r {
        Ok(v) => v,
        Err(e) => {
            rep.abandon();
            return Err(e.into());
        }
    };
    if let Some(e) = thaw_err {
        eprintln!("ear-sidecar: warning: {e:#}");
    }
    let line = v
        .get("summary")
        .and_then(|s| s.as_str())
        .unwrap_or("backup complete")
        .to_string();
    rep.finish(&line, v.get("report").unwrap_or(&v));
    Ok(())
}

async fn take_offline(
    a: &BackupTakeArgs,
    dir: &Path,
    name: &str,
    dest: &str,
) -> Result<TakeReport> {
    let _lock = super::lock_offline(dir, "back up through it with --admin-socket PATH")?;
    let reg = super::load_registry(dir)?;
    refuse_plaintext_left(dir)?;
    let registry_bytes = std::fs::read(Registry::path_in(dir))
        .with_context(|| format!("read {}", Registry::path_in(dir).display()))?;
    let ring = unwrap(&reg, &a.keys).await?;
    let dir_id = reg.dir_id_bytes()?;
    if !store::existing_exports(dir)?.iter().any(|n| n == name) {
        bail!("no export {name:?} in {}", dir.display());
    }
    let export = {
        let (dir, name, ring) = (dir.to_path_buf(), name.to_string(), Arc::clone(&ring));
        tokio::task::spawn_blocking(move || {
            store::snapshot::open_for_backup(&dir, &name, dir_id, ring)
        })
        .await
        .map_err(|e| anyhow!("open task failed: {e}"))??
    };
    let target = open_target(dest).await?;
    let bar = Bar::new(a.json, "backup");
    let hook = a.freeze_hook.clone();
    if let Some(h) = &hook {
        run_hook(h, "freeze")?;
    }
    let thawed = std::sync::atomic::AtomicBool::new(false);
    let thaw = |_: &store::CutStats| {
        if let Some(h) = &hook {
            thawed.store(true, std::sync::atomic::Ordering::Relaxed);
            if let Err(e) = run_hook(h, "thaw") {
                eprintln!("ear-sidecar: warning: {e:#}");
            }
        }
    };
    let r = take_backup(
        &export,
        target,
        &ring,
        registry_bytes,
        a.full,
        a.incremental,
        BackupOptions {
            rate: a.rate,
            ..BackupOptions::default()
        },
        thaw,
        &|p| bar.update(p),
    )
    .await;
    if hook.is_some() && !thawed.load(std::sync::atomic::Ordering::Relaxed) {
        if let Some(h) = &hook {
            run_hook(h, "thaw")?;
        }
    }
    bar.done();
    r
}

fn ms_to_utc(ms: u64) -> String {
    manifest::utc_stamp(ms / 1000)
}

async fn list(a: &BackupListArgs) -> Result<()> {
    let target = open_target(&a.from).await?;
    let (_, keys, _, _) = destination_keys(&*target, None, None, &a.keys).await?;
    let items = chain::list(&*target, &keys).await?;
    if a.json {
        let v: Vec<serde_json::Value> = items
            .iter()
            .map(|b| match &b.manifest {
                Ok(m) => json!({
                    "id": b.id.to_string(),
                    "complete": true,
                    "export": m.export,
                    "export_size": m.export_size,
                    "cut_unix_ms": m.cut_unix_ms,
                    "parent": m.parent.as_ref().map(|p| p.to_string()),
                    "blocks": m.totals.blocks,
                    "chunk_bytes": m.totals.chunk_bytes,
                }),
                Err(e) => json!({"id": b.id.to_string(), "complete": true, "error": e}),
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "backups": v }))?
        );
        return Ok(());
    }
    if items.is_empty() {
        println!("no backups in {}", target.describe());
    }
    for b in &items {
        match &b.manifest {
            Ok(m) => println!(
                "{}  {:<16} cut {}  {:<11} {:>10} blocks {:>14} bytes{}",
                b.id,
                m.export,
                ms_to_utc(m.cut_unix_ms),
                if m.parent.is_some() {
                    "incremental"
                } else {
                    "full"
                },
                m.totals.blocks,
                m.totals.chunk_bytes,
                m.parent
                    .as_ref()
                    .map(|p| format!("  parent {p}"))
                    .unwrap_or_default()
            ),
            Err(e) => println!("{}  UNUSABLE: {e}", b.id),
        }
    }
    Ok(())
}

async fn prune(a: &BackupPruneArgs) -> Result<()> {
    let target = open_target(&a.from).await?;
    let (_, keys, _, _) = destination_keys(&*target, None, a.export.as_deref(), &a.keys).await?;
    let opts = PruneOptions {
        keep: a.keep,
        export: a.export.clone(),
        orphan_grace: a.orphan_grace,
        dry_run: a.dry_run,
    };
    let r = chain::prune(&*target, &keys, &opts).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "{}kept {} backup(s), removed {} ({} objects, {} bytes){}",
            if a.dry_run { "dry run: " } else { "" },
            r.kept.len(),
            r.removed.len(),
            r.objects_removed,
            r.bytes_removed,
            if r.unverified.is_empty() {
                String::new()
            } else {
                format!(
                    "; {} manifest(s) that do not authenticate were left alone: {}",
                    r.unverified.len(),
                    r.unverified.join(", ")
                )
            }
        );
    }
    Ok(())
}

async fn verify(a: &BackupVerifyArgs) -> Result<()> {
    let target = open_target(&a.from).await?;
    let id = a.backup.as_deref().map(BackupId::parse).transpose()?;
    let (ring, keys, _, _) = destination_keys(&*target, id.as_ref(), None, &a.keys).await?;
    let id = match id {
        Some(id) => id,
        None => newest_usable(&*target, &keys, None).await?,
    };
    let bar = Bar::new(a.json, "verify");
    let t = Instant::now();
    let report = backup::verify(Arc::clone(&target), &id, &keys, 4, &|p| bar.update(p)).await;
    bar.done();
    let report = report?;
    let decrypted = if a.decrypt_check {
        let bar = Bar::new(a.json, "decrypt");
        let sink = DecryptCheckSink::new(ring);
        let r = backup::restore(Arc::clone(&target), &id, &keys, sink, 4, &|p| bar.update(p)).await;
        bar.done();
        let (sink, _) = r.context("decrypt check")?;
        Some((sink.decrypted, sink.zero))
    } else {
        None
    };
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "backup": id.to_string(),
                "ok": true,
                "verify": report,
                "decrypt_check": decrypted.map(|(d, z)| json!({"data_blocks": d, "zero_blocks": z})),
                "seconds": t.elapsed().as_secs_f64(),
            }))?
        );
    } else {
        println!(
            "backup {id}: OK (chain of {}, {} chunks, {} blocks, {} bytes checked{})",
            report.chain.len(),
            report.chunks,
            report.blocks,
            report.bytes,
            decrypted
                .map(|(d, _)| format!("; {d} data blocks decrypted through the CMK"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

async fn restore(a: &RestoreArgs) -> Result<()> {
    // Under another CMK: validated first, so a bad key fails before anything
    // is written; the keys move to it once the blocks are restored.
    let new_cmk = match &a.kms_key_id {
        Some(id) => Some(
            super::keys_wrap::validated_target(
                &crate::config::KmsConfig::Aws {
                    key_id: id.clone(),
                    endpoint: a.keys.kms_endpoint.clone(),
                    region: a.keys.kms_region.clone(),
                },
                "rewrap",
            )
            .await?,
        ),
        None => None,
    };
    if a.data_dir.exists() {
        let empty = std::fs::read_dir(&a.data_dir)
            .with_context(|| format!("read {}", a.data_dir.display()))?
            .next()
            .is_none();
        if !empty {
            bail!(
                "--data-dir {} exists and is not empty: restore into a new directory",
                a.data_dir.display()
            );
        }
    }
    let target = open_target(&a.from).await?;
    let id = a.backup.as_deref().map(BackupId::parse).transpose()?;
    let (ring, keys, reg, raw) =
        destination_keys(&*target, id.as_ref(), a.export.as_deref(), &a.keys).await?;
    let id = match id {
        Some(id) => id,
        None => {
            let list = chain::list(&*target, &keys).await?;
            let exports: std::collections::BTreeSet<String> = list
                .iter()
                .filter_map(|b| b.manifest.as_ref().ok().map(|m| m.export.clone()))
                .collect();
            if a.export.is_none() && exports.len() > 1 {
                bail!(
                    "{} holds backups of several exports ({}); pass --export NAME or --backup ID",
                    target.describe(),
                    exports.into_iter().collect::<Vec<_>>().join(", ")
                );
            }
            newest_usable(&*target, &keys, a.export.as_deref()).await?
        }
    };
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&a.data_dir)
            .with_context(|| format!("create {}", a.data_dir.display()))?;
    }
    let lock = super::lock_data_dir(&a.data_dir)?;
    let sink = RestoreSink::new(&a.data_dir, reg.dir_id_bytes()?, Arc::clone(&ring));
    let bar = Bar::new(a.json, "restore");
    let r = backup::restore(Arc::clone(&target), &id, &keys, sink, 4, &|p| bar.update(p)).await;
    bar.done();
    let r = match r {
        Ok((_, stats)) => {
            async {
                // The registry last: a directory without it is visibly incomplete.
                store::snapshot::write_new_file(&Registry::path_in(&a.data_dir), &raw)?;
                if let Some(to) = &new_cmk {
                    rewrap_restored(&a.data_dir, &a.keys, to, &ring).await?;
                }
                Ok::<_, anyhow::Error>(stats)
            }
            .await
        }
        Err(e) => Err(e.into()),
    };
    let stats = match r {
        Ok(s) => s,
        Err(e) => {
            // The directory was empty or absent: leave nothing half-restored.
            drop(lock);
            let _ = std::fs::remove_dir_all(&a.data_dir);
            return Err(e);
        }
    };
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "restored": stats,
                "data_dir": a.data_dir.display().to_string(),
            }))?
        );
    } else {
        println!(
            "restored backup {} (chain of {}): {} blocks, {} bytes in {:.1}s into {}",
            stats.backup_id,
            stats.chain_len,
            stats.blocks,
            stats.bytes,
            stats.duration.as_secs_f64(),
            a.data_dir.display()
        );
    }
    Ok(())
}

/// Moves the restored directory's keys under the CMK `to` (the key rewrap:
/// every version re-wrapped, checked against the keys in use, resealed).
async fn rewrap_restored(
    dir: &Path,
    k: &BackupKeyArgs,
    to: &crate::keys::aws::AwsKmsProvider,
    ring: &KeyRing,
) -> Result<()> {
    let mut reg =
        Registry::load(dir)?.ok_or_else(|| anyhow!("the restored key registry is missing"))?;
    let from = super::keys_wrap::registry_provider(
        &reg,
        k.local_kek_file.clone(),
        &k.kms_endpoint,
        &k.kms_region,
    )
    .await?;
    crate::keys::rewrap::rewrap(&mut reg, from.as_ref(), to, ring, |_, _| {})
        .await
        .context("move the restored keys to --kms-key-id")?;
    Ok(())
}
