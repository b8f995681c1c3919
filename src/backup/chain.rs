//! Backups as a set of chains: listing, resolving a backup and its parents,
//! the restore plan (for each block, the newest record in the chain), prune
//! that keeps every chain it keeps whole, and the per-object checks verify
//! and restore share.
//!
//! A backup is *complete* exactly when its manifest object is published and
//! authenticates; objects not referenced by a manifest are leftovers of an
//! interrupted backup (or of a prune), never part of a backup.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::chunk::{BlockRun, DecodedChunk};
use super::index::SlotIndex;
use super::manifest::{self, BackupId, ChunkRef, Manifest, ManifestKeys};
use super::target::{BackupTarget, ObjectKey, TargetError};
use super::BackupError;

/// Longest chain followed (a cycle or a corrupt parent link stops here).
pub const MAX_CHAIN: usize = 100_000;

/// One listed backup.
#[derive(Debug)]
pub struct BackupInfo {
    /// Its id.
    pub id: BackupId,
    /// The authenticated manifest, or why it could not be used.
    pub manifest: Result<Manifest, String>,
}

/// Lists every published backup, oldest first, with its manifest (or the
/// reason it is unusable: edited, another universe key, unknown format).
pub async fn list(
    target: &dyn BackupTarget,
    keys: &ManifestKeys,
) -> Result<Vec<BackupInfo>, BackupError> {
    let mut out = Vec::new();
    for o in target.list("manifests/").await? {
        let Some(id) = BackupId::from_manifest_key(&o.key) else {
            continue;
        };
        let manifest = match target.get(&id.manifest_key()).await {
            Ok(bytes) => manifest::open(&id, &bytes, keys).map_err(|e| e.to_string()),
            // Deleted between list and get (a concurrent prune).
            Err(TargetError::NotFound { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        out.push(BackupInfo { id, manifest });
    }
    // Ids order by cut time to the second; within one second the cut time
    // in the manifest (milliseconds) orders them.
    let cut_ms = |b: &BackupInfo| b.manifest.as_ref().map_or(0, |m| m.cut_unix_ms);
    out.sort_by(|a, b| {
        let second = |x: &BackupInfo| x.id.as_str().get(..16).unwrap_or("").to_string();
        second(a)
            .cmp(&second(b))
            .then(cut_ms(a).cmp(&cut_ms(b)))
            .then(a.id.cmp(&b.id))
    });
    Ok(out)
}

/// Loads and authenticates the manifest of `id`.
pub async fn load(
    target: &dyn BackupTarget,
    keys: &ManifestKeys,
    id: &BackupId,
) -> Result<Manifest, BackupError> {
    let bytes = target.get(&id.manifest_key()).await.map_err(|e| match e {
        TargetError::NotFound { .. } => BackupError::Chain {
            backup: id.to_string(),
            detail: format!(
                "backup {id} does not exist in {} or never completed (no published manifest); \
                 list the backups and pick a complete one",
                target.describe()
            ),
        },
        e => e.into(),
    })?;
    Ok(manifest::open(id, &bytes, keys)?)
}

/// A backup and its ancestors, the requested backup first.
#[derive(Debug, Clone)]
pub struct Chain {
    /// Newest (the requested backup) first, the full backup last.
    pub manifests: Vec<Manifest>,
}

impl Chain {
    /// The requested backup.
    pub fn head(&self) -> &Manifest {
        &self.manifests[0]
    }
}

/// Resolves `id` and its parents up to a full backup. Every manifest must
/// authenticate and belong to the same export, and each parent must be
/// older than its child.
pub async fn resolve(
    target: &dyn BackupTarget,
    keys: &ManifestKeys,
    id: &BackupId,
) -> Result<Chain, BackupError> {
    let mut manifests: Vec<Manifest> = vec![load(target, keys, id).await?];
    let mut seen = BTreeSet::from([id.clone()]);
    loop {
        let child = manifests.last().expect("non-empty");
        let Some(pid) = child.parent.clone() else {
            break;
        };
        let broken = |detail: String| BackupError::Chain {
            backup: id.to_string(),
            detail,
        };
        if !seen.insert(pid.clone()) || manifests.len() >= MAX_CHAIN {
            return Err(broken(format!("parent links loop at {pid}")));
        }
        let parent = load(target, keys, &pid).await.map_err(|e| {
            broken(format!(
                "parent {pid} of {} is missing or unusable ({e}); the chain is broken: restore an older complete chain or take a new full backup",
                child.backup_id
            ))
        })?;
        if parent.export != child.export {
            return Err(broken(format!(
                "parent {pid} is a backup of export {:?}, not {:?}",
                parent.export, child.export
            )));
        }
        if parent.cut_unix_ms > child.cut_unix_ms {
            return Err(broken(format!("parent {pid} was cut after its child")));
        }
        manifests.push(parent);
    }
    Ok(Chain { manifests })
}

/// A set of disjoint, non-adjacent block intervals `[start, end)`.
#[derive(Debug, Default, Clone)]
struct IntervalSet {
    map: BTreeMap<u64, u64>,
}

impl IntervalSet {
    /// The parts of `[s, e)` not in the set.
    fn subtract(&self, s: u64, e: u64) -> Vec<BlockRun> {
        let mut out = Vec::new();
        if s >= e {
            return out;
        }
        let before = self
            .map
            .range(..=s)
            .next_back()
            .filter(|(_, &end)| end > s)
            .map(|(&a, &b)| (a, b));
        let mut cur = s;
        for (a, b) in before
            .into_iter()
            .chain(self.map.range(s + 1..e).map(|(&a, &b)| (a, b)))
        {
            if a > cur {
                out.push(BlockRun {
                    start: cur,
                    len: a - cur,
                });
            }
            cur = cur.max(b);
        }
        if cur < e {
            out.push(BlockRun {
                start: cur,
                len: e - cur,
            });
        }
        out
    }

    fn insert(&mut self, s: u64, e: u64) {
        if s >= e {
            return;
        }
        let (mut ns, mut ne) = (s, e);
        if let Some((&a, &b)) = self.map.range(..=s).next_back() {
            if b >= s {
                ns = a;
                ne = ne.max(b);
            }
        }
        let inside: Vec<u64> = self.map.range(ns..=ne).map(|(&a, _)| a).collect();
        for a in inside {
            if let Some(b) = self.map.remove(&a) {
                ne = ne.max(b);
            }
        }
        self.map.insert(ns, ne);
    }
}

/// One chunk to fetch for a restore and the blocks to take from it.
#[derive(Debug, Clone)]
pub struct PlanItem {
    /// The backup whose manifest references the chunk.
    pub backup: BackupId,
    /// The chunk.
    pub chunk: ChunkRef,
    /// The blocks of the chunk that are the newest in the chain.
    pub take: Vec<BlockRun>,
}

/// What a restore of a chain reads.
#[derive(Debug, Clone)]
pub struct RestorePlan {
    /// Chunks to fetch, in chain order (newest backup first).
    pub items: Vec<PlanItem>,
    /// Blocks that will be written.
    pub blocks: u64,
    /// Bytes of chunk objects to fetch.
    pub bytes: u64,
}

impl RestorePlan {
    /// For every block below the head's export size, the newest record in
    /// the chain. Computed from manifests alone.
    pub fn new(chain: &Chain) -> Self {
        let limit = chain.head().blocks();
        let mut covered = IntervalSet::default();
        let mut items = Vec::new();
        let (mut blocks, mut bytes) = (0u64, 0u64);
        for m in &chain.manifests {
            for c in &m.chunks {
                let mut take = Vec::new();
                for r in &c.runs {
                    // Runs end ≤ that manifest's block count (checked when
                    // parsed); clip to the head's size (a shrunk export).
                    let e = r.start.saturating_add(r.len).min(limit);
                    take.extend(covered.subtract(r.start, e));
                }
                if !take.is_empty() {
                    blocks += take.iter().map(|r| r.len).sum::<u64>();
                    bytes += c.bytes;
                    items.push(PlanItem {
                        backup: m.backup_id.clone(),
                        chunk: c.clone(),
                        take,
                    });
                }
            }
            for c in &m.chunks {
                for r in &c.runs {
                    covered.insert(r.start, r.start.saturating_add(r.len));
                }
            }
        }
        Self {
            items,
            blocks,
            bytes,
        }
    }
}

/// Fetches a chunk and checks it against its manifest entry: SHA-256,
/// structure, exactly the recorded runs and data-block count.
pub async fn fetch_chunk(
    target: &dyn BackupTarget,
    backup: &BackupId,
    chunk: &ChunkRef,
) -> Result<DecodedChunk, BackupError> {
    let key = ObjectKey::object(&chunk.sha256)?;
    let bytes = target.get(&key).await.map_err(|e| match e {
        TargetError::NotFound { .. } => BackupError::Chain {
            backup: backup.to_string(),
            detail: format!(
                "chunk {} is missing from {}; the backup is damaged: restore from another backup",
                chunk.sha256,
                target.describe()
            ),
        },
        e => e.into(),
    })?;
    let as_chunk_err = |source| BackupError::Chunk {
        sha256: chunk.sha256.clone(),
        backup: backup.to_string(),
        source,
    };
    if bytes.len() as u64 != chunk.bytes {
        return Err(as_chunk_err(super::ChunkError::Length {
            len: bytes.len(),
            expected: usize::try_from(chunk.bytes).unwrap_or(usize::MAX),
        }));
    }
    let decoded = DecodedChunk::decode_verified(bytes, &chunk.sha256).map_err(as_chunk_err)?;
    decoded.check_runs(&chunk.runs).map_err(as_chunk_err)?;
    let data = decoded
        .records()
        .iter()
        .filter(|r| r.data().is_some())
        .count() as u64;
    if data != chunk.data_blocks {
        return Err(as_chunk_err(super::ChunkError::Runs));
    }
    Ok(decoded)
}

/// Fetches and checks the slot index of `m`.
pub async fn fetch_index(
    target: &dyn BackupTarget,
    m: &Manifest,
) -> Result<SlotIndex, BackupError> {
    let sha = &m.slot_index.sha256;
    let bytes: Bytes = target.get(&ObjectKey::object(sha)?).await?;
    let damaged = |detail: String| BackupError::Chain {
        backup: m.backup_id.to_string(),
        detail: format!("slot index {sha}: {detail}; take a new full backup"),
    };
    if hex::encode(Sha256::digest(&bytes)) != *sha {
        return Err(damaged("SHA-256 mismatch".into()));
    }
    let ix = SlotIndex::decode(&bytes, m.blocks()).map_err(|e| damaged(e.to_string()))?;
    if ix.present() != m.totals.blocks_present {
        return Err(damaged(
            "present block count differs from the manifest".into(),
        ));
    }
    Ok(ix)
}

/// What `prune` keeps and removes.
#[derive(Debug, Clone)]
pub struct PruneOptions {
    /// Newest backups to keep per export (their ancestors are kept too).
    pub keep: usize,
    /// Only prune this export's backups (default: every export).
    pub export: Option<String>,
    /// Unreferenced objects younger than this are left alone (they may
    /// belong to a backup still running).
    pub orphan_grace: Duration,
    /// Report only; delete nothing.
    pub dry_run: bool,
}

impl Default for PruneOptions {
    fn default() -> Self {
        Self {
            keep: 7,
            export: None,
            orphan_grace: Duration::from_secs(24 * 3600),
            dry_run: false,
        }
    }
}

/// What `prune` did (or would do, with `dry_run`).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PruneReport {
    /// Backups kept (asked for, or an ancestor of one asked for).
    pub kept: Vec<String>,
    /// Backups removed.
    pub removed: Vec<String>,
    /// Manifests that do not authenticate under the loaded keys: never
    /// removed, and everything they name is kept.
    pub unverified: Vec<String>,
    /// Objects removed.
    pub objects_removed: u64,
    /// Bytes of objects removed.
    pub bytes_removed: u64,
    /// True if object removal was skipped because a manifest could not be read at all.
    pub objects_skipped: bool,
}

/// Removes all but the newest `keep` backups of each export, never a backup
/// a kept one depends on, then the objects no remaining manifest references.
/// Manifests go first (children before parents), so a crash mid-prune leaves
/// every listed backup whole.
///
/// Prune must not run at the same time as a backup to the same destination:
/// a backup that re-uses an existing object could lose it.
pub async fn prune(
    target: &dyn BackupTarget,
    keys: &ManifestKeys,
    opts: &PruneOptions,
) -> Result<PruneReport, BackupError> {
    if opts.keep == 0 {
        return Err(BackupError::Invalid(
            "prune --keep 0 would remove every backup; keep at least 1".into(),
        ));
    }
    let mut report = PruneReport::default();
    let mut verified: BTreeMap<BackupId, Manifest> = BTreeMap::new();
    let mut others: Vec<Manifest> = Vec::new();
    for info in list(target, keys).await? {
        match info.manifest {
            Ok(m) => {
                verified.insert(info.id, m);
            }
            Err(_) => {
                report.unverified.push(info.id.to_string());
                let bytes = target.get(&info.id.manifest_key()).await?;
                match manifest::parse_unauthenticated(&info.id, &bytes) {
                    Ok(m) => others.push(m),
                    Err(_) => report.objects_skipped = true,
                }
            }
        }
    }
    // Per export, newest first by cut time.
    let mut by_export: BTreeMap<&str, Vec<&Manifest>> = BTreeMap::new();
    for m in verified.values() {
        by_export.entry(m.export.as_str()).or_default().push(m);
    }
    let mut keep: BTreeSet<BackupId> = BTreeSet::new();
    for (export, mut ms) in by_export {
        let in_scope = opts.export.as_deref().is_none_or(|e| e == export);
        ms.sort_by(|a, b| (b.cut_unix_ms, &b.backup_id).cmp(&(a.cut_unix_ms, &a.backup_id)));
        let n = if in_scope { opts.keep } else { ms.len() };
        for m in ms.into_iter().take(n) {
            // The backup and its ancestors.
            let mut cur = Some(m);
            while let Some(c) = cur {
                if !keep.insert(c.backup_id.clone()) {
                    break;
                }
                cur = c.parent.as_ref().and_then(|p| verified.get(p));
            }
        }
    }
    let mut remove: Vec<&Manifest> = verified
        .values()
        .filter(|m| !keep.contains(&m.backup_id))
        .collect();
    // Children before parents: newest cut first.
    remove.sort_by(|a, b| (b.cut_unix_ms, &b.backup_id).cmp(&(a.cut_unix_ms, &a.backup_id)));
    report.kept = keep.iter().map(|id| id.to_string()).collect();
    report.removed = remove.iter().map(|m| m.backup_id.to_string()).collect();

    let mut referenced: BTreeSet<&str> = BTreeSet::new();
    for m in verified.values().filter(|m| keep.contains(&m.backup_id)) {
        referenced.extend(m.object_shas());
    }
    for m in &others {
        referenced.extend(m.object_shas());
    }
    let released: BTreeSet<&str> = remove.iter().flat_map(|m| m.object_shas()).collect();

    if !opts.dry_run {
        for m in &remove {
            target.delete(&m.backup_id.manifest_key()).await?;
        }
    }
    if report.objects_skipped {
        return Ok(report);
    }
    let now = SystemTime::now();
    for o in target.list("objects/").await? {
        let sha = o.key.trim_start_matches("objects/");
        if referenced.contains(sha) {
            continue;
        }
        let old_enough = o
            .modified
            .and_then(|t| now.duration_since(t).ok())
            .is_some_and(|age| age >= opts.orphan_grace);
        if !(released.contains(sha) || old_enough) {
            continue;
        }
        if !opts.dry_run {
            target.delete(&ObjectKey::parse(&o.key)?).await?;
        }
        report.objects_removed += 1;
        report.bytes_removed += o.size;
    }
    Ok(report)
}

/// What verify checked.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct VerifyReport {
    /// The chain, requested backup first.
    pub chain: Vec<String>,
    /// Chunk objects checked (each once).
    pub chunks: u64,
    /// Block records checked.
    pub blocks: u64,
    /// Bytes read.
    pub bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn runs(v: &[(u64, u64)]) -> Vec<BlockRun> {
        v.iter()
            .map(|&(start, len)| BlockRun { start, len })
            .collect()
    }

    #[test]
    fn interval_set() {
        let mut s = IntervalSet::default();
        s.insert(10, 20);
        s.insert(30, 40);
        assert_eq!(s.subtract(0, 50), runs(&[(0, 10), (20, 10), (40, 10)]));
        assert_eq!(s.subtract(12, 18), vec![]);
        assert_eq!(s.subtract(15, 35), runs(&[(20, 10)]));
        s.insert(20, 30);
        assert_eq!(s.map.len(), 1);
        assert_eq!(s.subtract(0, 50), runs(&[(0, 10), (40, 10)]));
    }

    /// A chain of synthetic manifests, newest first, from per-backup block
    /// sets split into chunks of consecutive blocks.
    fn chain_of(backups: &[Vec<u64>], blocks: u64) -> Chain {
        use crate::backup::manifest::tests::sample;
        let mut manifests = Vec::new();
        for (n, set) in backups.iter().enumerate() {
            let mut m = sample();
            m.export_size = blocks * 4096;
            m.backup_id =
                BackupId::parse(&format!("20261201T1400{:02}Z-0000000{}", n, n % 10)).unwrap();
            m.chunks = set
                .chunks(3)
                .map(|part| {
                    let mut runs = Vec::new();
                    for &b in part {
                        crate::backup::chunk::push_run(&mut runs, b);
                    }
                    ChunkRef {
                        sha256: "00".repeat(32),
                        bytes: 1,
                        runs,
                        data_blocks: 0,
                    }
                })
                .collect();
            manifests.push(m);
        }
        manifests.reverse();
        Chain { manifests }
    }

    proptest! {
        #[test]
        fn prop_plan_takes_newest_record(
            sets in proptest::collection::vec(proptest::collection::btree_set(0u64..64, 0..20), 1..6),
        ) {
            let backups: Vec<Vec<u64>> = sets.iter().map(|s| s.iter().copied().collect()).collect();
            let chain = chain_of(&backups, 64);
            let plan = RestorePlan::new(&chain);
            // Model: block -> index of the newest backup (oldest = 0) holding it.
            let mut newest = BTreeMap::new();
            for (n, set) in backups.iter().enumerate() {
                for &b in set {
                    newest.insert(b, n);
                }
            }
            let mut got = BTreeMap::new();
            for it in &plan.items {
                let n = backups.len() - 1 - chain.manifests.iter().position(|m| m.backup_id == it.backup).unwrap();
                for r in &it.take {
                    for b in r.start..r.start + r.len {
                        prop_assert!(got.insert(b, n).is_none(), "block {} planned twice", b);
                        // Taken blocks lie inside the chunk's runs.
                        prop_assert!(it.chunk.runs.iter().any(|c| c.start <= b && b < c.start + c.len));
                    }
                }
            }
            prop_assert_eq!(plan.blocks, got.len() as u64);
            prop_assert_eq!(got, newest);
        }

        #[test]
        fn prop_interval_set_matches_model(
            ins in proptest::collection::vec((0u64..200, 0u64..30), 0..20),
            q in (0u64..250, 0u64..60),
        ) {
            let mut s = IntervalSet::default();
            let mut model = BTreeSet::new();
            for (a, l) in ins {
                s.insert(a, a + l);
                model.extend(a..a + l);
            }
            let got: BTreeSet<u64> = s.subtract(q.0, q.0 + q.1).iter().flat_map(|r| r.start..r.start + r.len).collect();
            let want: BTreeSet<u64> = (q.0..q.0 + q.1).filter(|b| !model.contains(b)).collect();
            prop_assert_eq!(got, want);
        }
    }
}
