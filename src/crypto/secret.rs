//! Secret key material as a type: 32 bytes on the heap (so moves never leave
//! copies on the stack), zeroized on drop, redacted in `Debug`, never `Clone`
//! by accident and never serialisable.

use std::fmt;

use zeroize::{Zeroize, ZeroizeOnDrop};

use super::CryptoError;

/// Length of every symmetric key in the system (AES-256, HMAC-SHA256 keys).
pub const KEY_LEN: usize = 32;

/// A 256-bit secret key. Zeroized on drop; `Debug` prints no key bytes.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct SecretKey(Box<[u8; KEY_LEN]>);

impl SecretKey {
    /// A fresh key from the operating system's CSPRNG.
    pub fn generate() -> Result<Self, CryptoError> {
        let mut key = Box::new([0u8; KEY_LEN]);
        super::fill_random(&mut key[..])?;
        Ok(Self(key))
    }

    /// Takes key bytes from `src` and zeroizes `src`, so the caller's buffer
    /// never outlives the key. Fails on a wrong length (the source is still wiped).
    pub fn take_from(src: &mut [u8]) -> Result<Self, CryptoError> {
        if src.len() != KEY_LEN {
            src.zeroize();
            return Err(CryptoError::KeyLength(src.len()));
        }
        let mut key = Box::new([0u8; KEY_LEN]);
        key.copy_from_slice(src);
        src.zeroize();
        Ok(Self(key))
    }

    /// The raw key bytes. Callers must not copy them into unmanaged memory.
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// An explicit duplicate (a new zeroizing allocation).
    pub fn duplicate(&self) -> Self {
        Self(Box::new(*self.0))
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey([redacted])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_bytes() {
        let mut raw = [0xabu8; 32];
        let k = SecretKey::take_from(&mut raw).unwrap();
        assert_eq!(raw, [0u8; 32], "source must be wiped");
        let dbg = format!("{k:?}");
        assert!(!dbg.contains("ab") && !dbg.contains("171"), "{dbg}");
    }

    #[test]
    fn wrong_length_rejected_and_wiped() {
        let mut raw = [7u8; 16];
        assert!(SecretKey::take_from(&mut raw).is_err());
        assert_eq!(raw, [0u8; 16]);
    }

    #[test]
    fn generated_keys_differ() {
        let a = SecretKey::generate().unwrap();
        let b = SecretKey::generate().unwrap();
        assert_ne!(a.expose(), b.expose());
    }
}
