//! ear-sidecar: an NBD server on a Unix socket that gives any block consumer
//! encryption at rest under a customer-managed key.
//!
//! Module map (dependencies point downwards only):
//!
//! * [`protocol`] – NBD wire codec. Pure functions over bytes, no I/O.
//! * [`crypto`]   – key types, HKDF derivation, AES-256-CTR block cipher,
//!   the in-memory key ring. No I/O.
//! * [`store`]    – the encrypted backing-file format and positional I/O on it.
//! * [`keys`]     – key providers (local KEK file, AWS KMS) and the on-disk key
//!   registry that holds only wrapped universe keys.
//! * [`server`]   – Unix listener, per-connection state machine, request handlers.
//! * [`backup`]   – encrypted incremental backups (ciphertext and wrapped keys
//!   only) to a directory or S3: format, chains, restore, verify.
//! * [`config`]   – command line / environment / TOML configuration, loaded and
//!   validated fully before anything binds.
//! * [`metrics`]  – Prometheus `/metrics`, `/livez`, `/readyz` on one small
//!   HTTP listener; reads the others' counters at scrape time and records
//!   per-request series through pre-registered handles (`server::observe`).
#![forbid(unsafe_code)]

pub mod backup;
pub mod config;
pub mod crypto;
pub mod keys;
pub mod metrics;
pub mod protocol;
pub mod server;
pub mod store;
