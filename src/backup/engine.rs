//! The backup engine: `backup`, `restore` and `verify` over a
//! [`BackupTarget`], driving a [`BlockSource`] / [`BlockSink`] on a blocking
//! thread while objects move concurrently.
//!
//! Backup pipeline: the source thread reads changed blocks and groups them
//! into chunks (one or more aligned windows of blocks each, so unchanged
//! regions produce identical chunks and dedupe); each chunk is encoded and
//! hashed on the blocking pool, and the async side uploads up to `parallel`
//! chunks at once, skipping chunks already present (content
//! addressing makes a retried or repeated backup cheap). Only when every
//! object is stored does the engine publish the manifest: that is the commit
//! point. Dropping the future or failing mid-way publishes nothing.
//!
//! Progress goes to a callback (the CLI draws a bar or prints JSON lines);
//! the returned statistics are what the metrics layer records.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::chain::{self, Chain, RestorePlan, VerifyReport};
use super::chunk::{BlockRecord, BlockRun, ChunkBuilder};
use super::index::SlotIndex;
use super::manifest::{self, BackupId, ChunkRef, Manifest, ManifestKeys, ObjectRef, Totals};
use super::source::{BlockSink, BlockSource, RestoreInfo};
use super::target::{BackupTarget, ObjectKey};
use super::{BackupError, BLOCK_SIZE};

/// Tuning of a backup.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// Blocks per aligned window (default 4096 = 16 MiB of data). A chunk
    /// holds the records of one or more whole windows.
    pub window_blocks: u64,
    /// A chunk is closed at a window boundary once it holds this many bytes
    /// (default 4 MiB), so sparse incrementals do not make tiny objects.
    pub min_chunk_bytes: usize,
    /// Objects transferred at once (default 4).
    pub parallel: usize,
    /// Upper bound on the export bytes (slots and ciphertext) read per
    /// second, so a backup leaves disk and CPU to the foreground; `None`
    /// reads as fast as the pipeline goes.
    pub rate: Option<u64>,
    /// Run the backup's reader and encoders at a lower CPU priority (nice
    /// 10), so a sidecar's request threads win the cores when both want them.
    pub low_priority: bool,
}

impl Default for BackupOptions {
    fn default() -> Self {
        Self {
            window_blocks: 4096,
            min_chunk_bytes: 4 << 20,
            parallel: 4,
            rate: None,
            low_priority: false,
        }
    }
}

/// One backup to take.
#[derive(Debug)]
pub struct BackupRequest<'a> {
    /// The export's name (validated by the caller).
    pub export: String,
    /// Parent for an incremental backup; `None` for a full one.
    pub parent: Option<BackupId>,
    /// The data directory's `keys.json` bytes (wrapped keys only).
    pub key_registry: Vec<u8>,
    /// Manifest keys; the active one signs.
    pub keys: &'a ManifestKeys,
    /// Tuning.
    pub options: BackupOptions,
}

/// What is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Taking a backup.
    Backup,
    /// Restoring.
    Restore,
    /// Verifying.
    Verify,
}

/// A progress report (serialises to one JSON line for `--json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Progress {
    /// What is running.
    pub phase: Phase,
    /// Block records handled so far.
    pub blocks: u64,
    /// Object bytes handled so far.
    pub bytes: u64,
    /// Total object bytes, when known in advance (restore, verify).
    pub total_bytes: Option<u64>,
    /// Objects handled so far.
    pub objects: u64,
}

/// Statistics of a finished backup (for metrics and the CLI summary).
#[derive(Debug, Clone, Serialize)]
pub struct BackupStats {
    /// The new backup.
    pub backup_id: String,
    /// Its parent.
    pub parent: Option<String>,
    /// Export.
    pub export: String,
    /// Block records in this backup.
    pub blocks: u64,
    /// Chunk objects referenced.
    pub chunks: u64,
    /// Chunks that were already stored (dedup) and not uploaded again.
    pub chunks_reused: u64,
    /// Bytes uploaded (chunks, index and manifest).
    pub bytes_uploaded: u64,
    /// Bytes of chunks not uploaded because already present.
    pub bytes_reused: u64,
    /// Wall time.
    #[serde(serialize_with = "secs")]
    pub duration: Duration,
}

/// Statistics of a finished restore.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreStats {
    /// The restored backup.
    pub backup_id: String,
    /// Backups in its chain.
    pub chain_len: usize,
    /// Blocks written to the sink.
    pub blocks: u64,
    /// Object bytes downloaded.
    pub bytes: u64,
    /// Wall time.
    #[serde(serialize_with = "secs")]
    pub duration: Duration,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Progress callback type.
pub type ProgressFn<'a> = &'a (dyn Fn(&Progress) + Send + Sync);

/// Takes a backup of `source` into `target`: full when `req.parent` is
/// `None`, else only the blocks whose slot changed since the parent.
/// Returns the published manifest.
pub async fn backup<S: BlockSource + 'static>(
    target: Arc<dyn BackupTarget>,
    source: S,
    req: BackupRequest<'_>,
    progress: ProgressFn<'_>,
) -> Result<(Manifest, BackupStats), BackupError> {
    let start = Instant::now();
    let size = source.export_size();
    if !size.is_multiple_of(BLOCK_SIZE as u64) {
        return Err(BackupError::Invalid(format!(
            "export size {size} is not a multiple of 4096"
        )));
    }
    if req.export.is_empty() || req.export.chars().any(char::is_control) {
        return Err(BackupError::Invalid(format!(
            "export name {:?} is empty or has control characters",
            req.export
        )));
    }
    if req.options.window_blocks == 0 {
        return Err(BackupError::Invalid(
            "window_blocks must be at least 1".into(),
        ));
    }
    let blocks = size / BLOCK_SIZE as u64;
    let base = match &req.parent {
        None => SlotIndex::empty(blocks).map_err(|e| BackupError::Invalid(e.to_string()))?,
        Some(pid) => {
            let pm = chain::load(&*target, req.keys, pid).await?;
            if pm.export != req.export {
                return Err(BackupError::Invalid(format!(
                    "parent {pid} is a backup of export {:?}, not {:?}; choose a parent of the same export or take a full backup",
                    pm.export, req.export
                )));
            }
            let mut ix = chain::fetch_index(&*target, &pm).await?;
            ix.resize(blocks)
                .map_err(|e| BackupError::Invalid(e.to_string()))?;
            ix
        }
    };
    let cut = source.cut_time();
    let meta = source.export_meta();
    let id = BackupId::new(cut).map_err(|e| BackupError::Invalid(e.to_string()))?;

    let (tx, mut rx) = tokio::sync::mpsc::channel::<ChunkBuilder>(2);
    let opts = req.options.clone();
    let low = opts.low_priority;
    let producer = on_thread("ear-backup-read", low, move || {
        produce(source, base, blocks, &opts, tx)
    })?;

    let parallel = req.options.parallel.max(1);
    let mut uploads = tokio::task::JoinSet::new();
    // Chunk references by production order (uploads finish in any order).
    let mut chunks: Vec<(u64, ChunkRef)> = Vec::new();
    let mut stats = BackupStats {
        backup_id: id.to_string(),
        parent: req.parent.as_ref().map(|p| p.to_string()),
        export: req.export.clone(),
        blocks: 0,
        chunks: 0,
        chunks_reused: 0,
        bytes_uploaded: 0,
        bytes_reused: 0,
        duration: Duration::ZERO,
    };
    let mut done = Progress {
        phase: Phase::Backup,
        blocks: 0,
        bytes: 0,
        total_bytes: None,
        objects: 0,
    };
    type Uploaded = (u64, ChunkRef, bool, u64);
    let on_upload = |r: Result<Result<Uploaded, BackupError>, tokio::task::JoinError>,
                     stats: &mut BackupStats,
                     done: &mut Progress,
                     chunks: &mut Vec<(u64, ChunkRef)>|
     -> Result<(), BackupError> {
        let (seq, cref, uploaded, recs) =
            r.map_err(|e| BackupError::Invalid(format!("upload task failed: {e}")))??;
        let len = cref.bytes;
        if uploaded {
            stats.bytes_uploaded += len;
        } else {
            stats.chunks_reused += 1;
            stats.bytes_reused += len;
        }
        done.blocks += recs;
        done.bytes += len;
        done.objects += 1;
        chunks.push((seq, cref));
        progress(done);
        Ok(())
    };
    let mut seq = 0u64;
    while let Some(builder) = rx.recv().await {
        while uploads.len() >= parallel {
            if let Some(r) = uploads.join_next().await {
                on_upload(r, &mut stats, &mut done, &mut chunks)?;
            }
        }
        let t = target.clone();
        let this = seq;
        seq += 1;
        uploads.spawn(async move {
            // Encoding and hashing run on threads of their own, beside the
            // reader and the other chunks, not on the reading thread (nor on
            // the blocking pool a sidecar's requests use).
            let chunk = on_thread("ear-backup-hash", low, move || builder.finish())?
                .await
                .map_err(|e| BackupError::Invalid(format!("chunk encoder failed: {e}")))?
                .ok_or_else(|| BackupError::Invalid("empty chunk".into()))?;
            let sha = hex::encode(chunk.sha256);
            let len = chunk.body.len() as u64;
            let cref = ChunkRef {
                sha256: sha.clone(),
                bytes: len,
                runs: chunk.runs,
                data_blocks: chunk.data_blocks,
            };
            let key = ObjectKey::object(&sha)?;
            if t.exists(&key).await? {
                return Ok((this, cref, false, chunk.records));
            }
            t.put_staged(&key, chunk.body).await?;
            Ok((this, cref, true, chunk.records))
        });
    }
    while let Some(r) = uploads.join_next().await {
        on_upload(r, &mut stats, &mut done, &mut chunks)?;
    }
    chunks.sort_by_key(|(seq, _)| *seq);
    let chunks: Vec<ChunkRef> = chunks.into_iter().map(|(_, c)| c).collect();
    let index = producer
        .await
        .map_err(|_| BackupError::Invalid("backup reader thread failed".into()))??;

    // The slot index, then the manifest (the commit point).
    let ix_bytes = index.encode();
    let ix_sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&ix_bytes));
    let ix_len = ix_bytes.len() as u64;
    target
        .put_staged(&ObjectKey::object(&ix_sha)?, ix_bytes.into())
        .await?;
    stats.bytes_uploaded += ix_len;
    // Every object the manifest names is durable before the manifest is.
    target.sync_staged().await?;

    let recs: u64 = chunks.iter().map(ChunkRef::records).sum();
    let data: u64 = chunks.iter().map(|c| c.data_blocks).sum();
    let m = Manifest {
        manifest_format: manifest::MANIFEST_FORMAT,
        backup_id: id.clone(),
        export: req.export.clone(),
        export_size: size,
        block_size: BLOCK_SIZE as u32,
        store_format: super::STORE_FORMAT,
        cut_unix_ms: unix_ms(cut),
        finished_unix_ms: unix_ms(SystemTime::now()),
        parent: req.parent.clone(),
        mac_key_version: req.keys.active().version(),
        key_registry: Manifest::b64(&req.key_registry),
        export_meta: Manifest::b64(&meta),
        slot_index: ObjectRef {
            sha256: ix_sha,
            bytes: ix_len,
        },
        totals: Totals {
            blocks: recs,
            data_blocks: data,
            zero_blocks: recs - data,
            chunks: chunks.len() as u64,
            chunk_bytes: chunks.iter().map(|c| c.bytes).sum(),
            blocks_present: index.present(),
        },
        chunks,
    };
    let sealed = manifest::seal(&m, req.keys)?;
    stats.bytes_uploaded += sealed.len() as u64;
    target.publish(&id.manifest_key(), sealed.into()).await?;
    stats.blocks = recs;
    stats.chunks = m.totals.chunks;
    stats.duration = start.elapsed();
    Ok((m, stats))
}

/// Runs `f` on a thread of its own, at nice 10 when `low` (a thread's nice
/// value is its own on Linux, so nothing else is slowed); the result comes
/// back through the receiver (closed if `f` panics).
fn on_thread<T: Send + 'static>(
    name: &str,
    low: bool,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<tokio::sync::oneshot::Receiver<T>, BackupError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            if low {
                // Best effort: raising one's own nice value needs no
                // privilege; failing leaves the normal priority.
                let _ = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 10);
            }
            let _ = tx.send(f());
        })
        .map_err(|e| BackupError::Invalid(format!("start a backup thread: {e}")))?;
    Ok(rx)
}

/// Paces a reader to at most `rate` bytes per second (token bucket with a
/// burst of a tenth of a second).
struct Pacer {
    rate: Option<u64>,
    start: Instant,
    bytes: u64,
}

impl Pacer {
    fn new(rate: Option<u64>) -> Self {
        Self {
            rate: rate.filter(|&r| r > 0),
            start: Instant::now(),
            bytes: 0,
        }
    }

    /// Accounts `n` bytes read; sleeps while ahead of the rate.
    fn take(&mut self, n: u64) {
        let Some(rate) = self.rate else { return };
        self.bytes = self.bytes.saturating_add(n);
        let due = Duration::from_secs_f64(self.bytes as f64 / rate as f64);
        let ahead = due.saturating_sub(self.start.elapsed());
        if ahead > Duration::from_millis(100) {
            std::thread::sleep(ahead - Duration::from_millis(100));
        }
    }
}

/// The reading side of a backup, on a thread of its own: pulls changed blocks
/// from the source, packs them into chunks, hands them to the uploader, and
/// returns the slot index at the cut.
fn produce<S: BlockSource>(
    mut source: S,
    mut index: SlotIndex,
    blocks: u64,
    opts: &BackupOptions,
    tx: tokio::sync::mpsc::Sender<ChunkBuilder>,
) -> Result<SlotIndex, BackupError> {
    let send = |b: ChunkBuilder| -> Result<(), BackupError> {
        if !b.is_empty() {
            tx.blocking_send(b)
                .map_err(|_| BackupError::Invalid("backup cancelled".into()))?;
        }
        Ok(())
    };
    let mut builder = ChunkBuilder::new();
    let mut window: Option<u64> = None;
    let mut prev: Option<u64> = None;
    let mut pacer = Pacer::new(opts.rate);
    // The index is updated in place: the source only compares blocks after
    // the one it yielded last, which this loop has not changed yet.
    while let Some(rec) = source.next_changed(&index).map_err(BackupError::Source)? {
        let i = rec.index();
        if i >= blocks || prev.is_some_and(|p| i <= p) {
            return Err(BackupError::Source(
                format!("block source yielded block {i} out of order or beyond the export ({blocks} blocks)").into(),
            ));
        }
        prev = Some(i);
        let w = i / opts.window_blocks;
        if window.is_some_and(|cw| cw != w) && builder.record_bytes() >= opts.min_chunk_bytes {
            send(std::mem::take(&mut builder))?;
        }
        window = Some(w);
        pacer.take(if rec.data().is_some() {
            (BLOCK_SIZE + super::SLOT_LEN) as u64
        } else {
            super::SLOT_LEN as u64
        });
        index.set(i, rec.slot());
        builder
            .push(rec)
            .map_err(|e| BackupError::Source(e.to_string().into()))?;
    }
    send(builder)?;
    Ok(index)
}

/// Fetches items with up to `parallel` requests in flight, yielding results
/// in order.
struct Prefetch<T: Send + 'static> {
    pending: VecDeque<tokio::task::JoinHandle<Result<T, BackupError>>>,
}

impl<T: Send + 'static> Prefetch<T> {
    fn new() -> Self {
        Self {
            pending: VecDeque::new(),
        }
    }

    async fn next(&mut self) -> Option<Result<T, BackupError>> {
        let h = self.pending.pop_front()?;
        Some(
            h.await
                .unwrap_or_else(|e| Err(BackupError::Invalid(format!("fetch task failed: {e}")))),
        )
    }
}

impl<T: Send + 'static> Drop for Prefetch<T> {
    fn drop(&mut self) {
        for h in &self.pending {
            h.abort();
        }
    }
}

fn spawn_fetch(
    target: &Arc<dyn BackupTarget>,
    backup: &BackupId,
    chunk: &ChunkRef,
) -> tokio::task::JoinHandle<Result<super::DecodedChunk, BackupError>> {
    let (t, b, c) = (target.clone(), backup.clone(), chunk.clone());
    tokio::spawn(async move { chain::fetch_chunk(&*t, &b, &c).await })
}

/// Keeps only the records whose index lies in `take` (both sorted).
fn select(records: Vec<BlockRecord>, take: &[BlockRun]) -> Vec<BlockRecord> {
    let mut out = Vec::new();
    let mut runs = take.iter().peekable();
    for r in records {
        while runs
            .peek()
            .is_some_and(|t| t.start.saturating_add(t.len) <= r.index())
        {
            runs.next();
        }
        if runs.peek().is_some_and(|t| t.start <= r.index()) {
            out.push(r);
        }
    }
    out
}

enum SinkMsg {
    Begin(RestoreInfo),
    Records(Vec<BlockRecord>),
}

/// Restores backup `id` (its whole chain) into `sink`. Every chunk is
/// checked against its manifest before a block of it is written; the sink is
/// finished only when every block arrived. Returns the sink.
pub async fn restore<K: BlockSink + 'static>(
    target: Arc<dyn BackupTarget>,
    id: &BackupId,
    keys: &ManifestKeys,
    sink: K,
    parallel: usize,
    progress: ProgressFn<'_>,
) -> Result<(K, RestoreStats), BackupError> {
    let start = Instant::now();
    let chain = chain::resolve(&*target, keys, id).await?;
    let plan = RestorePlan::new(&chain);
    let head = chain.head();
    let info = RestoreInfo {
        export: head.export.clone(),
        export_size: head.export_size,
        key_registry: head.key_registry_bytes(),
        export_meta: head.export_meta_bytes(),
        backup_id: head.backup_id.to_string(),
    };

    let (tx, mut rx) = tokio::sync::mpsc::channel::<SinkMsg>(4);
    let writer = tokio::task::spawn_blocking(move || -> Result<K, BackupError> {
        let mut sink = sink;
        while let Some(msg) = rx.blocking_recv() {
            match msg {
                SinkMsg::Begin(info) => sink.begin(&info).map_err(BackupError::Sink)?,
                SinkMsg::Records(rs) => {
                    for r in &rs {
                        sink.write(r).map_err(BackupError::Sink)?;
                    }
                }
            }
        }
        Ok(sink)
    });

    let feed = async {
        let closed = || BackupError::Invalid("restore writer stopped".into());
        tx.send(SinkMsg::Begin(info)).await.map_err(|_| closed())?;
        let mut done = Progress {
            phase: Phase::Restore,
            blocks: 0,
            bytes: 0,
            total_bytes: Some(plan.bytes),
            objects: 0,
        };
        let mut pf = Prefetch::new();
        let mut items = plan.items.iter();
        let mut takes = VecDeque::new();
        for it in items.by_ref().take(parallel.max(1)) {
            pf.pending
                .push_back(spawn_fetch(&target, &it.backup, &it.chunk));
            takes.push_back(it);
        }
        while let Some(res) = pf.next().await {
            let chunk = res?;
            let it = takes.pop_front().expect("one item per fetch");
            if let Some(next) = items.next() {
                pf.pending
                    .push_back(spawn_fetch(&target, &next.backup, &next.chunk));
                takes.push_back(next);
            }
            let recs = select(chunk.into_records(), &it.take);
            done.blocks += recs.len() as u64;
            done.bytes += it.chunk.bytes;
            done.objects += 1;
            tx.send(SinkMsg::Records(recs))
                .await
                .map_err(|_| closed())?;
            progress(&done);
        }
        Ok::<_, BackupError>(done)
    }
    .await;
    drop(tx);
    let written = writer
        .await
        .map_err(|e| BackupError::Invalid(format!("restore writer task failed: {e}")))?;
    // A sink error explains a closed channel better than the channel does.
    let mut sink = written?;
    let done = feed?;
    if done.blocks != plan.blocks {
        return Err(BackupError::Chain {
            backup: id.to_string(),
            detail: format!(
                "restored {} blocks, the plan has {}",
                done.blocks, plan.blocks
            ),
        });
    }
    let sink = tokio::task::spawn_blocking(move || sink.finish().map(|_| sink))
        .await
        .map_err(|e| BackupError::Invalid(format!("restore writer task failed: {e}")))?
        .map_err(BackupError::Sink)?;
    Ok((
        sink,
        RestoreStats {
            backup_id: id.to_string(),
            chain_len: chain.manifests.len(),
            blocks: done.blocks,
            bytes: done.bytes,
            duration: start.elapsed(),
        },
    ))
}

/// Verifies backup `id`: every manifest of its chain authenticates and links
/// up, every chunk and slot index of the chain matches its SHA-256 and its
/// manifest entry. Reads everything, writes nothing, needs no CMK beyond the
/// manifest keys.
pub async fn verify(
    target: Arc<dyn BackupTarget>,
    id: &BackupId,
    keys: &ManifestKeys,
    parallel: usize,
    progress: ProgressFn<'_>,
) -> Result<VerifyReport, BackupError> {
    let chain: Chain = chain::resolve(&*target, keys, id).await?;
    let mut seen = std::collections::BTreeSet::new();
    let mut work: Vec<(BackupId, ChunkRef)> = Vec::new();
    for m in &chain.manifests {
        chain::fetch_index(&*target, m).await?;
        for c in &m.chunks {
            if seen.insert(c.sha256.clone()) {
                work.push((m.backup_id.clone(), c.clone()));
            }
        }
    }
    let mut report = VerifyReport {
        chain: chain
            .manifests
            .iter()
            .map(|m| m.backup_id.to_string())
            .collect(),
        ..Default::default()
    };
    let mut done = Progress {
        phase: Phase::Verify,
        blocks: 0,
        bytes: 0,
        total_bytes: Some(work.iter().map(|w| w.1.bytes).sum()),
        objects: 0,
    };
    let mut pf = Prefetch::new();
    let mut items = work.iter();
    let mut sizes = VecDeque::new();
    for (b, c) in items.by_ref().take(parallel.max(1)) {
        pf.pending.push_back(spawn_fetch(&target, b, c));
        sizes.push_back(c.bytes);
    }
    while let Some(res) = pf.next().await {
        let chunk = res?;
        let bytes = sizes.pop_front().unwrap_or(0);
        if let Some((b, c)) = items.next() {
            pf.pending.push_back(spawn_fetch(&target, b, c));
            sizes.push_back(c.bytes);
        }
        let n = chunk.records().len() as u64;
        report.chunks += 1;
        report.blocks += n;
        report.bytes += bytes;
        done.blocks += n;
        done.bytes += bytes;
        done.objects += 1;
        progress(&done);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::chunk::tests::record;

    #[test]
    fn select_takes_only_runs() {
        let recs: Vec<BlockRecord> = (0..10).map(|i| record(i, i as u8, false)).collect();
        let take = vec![BlockRun { start: 2, len: 2 }, BlockRun { start: 7, len: 1 }];
        let got: Vec<u64> = select(recs, &take).iter().map(|r| r.index()).collect();
        assert_eq!(got, vec![2, 3, 7]);
    }

    #[test]
    fn pacer_bounds_the_rate() {
        let t = Instant::now();
        let mut p = Pacer::new(Some(10 << 20));
        for _ in 0..(3 << 20) / 4096 {
            p.take(4096);
        }
        // 3 MiB at 10 MiB/s: 0.3 s less the 0.1 s burst.
        assert!(
            t.elapsed() >= Duration::from_millis(190),
            "{:?}",
            t.elapsed()
        );
        let t = Instant::now();
        let mut p = Pacer::new(None);
        p.take(u64::MAX);
        assert!(t.elapsed() < Duration::from_millis(100));
    }
}
