//! The data-block cipher: AES-256-CTR with a random 96-bit nonce and a 32-bit
//! big-endian block counter, applied to one stored block at a time.

use aes::Aes256Enc;
use ctr::cipher::{InnerIvInit, StreamCipher, StreamCipherCoreWrapper};

/// Bytes of random nonce stored with each block.
pub const NONCE_LEN: usize = 12;

type Ctr = ctr::Ctr32BE<Aes256Enc>;
type CtrCore = ctr::CtrCore<Aes256Enc, ctr::flavors::Ctr32BE>;

/// A CTR instance that reuses an already expanded key schedule.
fn ctr_with(key: &Aes256Enc, iv: &[u8; 16]) -> Ctr {
    StreamCipherCoreWrapper::from_core(CtrCore::inner_iv_init(key.clone(), iv.into()))
}

/// Encrypts/decrypts blocks with one file's data key. CTR is an involution,
/// so the same call encrypts and decrypts.
#[derive(Clone, Copy)]
pub struct BlockCipher<'a> {
    key: &'a Aes256Enc,
}

impl<'a> BlockCipher<'a> {
    /// Wraps an expanded key schedule (from [`super::FileKeys::data_cipher`]).
    pub fn new(key: &'a Aes256Enc) -> Self {
        Self { key }
    }

    /// XORs `buf` with the keystream for `nonce`, counter starting at 0.
    /// `buf` must be at most 2^32 AES blocks long (a stored block is 256).
    pub fn apply(&self, nonce: &[u8; NONCE_LEN], buf: &mut [u8]) {
        let mut iv = [0u8; 16];
        iv[..NONCE_LEN].copy_from_slice(nonce);
        let mut c = ctr_with(self.key, &iv);
        c.apply_keystream(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes::cipher::KeyInit;
    use proptest::prelude::*;

    fn unhex(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }

    /// NIST SP 800-38A F.5.5 (CTR-AES256.Encrypt). The NIST initial counter block
    /// is f0f1..ff; its low 32 bits are fcfdfeff and the four blocks do not carry
    /// past 32 bits, so a 32-bit counter gives the same keystream.
    #[test]
    fn nist_sp800_38a_ctr_aes256() {
        let key = unhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4");
        let icb = unhex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff");
        let pt = unhex(concat!(
            "6bc1bee22e409f96e93d7e117393172a",
            "ae2d8a571e03ac9c9eb76fac45af8e51",
            "30c81c46a35ce411e5fbc1191a0a52ef",
            "f69f2445df4f9b17ad2b417be66c3710"
        ));
        let ct = concat!(
            "601ec313775789a5b7a7f504bbf3d228",
            "f443e3ca4d62b59aca84e990cacaf5c5",
            "2b0930daa23de94ce87017ba2d84988d",
            "dfc9c58db67aada613c2dd08457941a6"
        );
        let aes = Aes256Enc::new(key.as_slice().try_into().unwrap());
        let iv: [u8; 16] = icb.try_into().unwrap();
        let mut c = ctr_with(&aes, &iv);
        let mut buf = pt.clone();
        c.apply_keystream(&mut buf);
        assert_eq!(hex::encode(&buf), ct);
    }

    proptest! {
        #[test]
        fn round_trip_any_length(key in any::<[u8; 32]>(), nonce in any::<[u8; 12]>(),
                                 data in proptest::collection::vec(any::<u8>(), 0..9000)) {
            let aes = Aes256Enc::new((&key).into());
            let bc = BlockCipher::new(&aes);
            let mut buf = data.clone();
            bc.apply(&nonce, &mut buf);
            if data.len() >= 16 { prop_assert_ne!(&buf, &data); }
            bc.apply(&nonce, &mut buf);
            prop_assert_eq!(buf, data);
        }

        /// Two nonces under one key never give the same keystream.
        #[test]
        fn different_nonces_give_different_keystream(key in any::<[u8; 32]>(),
                                                   n1 in any::<[u8; 12]>(), n2 in any::<[u8; 12]>()) {
            prop_assume!(n1 != n2);
            let aes = Aes256Enc::new((&key).into());
            let bc = BlockCipher::new(&aes);
            let mut a = vec![0u8; 4096];
            let mut b = vec![0u8; 4096];
            bc.apply(&n1, &mut a);
            bc.apply(&n2, &mut b);
            prop_assert_ne!(a, b);
        }
    }
}
