//! HKDF-SHA256 derivation of per-file keys (RFC 5869), one key per purpose
//! and, for the data and block-MAC keys, per epoch.

use std::fmt;

use aes::cipher::KeyInit;
use aes::Aes256Enc;
use aes_gcm::aead::AeadInOut;
use aes_gcm::Aes256Gcm;
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::{FileId, SecretKey, KEY_LEN};

/// HKDF `info` prefix of the data-encryption key; `be32(epoch)` follows.
pub const LABEL_DATA: &[u8] = b"ear-sidecar/v2 data-key";
/// HKDF `info` for the header MAC key (no epoch).
pub const LABEL_HEADER_MAC: &[u8] = b"ear-sidecar/v2 header-mac-key";
/// HKDF `info` prefix of the per-block MAC key (integrity mode); `be32(epoch)` follows.
pub const LABEL_BLOCK_MAC: &[u8] = b"ear-sidecar/v2 block-mac-key";
/// HKDF `info` of the key-registry MAC key.
pub const LABEL_REGISTRY_MAC: &[u8] = b"ear-sidecar/v2 registry-mac-key";

/// HMAC-SHA256 of `msg` (the registry's canonical encoding) under the
/// registry MAC key: HKDF-SHA256 with `IKM` = `universe`, `salt` = the data
/// directory's 16-byte id, `info` = [`LABEL_REGISTRY_MAC`]. The derived key
/// lives in a zeroizing buffer and is gone when this returns.
pub fn registry_mac(universe: &SecretKey, dir_id: &[u8; 16], msg: &[u8]) -> [u8; 32] {
    let hk = Hkdf::<Sha256>::new(Some(&dir_id[..]), universe.expose());
    let mut okm = Zeroizing::new([0u8; KEY_LEN]);
    // 32 bytes is far below HKDF-SHA256's 255*32 limit: cannot fail.
    hk.expand(LABEL_REGISTRY_MAC, &mut okm[..])
        .expect("HKDF-SHA256 expand of 32 bytes cannot fail");
    let mut mac = <Hmac<Sha256>>::new_from_slice(&okm[..]).expect("HMAC accepts any key length");
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

/// The keys of one backing file under one universe-key version and one
/// epoch. The AES key schedules are expanded once here and reused for every
/// block.
pub struct FileKeys {
    data: Box<Aes256Enc>,
    header_mac: SecretKey,
    block_mac: Box<Aes256Gcm>,
}

/// Length of a per-block authentication tag.
pub const BLOCK_TAG_LEN: usize = 16;

impl fmt::Debug for FileKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FileKeys([redacted])")
    }
}

/// Derives the keys of file `file_id` for `epoch` from `universe` (one HKDF
/// extract, one expand per purpose). The header MAC key does not depend on
/// the epoch.
pub fn derive_file_keys(universe: &SecretKey, file_id: &FileId, epoch: u32) -> FileKeys {
    let hk = Hkdf::<Sha256>::new(Some(&file_id[..]), universe.expose());
    let expand = |label: &[u8], epoch: Option<u32>| {
        let mut okm = Zeroizing::new([0u8; KEY_LEN]);
        let e = epoch.map(u32::to_be_bytes);
        let info: [&[u8]; 2] = [label, e.as_ref().map_or(&[][..], |e| &e[..])];
        // 32 bytes is far below HKDF-SHA256's 255*32 limit: cannot fail.
        hk.expand_multi_info(&info, &mut okm[..])
            .expect("HKDF-SHA256 expand of 32 bytes cannot fail");
        okm
    };
    let data_key = expand(LABEL_DATA, Some(epoch));
    let data = Box::new(Aes256Enc::new((&*data_key).into()));
    let mut hm = expand(LABEL_HEADER_MAC, None);
    let bm = expand(LABEL_BLOCK_MAC, Some(epoch));
    FileKeys {
        data,
        header_mac: SecretKey::take_from(&mut hm[..]).expect("32-byte key"),
        block_mac: Box::new(Aes256Gcm::new((&*bm).into())),
    }
}

impl FileKeys {
    /// The expanded AES-256 encryption key schedule for data blocks.
    pub fn data_cipher(&self) -> &Aes256Enc {
        &self.data
    }

    /// HMAC-SHA256 of `msg` under the header MAC key.
    pub fn header_mac(&self, msg: &[u8]) -> [u8; 32] {
        let mut mac = <Hmac<Sha256>>::new_from_slice(self.header_mac.expose())
            .expect("HMAC accepts any key length");
        mac.update(msg);
        mac.finalize().into_bytes().into()
    }

    /// Constant-time check of a header MAC.
    pub fn verify_header_mac(&self, msg: &[u8], tag: &[u8]) -> bool {
        let mut mac = <Hmac<Sha256>>::new_from_slice(self.header_mac.expose())
            .expect("HMAC accepts any key length");
        mac.update(msg);
        mac.verify_slice(tag).is_ok()
    }

    /// Per-block authentication tag (integrity mode): AES-256-GMAC (GCM with
    /// an empty plaintext, NIST SP 800-38D) under the block-MAC key, with the
    /// block's 96-bit nonce as IV and, as AAD,
    /// `file_id(16) || be64(block index) || be32(key version) || be32(epoch) || stored block`.
    /// The block-MAC key is independent of the data key, and the nonce is
    /// unique per write under one (version, epoch) key, so this is a
    /// nonce-based Carter-Wegman MAC binding the ciphertext to its file,
    /// position, key version and epoch.
    pub fn block_tag(
        &self,
        nonce: &[u8; 12],
        file_id: &super::FileId,
        block: u64,
        key_version: u32,
        epoch: u32,
        stored: &[u8],
    ) -> [u8; BLOCK_TAG_LEN] {
        let mut aad = Vec::with_capacity(32 + stored.len());
        aad.extend_from_slice(file_id);
        aad.extend_from_slice(&block.to_be_bytes());
        aad.extend_from_slice(&key_version.to_be_bytes());
        aad.extend_from_slice(&epoch.to_be_bytes());
        aad.extend_from_slice(stored);
        let tag = self
            .block_mac
            .encrypt_inout_detached(nonce.into(), &aad, (&mut [][..]).into())
            .expect("GMAC over < 64 GiB of AAD cannot fail");
        tag.into()
    }

    /// Constant-time check of a block tag.
    #[allow(clippy::too_many_arguments)]
    pub fn verify_block_tag(
        &self,
        tag: &[u8],
        nonce: &[u8; 12],
        file_id: &super::FileId,
        block: u64,
        key_version: u32,
        epoch: u32,
        stored: &[u8],
    ) -> bool {
        use subtle::ConstantTimeEq;
        let want = self.block_tag(nonce, file_id, block, key_version, epoch, stored);
        tag.len() == BLOCK_TAG_LEN && bool::from(want.ct_eq(tag))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }

    /// RFC 5869 appendix A.1 (SHA-256, basic test case).
    #[test]
    fn rfc5869_case_1() {
        let ikm = unhex("0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b");
        let salt = unhex("000102030405060708090a0b0c");
        let info = unhex("f0f1f2f3f4f5f6f7f8f9");
        let (prk, hk) = Hkdf::<Sha256>::extract(Some(&salt), &ikm);
        assert_eq!(
            hex::encode(prk),
            "077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5"
        );
        let mut okm = [0u8; 42];
        hk.expand(&info, &mut okm).unwrap();
        assert_eq!(
            hex::encode(okm),
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
        );
    }

    /// RFC 5869 appendix A.3 (zero-length salt and info).
    #[test]
    fn rfc5869_case_3() {
        let ikm = unhex("0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b");
        let hk = Hkdf::<Sha256>::new(None, &ikm);
        let mut okm = [0u8; 42];
        hk.expand(&[], &mut okm).unwrap();
        assert_eq!(
            hex::encode(okm),
            "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"
        );
    }

    #[test]
    fn registry_mac_depends_on_key_dir_and_message() {
        let mut raw = [9u8; 32];
        let u = SecretKey::take_from(&mut raw).unwrap();
        let mut raw = [8u8; 32];
        let v = SecretKey::take_from(&mut raw).unwrap();
        let m = registry_mac(&u, &[1; 16], b"reg");
        assert_eq!(m, registry_mac(&u, &[1; 16], b"reg"));
        assert_ne!(m, registry_mac(&v, &[1; 16], b"reg"));
        assert_ne!(m, registry_mac(&u, &[2; 16], b"reg"));
        assert_ne!(m, registry_mac(&u, &[1; 16], b"reh"));
        // Not the header MAC key under another name.
        let fk = derive_file_keys(&u, &[1; 16], 0);
        assert_ne!(m, fk.header_mac(b"reg"));
    }

    #[test]
    fn purposes_and_files_get_distinct_keys() {
        let mut raw = [9u8; 32];
        let u = SecretKey::take_from(&mut raw).unwrap();
        let a = derive_file_keys(&u, &[1u8; 16], 1);
        let b = derive_file_keys(&u, &[2u8; 16], 1);
        let a2 = derive_file_keys(&u, &[1u8; 16], 2);
        assert_ne!(a.header_mac(b"x"), b.header_mac(b"x"));
        assert_eq!(
            a.header_mac(b"x"),
            a2.header_mac(b"x"),
            "header key has no epoch"
        );
        let t = a.block_tag(&[1; 12], &[1; 16], 5, 1, 1, b"data");
        assert!(a.verify_block_tag(&t, &[1; 12], &[1; 16], 5, 1, 1, b"data"));
        assert!(!a.verify_block_tag(&t, &[1; 12], &[1; 16], 6, 1, 1, b"data"));
        assert!(!a.verify_block_tag(&t, &[1; 12], &[2; 16], 5, 1, 1, b"data"));
        assert!(!a.verify_block_tag(&t, &[1; 12], &[1; 16], 5, 2, 1, b"data"));
        assert!(!a.verify_block_tag(&t, &[1; 12], &[1; 16], 5, 1, 2, b"data"));
        assert!(!a.verify_block_tag(&t, &[2; 12], &[1; 16], 5, 1, 1, b"data"));
        assert!(!a.verify_block_tag(&t, &[1; 12], &[1; 16], 5, 1, 1, b"dat4"));
        assert_ne!(t, b.block_tag(&[1; 12], &[1; 16], 5, 1, 1, b"data"));
        assert_ne!(
            t,
            a2.block_tag(&[1; 12], &[1; 16], 5, 1, 1, b"data"),
            "per-epoch MAC key"
        );
        let (mut x, mut y) = ([0u8; 16], [0u8; 16]);
        crate::crypto::BlockCipher::new(a.data_cipher()).apply(&[0; 12], &mut x);
        crate::crypto::BlockCipher::new(a2.data_cipher()).apply(&[0; 12], &mut y);
        assert_ne!(x, y, "per-epoch data key");
        assert!(a.verify_header_mac(b"x", &a.header_mac(b"x")));
        assert!(!a.verify_header_mac(b"y", &a.header_mac(b"x")));
    }
}
