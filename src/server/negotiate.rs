//! Option negotiation (fixed newstyle) as a state machine without I/O, as
//! nbdkit keeps negotiation apart from transmission: the connection reads
//! one option, hands it to [`Negotiation::on_option`] and does what the
//! returned [`Step`] says (send the reply bytes, then read the next option,
//! close, or enter transmission). What the server offers (the exports) comes
//! through the [`Catalog`] trait, so the rules are unit-tested here without
//! a store or a socket.

use bytes::BytesMut;

use super::handler::ReplyMode;
use crate::protocol::{self, consts::*, ClientFlags, ClientOption, MetaContextRequest};

/// What negotiation needs to know about one export.
pub trait ExportView: Clone {
    /// Its name.
    fn name(&self) -> &str;
    /// Its size in bytes.
    fn size(&self) -> u64;
    /// Whether its blocks are encrypted (for `NBD_INFO_DESCRIPTION`).
    fn encrypted(&self) -> bool;
}

/// The exports a client may choose from.
pub trait Catalog {
    /// A chosen export, handed to transmission.
    type Export: ExportView;
    /// The export called `name` as the client sent it (empty: the default).
    fn resolve(&self, name: &str) -> Option<Self::Export>;
    /// Every export, for `NBD_OPT_LIST`.
    fn all(&self) -> Vec<Self::Export>;
}

/// What the connection does after one option.
#[derive(Debug)]
pub enum Step<E> {
    /// Send `reply`, then read the next option.
    Continue(BytesMut),
    /// The client aborted: send `reply` (ignoring errors: the client may be
    /// gone) and close.
    Abort(BytesMut),
    /// Send `reply`, then enter transmission on `export` in `mode`.
    Go {
        /// The last negotiation reply.
        reply: BytesMut,
        /// The chosen export.
        export: E,
        /// Structured replies and the selected meta context.
        mode: ReplyMode,
    },
    /// `NBD_OPT_EXPORT_NAME` named an export we do not have: that option
    /// has no error reply, so close without one.
    UnknownExport(String),
}

/// The negotiation state of one connection.
pub struct Negotiation<C> {
    catalog: C,
    max_request: u32,
    client: ClientFlags,
    structured: bool,
    /// (export name, context id) chosen by SET_META_CONTEXT.
    meta: Option<(String, Option<u32>)>,
}

/// Transmission flags for an export; `NBD_FLAG_SEND_DF` needs structured replies.
pub fn transmission_flags(structured: bool) -> u16 {
    let mut f = NBD_FLAG_HAS_FLAGS
        | NBD_FLAG_SEND_FLUSH
        | NBD_FLAG_SEND_FUA
        | NBD_FLAG_SEND_TRIM
        | NBD_FLAG_SEND_WRITE_ZEROES
        | NBD_FLAG_SEND_FAST_ZERO
        | NBD_FLAG_SEND_CACHE
        // FLUSH fdatasyncs the backing file every connection shares, so it
        // covers writes completed on any connection: multi-conn is safe.
        | NBD_FLAG_CAN_MULTI_CONN;
    if structured {
        f |= NBD_FLAG_SEND_DF;
    }
    f
}

impl<C: Catalog> Negotiation<C> {
    /// A negotiation with a client that sent `client` flags; block sizes
    /// announce `max_request` as the maximum.
    pub fn new(catalog: C, max_request: u32, client: ClientFlags) -> Negotiation<C> {
        Negotiation {
            catalog,
            max_request,
            client,
            structured: false,
            meta: None,
        }
    }

    /// A malformed option payload: an error reply, and negotiation goes on.
    pub fn on_invalid(&self, option: u32, e: &protocol::OptionError) -> Step<C::Export> {
        let mut out = BytesMut::new();
        protocol::encode_rep_error(&mut out, option, e.reply_type(), &e.to_string());
        Step::Continue(out)
    }

    /// One parsed option.
    pub fn on_option(&mut self, option: ClientOption) -> Step<C::Export> {
        let mut out = BytesMut::with_capacity(256);
        match option {
            ClientOption::ExportName(name) => {
                let Some(export) = self.catalog.resolve(&name) else {
                    return Step::UnknownExport(name);
                };
                protocol::encode_export_name_reply(
                    &mut out,
                    export.size(),
                    transmission_flags(self.structured),
                    self.client.no_zeroes,
                );
                return self.go(out, export);
            }
            ClientOption::Abort => {
                protocol::encode_rep_ack(&mut out, NBD_OPT_ABORT);
                return Step::Abort(out);
            }
            ClientOption::List => {
                for e in self.catalog.all() {
                    protocol::encode_rep_server(&mut out, e.name());
                }
                protocol::encode_rep_ack(&mut out, NBD_OPT_LIST);
            }
            ClientOption::Info(req) => {
                self.info(&mut out, NBD_OPT_INFO, &req);
            }
            ClientOption::Go(req) => {
                if let Some(export) = self.info(&mut out, NBD_OPT_GO, &req) {
                    return self.go(out, export);
                }
            }
            ClientOption::StructuredReply => {
                let option = NBD_OPT_STRUCTURED_REPLY;
                if self.structured {
                    let msg = "structured replies already negotiated";
                    protocol::encode_rep_error(&mut out, option, NBD_REP_ERR_INVALID, msg);
                } else {
                    self.structured = true;
                    protocol::encode_rep_ack(&mut out, option);
                }
            }
            ClientOption::ListMetaContext(req) => self.meta_context(&mut out, false, &req),
            ClientOption::SetMetaContext(req) => self.meta_context(&mut out, true, &req),
            ClientOption::Unknown(opt) => protocol::encode_rep_error(
                &mut out,
                opt,
                NBD_REP_ERR_UNSUP,
                "option not supported by ear-sidecar",
            ),
        }
        Step::Continue(out)
    }

    /// INFO or GO: the export's information and an ACK, or an error.
    /// Returns the export when it exists.
    fn info(
        &self,
        out: &mut BytesMut,
        option: u32,
        req: &protocol::InfoRequest,
    ) -> Option<C::Export> {
        let Some(export) = self.catalog.resolve(&req.name) else {
            let msg = format!("no export named {:?}", req.name);
            protocol::encode_rep_error(out, option, NBD_REP_ERR_UNKNOWN, &msg);
            return None;
        };
        let flags = transmission_flags(self.structured);
        protocol::encode_info_export(out, option, export.size(), flags);
        protocol::encode_info_block_size(out, option, 1, 4096, self.max_request);
        if req.info_types.contains(&NBD_INFO_NAME) {
            protocol::encode_info_name(out, option, export.name());
        }
        if req.info_types.contains(&NBD_INFO_DESCRIPTION) {
            let d = if export.encrypted() {
                "ear-sidecar export (AES-256-CTR at rest)"
            } else {
                "ear-sidecar export (unencrypted)"
            };
            protocol::encode_info_description(out, option, d);
        }
        protocol::encode_rep_ack(out, option);
        Some(export)
    }

    /// LIST_META_CONTEXT (`set == false`) or SET_META_CONTEXT: only
    /// `base:allocation` exists.
    fn meta_context(&mut self, out: &mut BytesMut, set: bool, req: &MetaContextRequest) {
        let option = if set {
            NBD_OPT_SET_META_CONTEXT
        } else {
            NBD_OPT_LIST_META_CONTEXT
        };
        if !self.structured {
            let msg = "negotiate structured replies first";
            protocol::encode_rep_error(out, option, NBD_REP_ERR_INVALID, msg);
            return;
        }
        let Some(export) = self.catalog.resolve(&req.export) else {
            let msg = format!("no export named {:?}", req.export);
            protocol::encode_rep_error(out, option, NBD_REP_ERR_UNKNOWN, &msg);
            return;
        };
        let wanted = |q: &str| q == BASE_ALLOCATION || (!set && (q == "base:" || q.is_empty()));
        let hit = if set {
            req.queries.iter().any(|q| q == BASE_ALLOCATION)
        } else {
            req.queries.is_empty() || req.queries.iter().any(|q| wanted(q))
        };
        if hit {
            let id = if set { 1 } else { 0 };
            protocol::encode_rep_meta_context(out, option, id, BASE_ALLOCATION);
        }
        if set {
            self.meta = Some((export.name().to_string(), hit.then_some(1)));
        }
        protocol::encode_rep_ack(out, option);
    }

    /// Enters transmission on `export`, with `base:allocation` selected if
    /// SET_META_CONTEXT chose it for this same export.
    fn go(&self, reply: BytesMut, export: C::Export) -> Step<C::Export> {
        let base_allocation = match &self.meta {
            Some((name, id)) if self.structured && name == export.name() => *id,
            _ => None,
        };
        Step::Go {
            reply,
            export,
            mode: ReplyMode {
                structured: self.structured,
                base_allocation,
            },
        }
    }
}

#[cfg(test)]
mod tests;
