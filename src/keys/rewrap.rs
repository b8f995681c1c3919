//! Rewrap: moves every universe-key version of a data directory under a new
//! master key (another AWS KMS CMK, or from the local KEK to a CMK). Data
//! blocks are untouched: the universe keys stay the same, only their wrapping
//! and the registry's provider and master key id change.
//!
//! Per version, in ascending order:
//!
//! * AWS → AWS in one region: KMS `ReEncrypt` from the old CMK to the new
//!   one, with the same encryption context as source and destination; the
//!   key never leaves KMS.
//! * anything else (the local KEK, or a CMK in another region): unwrap with
//!   the old provider, KMS `Encrypt` of the 32-byte key under the new CMK with
//!   the version's context; the plaintext is a [`SecretKey`] and zeroizes when
//!   dropped (the copy the SDK serialises into the request is freed, not wiped).
//!
//! Before anything is written every new blob is unwrapped with the new
//! provider and compared with the keys in use ([`KeyRing::contains_keys_of`]),
//! so a registry that the new key cannot open is never written. The registry
//! is then resealed with the same keys and replaced atomically
//! ([`Registry::save`]): a crash leaves the old registry (old CMK) or the new
//! one (new CMK), never neither.

use std::collections::BTreeMap;

use super::aws::{parse_key_arn, AwsKmsProvider};
use super::registry::{with_version, Registry};
use super::{KeyError, KeyProvider, WrappedKey};
use crate::crypto::{KeyRing, SecretKey};

/// How the blobs were moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RewrapMethod {
    /// KMS ReEncrypt (CMK to CMK).
    ReEncrypt,
    /// Unwrap with the old provider, then KMS Encrypt under the new CMK.
    DecryptEncrypt,
}

/// What a rewrap did (no secrets).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RewrapOutcome {
    /// Key versions rewrapped, ascending.
    pub versions: Vec<u32>,
    /// How.
    pub method: RewrapMethod,
    /// Provider kind before.
    pub from_provider: String,
    /// Master key id before.
    pub from_master_key_id: String,
    /// Provider kind after.
    pub to_provider: String,
    /// Master key id after.
    pub to_master_key_id: String,
}

/// ReEncrypt when both keys are AWS KMS CMKs in one region (one KMS call
/// per version, the key never leaves KMS); otherwise (from the local KEK,
/// or across regions, where one regional endpoint cannot reach both keys)
/// unwrap with the old provider and Encrypt under the new CMK.
fn choose_method(from_kind: &str, from_id: &str, to: &AwsKmsProvider) -> RewrapMethod {
    match parse_key_arn(from_id) {
        Ok(arn) if from_kind == to.kind() && arn.region == to.key_arn().region => {
            RewrapMethod::ReEncrypt
        }
        _ => RewrapMethod::DecryptEncrypt,
    }
}

/// Rewraps every version of `registry` from `from` (its current provider) to
/// the CMK of `to`, checks the result against `ring` (the directory's
/// unwrapped keys, all versions), then seals and saves the registry.
/// `progress(done, total)` is called after each version. The caller holds the
/// directory lock (offline) or serialises registry writers (online), and has
/// validated `to`'s CMK.
pub async fn rewrap(
    registry: &mut Registry,
    from: &dyn KeyProvider,
    to: &AwsKmsProvider,
    ring: &KeyRing,
    mut progress: impl FnMut(u64, u64),
) -> Result<RewrapOutcome, KeyError> {
    registry.check_compatible(true, Some(from))?;
    let from_id = from.master_key_id();
    let to_id = to.master_key_id();
    if from.kind() == to.kind() && from_id == to_id {
        return Err(KeyError::Config(format!(
            "the keys of {} are already wrapped by {to_id}; nothing to rewrap",
            registry.path().display()
        )));
    }
    let method = choose_method(from.kind(), &from_id, to);
    let total = registry.key_versions().len() as u64;
    let mut blobs: BTreeMap<u32, WrappedKey> = BTreeMap::new();
    let mut fresh: BTreeMap<u32, SecretKey> = BTreeMap::new();
    for (i, v) in registry.key_versions().iter().enumerate() {
        let at = |e: KeyError| with_version(e, v.version);
        let blob = match method {
            RewrapMethod::ReEncrypt => to
                .re_encrypt_from(&from_id, &v.wrapped, &v.context)
                .await
                .map_err(at)?,
            RewrapMethod::DecryptEncrypt => {
                let key = from.unwrap(&v.wrapped, &v.context).await.map_err(at)?;
                to.wrap_key(&key, &v.context).await.map_err(at)?
            }
        };
        // The new CMK must give back the key in use before anything is saved.
        let back = to.unwrap(&blob, &v.context).await.map_err(at)?;
        fresh.insert(v.version, back);
        blobs.insert(v.version, blob);
        progress(i as u64 + 1, total);
    }
    let active = registry.active_version().unwrap_or(0);
    let check = KeyRing::new(fresh, active, 1)?;
    if !ring.contains_keys_of(&check) {
        return Err(KeyError::WrongKey(format!(
            "the blobs rewrapped under {to_id} do not unwrap to the keys in use; \
             {} was left unchanged",
            registry.path().display()
        )));
    }
    let from_provider = from.kind().to_string();
    // The caller's registry changes only once the new one is on disk.
    let mut next = registry.clone();
    next.set_wrapping(to.kind(), to_id.clone(), blobs)?;
    next.save(Some(ring))?;
    *registry = next;
    Ok(RewrapOutcome {
        versions: registry.versions().iter().map(|v| v.version).collect(),
        method,
        from_provider,
        from_master_key_id: from_id,
        to_provider: to.kind().to_string(),
        to_master_key_id: to_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::aws::AwsKmsOptions;

    const EAST: &str =
        "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";
    const EAST2: &str =
        "arn:aws:kms:us-east-1:111122223333:key/0000abcd-12ab-34cd-56ef-1234567890ab";
    const WEST: &str =
        "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";

    #[tokio::test(flavor = "current_thread")]
    async fn reencrypt_only_within_one_region() {
        // Building a provider does no network I/O.
        let mut o = AwsKmsOptions::new(EAST2);
        o.endpoint = Some("http://127.0.0.1:9".into());
        let to = AwsKmsProvider::new(&o).await.unwrap();
        assert_eq!(choose_method("aws", EAST, &to), RewrapMethod::ReEncrypt);
        assert_eq!(
            choose_method("aws", WEST, &to),
            RewrapMethod::DecryptEncrypt
        );
        assert_eq!(
            choose_method("local", "local:0011223344556677", &to),
            RewrapMethod::DecryptEncrypt
        );
    }
}
