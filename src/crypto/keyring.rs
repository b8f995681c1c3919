//! The in-memory key ring: universe keys by version, and a sharded LRU cache
//! of derived per-file keys keyed by (file id, key version, epoch).
//!
//! The cache is split into shards, each behind its own short-held mutex, so
//! concurrent requests on different files rarely meet on one lock (`lru`'s
//! `get` needs `&mut self`). Wiping (fail-closed) drops every key and makes
//! every later lookup fail until a restart.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use lru::LruCache;

use super::{derive_file_keys, CryptoError, FileId, FileKeys, SecretKey};

const SHARDS: usize = 16;

type Shard = Mutex<LruCache<(FileId, u32, u32), Arc<FileKeys>>>;

/// Counters of the derived-key cache (read by the metrics layer).
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Lookups answered from the cache.
    pub hits: AtomicU64,
    /// Lookups that had to derive.
    pub misses: AtomicU64,
    /// Entries evicted to make room.
    pub evictions: AtomicU64,
    /// HKDF derivations performed.
    pub derivations: AtomicU64,
}

/// A point-in-time view of the ring for status and metrics (no secrets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRingSnapshot {
    /// Loaded universe-key versions.
    pub versions: Vec<u32>,
    /// Version used for new writes.
    pub active: u32,
    /// True after [`KeyRing::wipe`].
    pub failed_closed: bool,
}

/// Universe keys plus the derived-key cache.
pub struct KeyRing {
    universe: RwLock<BTreeMap<u32, Arc<SecretKey>>>,
    active: AtomicU32,
    shards: Vec<Shard>,
    closed: AtomicBool,
    closed_reason: Mutex<String>,
    stats: CacheStats,
    /// Unix time the active version was created (for metrics).
    rotated_unix: AtomicU64,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing")
            .field("snapshot", &self.snapshot())
            .finish_non_exhaustive()
    }
}

impl KeyRing {
    /// A ring holding `keys` (version → universe key) with `active` used for
    /// new writes, caching up to `cache_capacity` derived file keys.
    pub fn new(
        keys: BTreeMap<u32, SecretKey>,
        active: u32,
        cache_capacity: usize,
    ) -> Result<Self, CryptoError> {
        if !keys.contains_key(&active) {
            return Err(CryptoError::UnknownVersion(active));
        }
        let per_shard =
            NonZeroUsize::new(cache_capacity.div_ceil(SHARDS).max(1)).unwrap_or(NonZeroUsize::MIN);
        Ok(Self {
            universe: RwLock::new(keys.into_iter().map(|(v, k)| (v, Arc::new(k))).collect()),
            active: AtomicU32::new(active),
            shards: (0..SHARDS)
                .map(|_| Mutex::new(LruCache::new(per_shard)))
                .collect(),
            closed: AtomicBool::new(false),
            closed_reason: Mutex::new(String::new()),
            stats: CacheStats::default(),
            rotated_unix: AtomicU64::new(0),
        })
    }

    /// The key version new writes use.
    pub fn active_version(&self) -> u32 {
        self.active.load(Ordering::Acquire)
    }

    /// Cache counters.
    pub fn stats(&self) -> &CacheStats {
        &self.stats
    }

    /// The keys of `file` under `version` for `epoch`, derived on a cache
    /// miss. (The header MAC key is the same in every epoch.)
    pub fn file_keys(
        &self,
        file: &FileId,
        version: u32,
        epoch: u32,
    ) -> Result<Arc<FileKeys>, CryptoError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(self.closed_error());
        }
        let id = (*file, version, epoch);
        let shard = &self.shards[shard_of(file, version, epoch)];
        if let Some(k) = lock(shard).get(&id) {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Arc::clone(k));
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        let universe = {
            let map = self.universe.read().unwrap_or_else(|p| p.into_inner());
            match map.get(&version) {
                Some(k) => Arc::clone(k),
                None if self.closed.load(Ordering::Acquire) => return Err(self.closed_error()),
                None => return Err(CryptoError::UnknownVersion(version)),
            }
        };
        let keys = Arc::new(derive_file_keys(&universe, file, epoch));
        self.stats.derivations.fetch_add(1, Ordering::Relaxed);
        let mut guard = lock(shard);
        if self.closed.load(Ordering::Acquire) {
            return Err(self.closed_error());
        }
        // A version retired while this key was derived must not come back
        // into the cache (retirement purges the cache before it returns).
        if !self.is_loaded(version) {
            return Err(CryptoError::UnknownVersion(version));
        }
        if let Some((old_key, _)) = guard.push(id, Arc::clone(&keys)) {
            if old_key != id {
                self.stats.evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(keys)
    }

    fn is_loaded(&self, version: u32) -> bool {
        self.universe
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&version)
    }

    /// Adds universe key `version` (a rotation), without changing the active
    /// version. Refused after a wipe and for a version already loaded.
    pub fn insert_version(&self, version: u32, key: SecretKey) -> Result<(), CryptoError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(self.closed_error());
        }
        let mut map = self.universe.write().unwrap_or_else(|p| p.into_inner());
        if version == 0 || map.contains_key(&version) {
            return Err(CryptoError::VersionConflict(version));
        }
        map.insert(version, Arc::new(key));
        Ok(())
    }

    /// Makes `version` (already loaded) the one new writes use. A write that
    /// reads the active version after this returns uses `version`.
    pub fn set_active(&self, version: u32) -> Result<(), CryptoError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(self.closed_error());
        }
        let map = self.universe.read().unwrap_or_else(|p| p.into_inner());
        if !map.contains_key(&version) {
            return Err(CryptoError::UnknownVersion(version));
        }
        // Stored while the map is read-locked, so a concurrent removal of
        // `version` cannot slip in between the check and the switch.
        self.active.store(version, Ordering::Release);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.rotated_unix.store(now, Ordering::Release);
        Ok(())
    }

    /// Unix time of the last rotation (the active version's creation), 0
    /// when unknown.
    pub fn rotated_unix(&self) -> u64 {
        self.rotated_unix.load(Ordering::Acquire)
    }

    /// Records when the active version was created (from the registry).
    pub fn set_rotated_unix(&self, unix: u64) {
        self.rotated_unix.store(unix, Ordering::Release);
    }

    /// Drops universe key `version` and every file key derived from it
    /// (retirement). The active version cannot be removed.
    pub fn remove_version(&self, version: u32) -> Result<(), CryptoError> {
        {
            let mut map = self.universe.write().unwrap_or_else(|p| p.into_inner());
            if version == self.active_version() {
                return Err(CryptoError::VersionConflict(version));
            }
            if map.remove(&version).is_none() {
                return Err(CryptoError::UnknownVersion(version));
            }
        }
        for s in &self.shards {
            let mut g = lock(s);
            let stale: Vec<_> = g
                .iter()
                .filter(|(k, _)| k.1 == version)
                .map(|(k, _)| *k)
                .collect();
            for k in stale {
                g.pop(&k);
            }
        }
        Ok(())
    }

    /// HMAC-SHA256 of `msg` under the registry MAC key derived from universe
    /// key `version` (see [`super::registry_mac`]). Fails when that version is
    /// not loaded or the ring was wiped.
    pub fn registry_mac(
        &self,
        version: u32,
        dir_id: &[u8; 16],
        msg: &[u8],
    ) -> Result<[u8; 32], CryptoError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(self.closed_error());
        }
        let universe = {
            let map = self.universe.read().unwrap_or_else(|p| p.into_inner());
            match map.get(&version) {
                Some(k) => Arc::clone(k),
                None => return Err(CryptoError::UnknownVersion(version)),
            }
        };
        Ok(super::registry_mac(&universe, dir_id, msg))
    }

    /// True when every version `other` holds is held here too, with the same
    /// universe key (compared in constant time per key). A rewrap checks with
    /// it that the new blobs unwrap to the keys in use.
    pub fn contains_keys_of(&self, other: &KeyRing) -> bool {
        use subtle::ConstantTimeEq;
        let mine = self.universe.read().unwrap_or_else(|p| p.into_inner());
        let theirs = other.universe.read().unwrap_or_else(|p| p.into_inner());
        !theirs.is_empty()
            && theirs.iter().all(|(v, k)| {
                mine.get(v)
                    .is_some_and(|m| bool::from(m.expose()[..].ct_eq(&k.expose()[..])))
            })
    }

    /// Fail closed: drop every universe and derived key held here and refuse all
    /// further lookups. Requests that already hold an `Arc<FileKeys>` finish;
    /// memory is zeroized when the last holder drops it.
    pub fn wipe(&self, reason: &str) {
        *lock(&self.closed_reason) = reason.to_string();
        self.closed.store(true, Ordering::Release);
        self.universe
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        for s in &self.shards {
            lock(s).clear();
        }
    }

    /// `f` applied to each loaded universe key, by version: for keys that
    /// derive from the universe key outside the per-file scheme (the backup
    /// manifest key). Fails closed like [`KeyRing::file_keys`].
    pub fn derive_each<T>(
        &self,
        f: impl Fn(u32, &SecretKey) -> T,
    ) -> Result<Vec<(u32, T)>, CryptoError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(self.closed_error());
        }
        let map = self.universe.read().unwrap_or_else(|p| p.into_inner());
        Ok(map.iter().map(|(&v, k)| (v, f(v, k))).collect())
    }

    /// True after [`KeyRing::wipe`].
    pub fn is_failed_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Versions, active version and state; never key bytes.
    pub fn snapshot(&self) -> KeyRingSnapshot {
        let versions = self
            .universe
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect();
        KeyRingSnapshot {
            versions,
            active: self.active_version(),
            failed_closed: self.is_failed_closed(),
        }
    }

    fn closed_error(&self) -> CryptoError {
        CryptoError::FailedClosed(lock(&self.closed_reason).clone())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding a cache lock leaves the cache consistent (LRU ops
    // are not interrupted half-way by our code), so poisoning is ignored.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn shard_of(file: &FileId, version: u32, epoch: u32) -> usize {
    // File ids are uniformly random: their first bytes are a fine hash.
    (usize::from(file[0])
        ^ usize::from(file[1]).rotate_left(3)
        ^ version as usize
        ^ (epoch as usize).rotate_left(2))
        % SHARDS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(cap: usize) -> KeyRing {
        let mut keys = BTreeMap::new();
        keys.insert(1, SecretKey::generate().unwrap());
        KeyRing::new(keys, 1, cap).unwrap()
    }

    #[test]
    fn caches_and_counts() {
        let r = ring(64);
        let f = [5u8; 16];
        let a = r.file_keys(&f, 1, 1).unwrap();
        let b = r.file_keys(&f, 1, 1).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(r.stats().hits.load(Ordering::Relaxed), 1);
        assert_eq!(r.stats().misses.load(Ordering::Relaxed), 1);
        let c = r.file_keys(&f, 1, 2).unwrap();
        assert!(!Arc::ptr_eq(&a, &c), "one entry per epoch");
        assert!(matches!(
            r.file_keys(&f, 2, 1),
            Err(CryptoError::UnknownVersion(2))
        ));
    }

    #[test]
    fn evicts_under_pressure() {
        let r = ring(16); // one entry per shard
        for i in 0..=255u8 {
            r.file_keys(&[i; 16], 1, 1).unwrap();
        }
        assert!(r.stats().evictions.load(Ordering::Relaxed) > 0);
    }

    #[test]
    fn rotate_and_retire_versions() {
        let r = ring(64);
        let f = [3u8; 16];
        r.file_keys(&f, 1, 1).unwrap();
        r.insert_version(2, SecretKey::generate().unwrap()).unwrap();
        assert!(matches!(
            r.insert_version(2, SecretKey::generate().unwrap()),
            Err(CryptoError::VersionConflict(2))
        ));
        assert_eq!(r.active_version(), 1);
        assert!(matches!(
            r.set_active(3),
            Err(CryptoError::UnknownVersion(3))
        ));
        r.set_active(2).unwrap();
        assert_eq!(r.active_version(), 2);
        assert!(matches!(
            r.remove_version(2),
            Err(CryptoError::VersionConflict(2))
        ));
        let k2 = r.file_keys(&f, 2, 1).unwrap();
        r.remove_version(1).unwrap();
        assert_eq!(r.snapshot().versions, vec![2]);
        // Derived keys of the retired version are gone from the cache too.
        assert!(matches!(
            r.file_keys(&f, 1, 1),
            Err(CryptoError::UnknownVersion(1))
        ));
        assert!(Arc::ptr_eq(&k2, &r.file_keys(&f, 2, 1).unwrap()));
        for s in &r.shards {
            assert!(lock(s).iter().all(|(k, _)| k.1 != 1));
        }
        assert!(matches!(
            r.remove_version(1),
            Err(CryptoError::UnknownVersion(1))
        ));
    }

    #[test]
    fn contains_keys_of_compares_versions_and_bytes() {
        let k = SecretKey::generate().unwrap();
        let a = KeyRing::new(BTreeMap::from([(1, k.duplicate())]), 1, 4).unwrap();
        let b = KeyRing::new(BTreeMap::from([(1, k.duplicate())]), 1, 4).unwrap();
        let c = KeyRing::new(BTreeMap::from([(2, k.duplicate())]), 2, 4).unwrap();
        let both = KeyRing::new(
            BTreeMap::from([(1, k.duplicate()), (2, SecretKey::generate().unwrap())]),
            2,
            4,
        )
        .unwrap();
        assert!(a.contains_keys_of(&b));
        assert!(!a.contains_keys_of(&c), "version 2 not held");
        assert!(!a.contains_keys_of(&ring(4)), "another key as version 1");
        assert!(both.contains_keys_of(&a), "a ring may hold more versions");
        assert!(!a.contains_keys_of(&both));
    }

    #[test]
    fn wipe_fails_closed() {
        let r = ring(64);
        r.file_keys(&[1; 16], 1, 1).unwrap();
        r.wipe("CMK disabled");
        let err = r.file_keys(&[1; 16], 1, 1).unwrap_err();
        assert!(err.to_string().contains("CMK disabled"), "{err}");
        assert!(r.snapshot().versions.is_empty());
        assert!(r.snapshot().failed_closed);
    }
}
