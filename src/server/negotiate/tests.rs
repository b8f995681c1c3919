use super::*;
use crate::protocol::{InfoReply, InfoRequest};

#[derive(Debug, Clone, PartialEq)]
struct Fake {
    name: &'static str,
    size: u64,
}

impl ExportView for Fake {
    fn name(&self) -> &str {
        self.name
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn encrypted(&self) -> bool {
        true
    }
}

/// Two exports; the empty name selects the first.
struct Two;

impl Catalog for Two {
    type Export = Fake;
    fn resolve(&self, name: &str) -> Option<Fake> {
        self.all()
            .into_iter()
            .find(|e| name.is_empty() && e.name == "default" || e.name == name)
    }
    fn all(&self) -> Vec<Fake> {
        vec![
            Fake {
                name: "default",
                size: 1 << 20,
            },
            Fake {
                name: "b",
                size: 4096,
            },
        ]
    }
}

fn neg() -> Negotiation<Two> {
    Negotiation::new(Two, 32 << 20, ClientFlags { no_zeroes: true })
}

/// (option, reply type, data) of every option reply in `buf`.
fn replies(buf: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
    let mut out = Vec::new();
    let mut rest = buf;
    while !rest.is_empty() {
        let h: &[u8; OPTION_REPLY_HEADER_LEN] = rest[..OPTION_REPLY_HEADER_LEN].try_into().unwrap();
        let h = protocol::parse_option_reply_header(h).unwrap();
        let end = OPTION_REPLY_HEADER_LEN + h.length as usize;
        out.push((
            h.option,
            h.reply_type,
            rest[OPTION_REPLY_HEADER_LEN..end].to_vec(),
        ));
        rest = &rest[end..];
    }
    out
}

fn reply_types(step: &Step<Fake>) -> Vec<u32> {
    match step {
        Step::Continue(b) | Step::Abort(b) | Step::Go { reply: b, .. } => {
            replies(b).into_iter().map(|r| r.1).collect()
        }
        Step::UnknownExport(_) => vec![],
    }
}

fn info(name: &str) -> InfoRequest {
    InfoRequest {
        name: name.into(),
        info_types: vec![],
    }
}

fn meta(export: &str, queries: &[&str]) -> MetaContextRequest {
    MetaContextRequest {
        export: export.into(),
        queries: queries.iter().map(|q| q.to_string()).collect(),
    }
}

#[test]
fn list_names_every_export_then_acks() {
    let step = neg().on_option(ClientOption::List);
    let Step::Continue(b) = step else {
        panic!("{step:?}")
    };
    let r = replies(&b);
    assert_eq!(r.len(), 3);
    assert!(r[..2].iter().all(|x| x.1 == NBD_REP_SERVER));
    assert_eq!(r[2].1, NBD_REP_ACK);
}

#[test]
fn go_on_the_default_export_enters_transmission() {
    let step = neg().on_option(ClientOption::Go(info("")));
    let Step::Go {
        reply,
        export,
        mode,
    } = step
    else {
        panic!("{step:?}")
    };
    assert_eq!(export.name, "default");
    assert!(!mode.structured && mode.base_allocation.is_none());
    let r = replies(&reply);
    assert_eq!(r.last().unwrap().1, NBD_REP_ACK);
    let sizes: Vec<_> = r
        .iter()
        .filter(|x| x.1 == NBD_REP_INFO)
        .filter_map(|x| match protocol::parse_rep_info(&x.2) {
            Ok(InfoReply::Export { size, flags }) => Some((size, flags)),
            _ => None,
        })
        .collect();
    assert_eq!(sizes, vec![(1 << 20, transmission_flags(false))]);
}

#[test]
fn info_and_go_on_an_unknown_export_are_errors_and_negotiation_goes_on() {
    let mut n = neg();
    for opt in [
        ClientOption::Info(info("nope")),
        ClientOption::Go(info("nope")),
    ] {
        let step = n.on_option(opt);
        assert!(matches!(step, Step::Continue(_)), "{step:?}");
        assert_eq!(reply_types(&step), vec![NBD_REP_ERR_UNKNOWN]);
    }
    // INFO on a known export answers without leaving negotiation.
    let step = n.on_option(ClientOption::Info(info("b")));
    assert!(matches!(step, Step::Continue(_)), "{step:?}");
    assert_eq!(reply_types(&step).last(), Some(&NBD_REP_ACK));
}

#[test]
fn export_name_unknown_closes_known_enters_transmission() {
    let step = neg().on_option(ClientOption::ExportName("nope".into()));
    assert!(matches!(step, Step::UnknownExport(ref n) if n == "nope"));
    let step = neg().on_option(ClientOption::ExportName("b".into()));
    let Step::Go { reply, export, .. } = step else {
        panic!("{step:?}")
    };
    assert_eq!(export.name, "b");
    // Size and flags only: the client asked for no zeroes.
    assert_eq!(reply.len(), 10);
    let raw: [u8; 10] = reply[..].try_into().unwrap();
    assert_eq!(
        protocol::parse_export_name_reply(&raw),
        (4096, transmission_flags(false))
    );
}

#[test]
fn abort_acks_and_unknown_options_are_unsupported() {
    let step = neg().on_option(ClientOption::Abort);
    assert!(matches!(step, Step::Abort(_)));
    assert_eq!(reply_types(&step), vec![NBD_REP_ACK]);
    let step = neg().on_option(ClientOption::Unknown(NBD_OPT_STARTTLS));
    assert!(matches!(step, Step::Continue(_)));
    assert_eq!(reply_types(&step), vec![NBD_REP_ERR_UNSUP]);
}

#[test]
fn structured_replies_once_then_meta_context_selects_base_allocation() {
    let mut n = neg();
    // Meta contexts need structured replies first.
    let step = n.on_option(ClientOption::SetMetaContext(meta("", &[BASE_ALLOCATION])));
    assert_eq!(reply_types(&step), vec![NBD_REP_ERR_INVALID]);
    let step = n.on_option(ClientOption::StructuredReply);
    assert_eq!(reply_types(&step), vec![NBD_REP_ACK]);
    let step = n.on_option(ClientOption::StructuredReply);
    assert_eq!(reply_types(&step), vec![NBD_REP_ERR_INVALID]);
    let step = n.on_option(ClientOption::ListMetaContext(meta("", &[])));
    assert_eq!(reply_types(&step), vec![NBD_REP_META_CONTEXT, NBD_REP_ACK]);
    let step = n.on_option(ClientOption::SetMetaContext(meta(
        "default",
        &[BASE_ALLOCATION],
    )));
    assert_eq!(reply_types(&step), vec![NBD_REP_META_CONTEXT, NBD_REP_ACK]);
    // GO on the same export: structured, base:allocation is context 1.
    let step = n.on_option(ClientOption::Go(info("")));
    let Step::Go { mode, .. } = step else {
        panic!("{step:?}")
    };
    assert!(mode.structured);
    assert_eq!(mode.base_allocation, Some(1));
}

#[test]
fn meta_context_set_for_another_export_is_not_selected() {
    let mut n = neg();
    n.on_option(ClientOption::StructuredReply);
    n.on_option(ClientOption::SetMetaContext(meta("b", &[BASE_ALLOCATION])));
    let step = n.on_option(ClientOption::Go(info("default")));
    let Step::Go { mode, .. } = step else {
        panic!("{step:?}")
    };
    assert!(mode.structured);
    assert_eq!(mode.base_allocation, None);
}
