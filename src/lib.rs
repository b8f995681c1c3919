//! ear-sidecar: an NBD server on a Unix socket that gives any block consumer
//! encryption at rest under a customer-managed key.
//!
//! Module map (dependencies point downwards only; see ARCHITECTURE.md):
//!
//! * [`app`]      – `App::start` / `App::run`: wires the layers together.
//! * [`admin`]    – `/metrics`, `/livez`, `/readyz` on hyper; the recorder.
//! * [`backup`]   – encrypted incremental backups (ciphertext and wrapped keys
//!   only) to a directory or S3: format, chains, restore, verify.
//! * [`config`]   – command line / environment / TOML configuration, loaded and
//!   validated fully before anything binds.
//! * [`control`]  – the admin control socket (0600, uid allowlist): a JSON
//!   line protocol that CLI subcommands use to steer a running sidecar.
//! * [`server`]   – Unix listener, per-connection state machine, request
//!   handlers and their metrics (`server::observe`).
//! * [`health`]   – the readiness latch and rule.
//! * [`protocol`] – NBD wire codec. Pure functions over bytes, no I/O.
//! * [`keys`]     – key providers (local KEK file, AWS KMS) and the on-disk key
//!   registry that holds only wrapped universe keys.
//! * [`store`]    – the export model, the encrypted backing-file format and
//!   positional I/O on it.
//! * [`crypto`]   – key types, HKDF derivation, AES-256-CTR block cipher,
//!   the in-memory key ring. No I/O.
//! * [`fsutil`]   – atomic file replacement and directory fsync.

pub mod admin;
pub mod app;
pub mod backup;
pub mod config;
pub mod control;
pub mod crypto;
pub mod fsutil;
pub mod health;
pub mod keys;
pub mod protocol;
pub mod server;
pub mod store;
