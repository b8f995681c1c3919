//! The control protocol: one JSON object per line. The client sends one
//! [`Request`]; the server answers with zero or more
//! `{"progress": {...}}` lines and exactly one `{"ok": ...}` or
//! `{"error": "..."}` line. Pure types, no I/O.

use serde::{Deserialize, Serialize};

/// A request to the running sidecar, tagged by `"op"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Is the control plane up? Answers with the version and process id.
    Ping,
    /// What the sidecar serves: exports, key versions, encryption mode.
    Status,
    // ---- key rotation and retirement ----
    /// Key versions, blocks per version and export, sweep progress.
    KeysStatus,
    /// Make a new universe-key version active; the sweep re-encrypts.
    KeysRotate,
    /// Remove a key version no block or header uses any more.
    KeysRetire {
        /// The version to retire.
        version: u32,
    },
    /// Pause the re-encryption sweep (persisted).
    KeysSweepPause,
    /// Resume the re-encryption sweep.
    KeysSweepResume,
    /// Take a backup of an export at a cut taken now. Progress lines after
    /// the cut carry the message [`BACKUP_CUT_TAKEN`] (a freeze hook thaws
    /// on the first one).
    Backup {
        /// Export name.
        export: String,
        /// Destination: a directory (on the sidecar's file system) or
        /// `s3://bucket/prefix`.
        to: String,
        /// A full backup even when a parent exists.
        #[serde(default)]
        full: bool,
        /// Require a parent.
        #[serde(default)]
        incremental: bool,
        /// Export bytes read per second at most (no limit when absent).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rate: Option<u64>,
    },
    /// Encrypt a directory served with encryption off: registry on, every
    /// export switched, the sweep re-encrypts the plaintext blocks; answers
    /// when no plaintext is left.
    KeysEncrypt {
        /// The provider to wrap the universe key: what the sidecar opens.
        provider: EncryptProvider,
    },
    /// Re-wrap every universe-key version under a new AWS KMS CMK.
    KeysRewrap {
        /// ARN of the new CMK.
        kms_key_id: String,
        /// Endpoint override for KMS (default: the sidecar's own).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kms_endpoint: Option<String>,
        /// Region override for the new CMK (default: from its ARN).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kms_region: Option<String>,
    },
}

/// Progress message of a backup once its cut is taken.
pub const BACKUP_CUT_TAKEN: &str = "cut taken; copying";

impl Request {
    /// The `op` name, for logs.
    pub fn op_name(&self) -> &'static str {
        match self {
            Request::Ping => "ping",
            Request::Status => "status",
            Request::KeysStatus => "keys-status",
            Request::KeysRotate => "keys-rotate",
            Request::KeysRetire { .. } => "keys-retire",
            Request::KeysSweepPause => "keys-sweep-pause",
            Request::KeysSweepResume => "keys-sweep-resume",
            Request::Backup { .. } => "backup",
            Request::KeysRewrap { .. } => "keys-rewrap",
            Request::KeysEncrypt { .. } => "keys-encrypt",
        }
    }
}

/// Progress of a long request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressUpdate {
    /// Work done so far.
    pub done: u64,
    /// Work in all (0 when unknown).
    pub total: u64,
    /// What `done` counts: `blocks`, `bytes`, ...
    pub unit: String,
    /// A short phrase: what is happening now.
    pub message: String,
}

/// One line from the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reply {
    /// Long work advanced.
    Progress(ProgressUpdate),
    /// The request succeeded; its result.
    Ok(serde_json::Value),
    /// The request was refused or failed: one line naming the problem and
    /// the fix.
    Error(String),
}

/// The key provider a `keys encrypt` request names.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kms", rename_all = "lowercase")]
pub enum EncryptProvider {
    /// A local KEK file (created 0600 when missing).
    Local {
        /// Absolute path of the KEK file.
        kek_file: String,
        /// Accept a KEK inside the data directory (insecure, trials).
        #[serde(default)]
        insecure_kek_in_data_dir: bool,
    },
    /// An AWS KMS CMK.
    Aws {
        /// Its ARN.
        kms_key_id: String,
        /// Endpoint override.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kms_endpoint: Option<String>,
        /// Region override.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kms_region: Option<String>,
    },
}
