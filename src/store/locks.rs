//! Striped block-range locks. Writers (and read-modify-write) lock the stripes
//! covering their blocks in ascending order, so two requests touching the same
//! block serialise and no two requests can deadlock. Readers do not lock on the
//! fast path: a reader that sees an entry/data mismatch (a write in progress)
//! retries under the lock.

use std::sync::{Mutex, MutexGuard};

/// Blocks per lock unit (64 KiB).
const UNIT_BLOCKS: u64 = 16;
/// Number of stripes per export.
const STRIPES: usize = 256;

/// The lock table of one export.
#[derive(Debug)]
pub struct StripeLocks {
    stripes: Vec<Mutex<()>>,
}

/// Held stripes; released on drop.
pub struct RangeGuard<'a> {
    _guards: Vec<MutexGuard<'a, ()>>,
}

impl Default for StripeLocks {
    fn default() -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }
}

impl StripeLocks {
    /// Locks every stripe covering blocks `first..=last`.
    pub fn lock(&self, first: u64, last: u64) -> RangeGuard<'_> {
        let (u0, u1) = (first / UNIT_BLOCKS, last / UNIT_BLOCKS);
        let mut idx: Vec<usize> = if u1 - u0 + 1 >= STRIPES as u64 {
            (0..STRIPES).collect()
        } else {
            (u0..=u1).map(|u| (u % STRIPES as u64) as usize).collect()
        };
        idx.sort_unstable();
        idx.dedup();
        RangeGuard {
            _guards: idx
                .into_iter()
                // The guarded value is `()`: a poisoned stripe protects nothing
                // that could be left inconsistent, so poisoning is ignored.
                .map(|i| self.stripes[i].lock().unwrap_or_else(|p| p.into_inner()))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn overlapping_ranges_serialise_and_wrapping_ranges_do_not_deadlock() {
        let l = Arc::new(StripeLocks::default());
        let mut hs = vec![];
        for t in 0..4u64 {
            let l = Arc::clone(&l);
            hs.push(std::thread::spawn(move || {
                for i in 0..200u64 {
                    let a = (i * 37 + t * 1000) % 10_000;
                    let _g = l.lock(a, a + (i % 7) * 900);
                }
            }));
        }
        for h in hs {
            h.join().unwrap();
        }
    }
}
