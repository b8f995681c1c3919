//! Per-operation KMS call counters (ok, unavailable, refused, latency),
//! read by the metrics exporter at scrape time.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::*;

/// The KMS operations this provider calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KmsOp {
    /// `GenerateDataKeyWithoutPlaintext` (create a universe key).
    GenerateDataKeyWithoutPlaintext,
    /// `Decrypt` (unwrap a universe key).
    Decrypt,
    /// `DescribeKey` (validation and revocation check).
    DescribeKey,
    /// `Encrypt` (validation only).
    Encrypt,
    /// `ListAliases` (validation only).
    ListAliases,
    /// `ReEncrypt` (rewrap under another CMK).
    ReEncrypt,
}

impl KmsOp {
    /// Every operation, in a stable order.
    pub const ALL: [KmsOp; 6] = [
        KmsOp::GenerateDataKeyWithoutPlaintext,
        KmsOp::Decrypt,
        KmsOp::DescribeKey,
        KmsOp::Encrypt,
        KmsOp::ListAliases,
        KmsOp::ReEncrypt,
    ];

    /// The API name (also a good metric label).
    pub fn name(self) -> &'static str {
        match self {
            KmsOp::GenerateDataKeyWithoutPlaintext => "GenerateDataKeyWithoutPlaintext",
            KmsOp::Decrypt => "Decrypt",
            KmsOp::DescribeKey => "DescribeKey",
            KmsOp::Encrypt => "Encrypt",
            KmsOp::ListAliases => "ListAliases",
            KmsOp::ReEncrypt => "ReEncrypt",
        }
    }

    /// The IAM permission the operation needs.
    pub fn permission(self) -> &'static str {
        match self {
            KmsOp::GenerateDataKeyWithoutPlaintext => "kms:GenerateDataKeyWithoutPlaintext",
            KmsOp::Decrypt => "kms:Decrypt",
            KmsOp::DescribeKey => "kms:DescribeKey",
            KmsOp::Encrypt => "kms:Encrypt",
            KmsOp::ListAliases => "kms:ListAliases",
            KmsOp::ReEncrypt => "kms:ReEncryptFrom/kms:ReEncryptTo",
        }
    }

    fn index(self) -> usize {
        match self {
            KmsOp::GenerateDataKeyWithoutPlaintext => 0,
            KmsOp::Decrypt => 1,
            KmsOp::DescribeKey => 2,
            KmsOp::Encrypt => 3,
            KmsOp::ListAliases => 4,
            KmsOp::ReEncrypt => 5,
        }
    }
}

impl fmt::Display for KmsOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Counters of one KMS operation.
#[derive(Debug, Default)]
pub struct KmsOpCounters {
    /// Calls that succeeded.
    pub ok: AtomicU64,
    /// Calls that failed transiently (network, timeout, throttling, KMS internal).
    pub unavailable: AtomicU64,
    /// Calls KMS refused (permissions, key state, not found, bad ciphertext, …).
    pub refused: AtomicU64,
    /// Sum of call latencies (including SDK retries), in microseconds.
    pub latency_micros_sum: AtomicU64,
}

/// Per-operation KMS call counters, shared with the metrics layer.
#[derive(Debug, Default)]
pub struct KmsCallStats {
    ops: [KmsOpCounters; 6],
}

impl KmsCallStats {
    /// Counters of `op`.
    pub fn op(&self, op: KmsOp) -> &KmsOpCounters {
        // `index()` is always < 6 by construction.
        &self.ops[op.index()]
    }

    pub(crate) fn record(&self, op: KmsOp, kind: Option<FailureKind>, elapsed: Duration) {
        let c = self.op(op);
        let counter = match kind {
            None => &c.ok,
            Some(FailureKind::Unavailable) => &c.unavailable,
            Some(_) => &c.refused,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        c.latency_micros_sum.fetch_add(micros, Ordering::Relaxed);
    }
}
