//! An HTTP proxy in front of moto that can refuse `kms:Decrypt`.
//!
//! moto enforces key policies only for DescribeKey, so a withdrawn
//! `kms:Decrypt` permission cannot be set up there. This proxy forwards every
//! request to moto unchanged, except that while [`DenyProxy::deny_decrypt`]
//! is on it answers `TrentService.Decrypt` itself with the error AWS KMS
//! returns for a missing permission (HTTP 400, `AccessDeniedException`). The
//! sidecar's real SDK client and error classification see exactly that
//! answer; everything else (DescribeKey saying Enabled) is moto's.
//!
//! One thread per client connection, requests handled in order on it; each
//! forwarded request uses a fresh upstream connection. Bodies are framed by
//! `Content-Length` (the SDK and moto both send it).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// The body AWS KMS sends when the caller lacks `kms:Decrypt`.
const DENIED: &str = r#"{"__type":"AccessDeniedException","message":"User: arn:aws:sts::123456789012:assumed-role/ear/test is not authorized to perform: kms:Decrypt on this resource because no identity-based policy allows the kms:Decrypt action"}"#;

/// A running proxy; the listener thread ends with the test process.
pub struct DenyProxy {
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    deny: Arc<AtomicBool>,
    denied: Arc<AtomicU64>,
}

impl DenyProxy {
    /// Starts a proxy to `upstream_port` on 127.0.0.1.
    pub fn start(upstream_port: u16) -> DenyProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let deny = Arc::new(AtomicBool::new(false));
        let denied = Arc::new(AtomicU64::new(0));
        let (d, n) = (deny.clone(), denied.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (d, n) = (d.clone(), n.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, upstream_port, &d, &n);
                });
            }
        });
        DenyProxy {
            endpoint: format!("http://127.0.0.1:{port}"),
            deny,
            denied,
        }
    }

    /// Refuse (`true`) or forward (`false`) Decrypt from now on.
    pub fn deny_decrypt(&self, on: bool) {
        self.deny.store(on, Ordering::SeqCst);
    }

    /// Decrypt requests refused so far.
    pub fn denied(&self) -> u64 {
        self.denied.load(Ordering::SeqCst)
    }
}

/// One HTTP message: the head (start line and headers, with the blank line)
/// and the body.
fn read_message(r: &mut BufReader<TcpStream>) -> std::io::Result<Option<(String, Vec<u8>)>> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        let end = line == "\r\n";
        head.push_str(&line);
        if end {
            break;
        }
    }
    let len = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(Some((head, body)))
}

fn serve(
    client: TcpStream,
    upstream_port: u16,
    deny: &AtomicBool,
    denied: &AtomicU64,
) -> std::io::Result<()> {
    let mut out = client.try_clone()?;
    let mut r = BufReader::new(client);
    while let Some((head, body)) = read_message(&mut r)? {
        let is_decrypt = head
            .to_ascii_lowercase()
            .contains("x-amz-target: trentservice.decrypt");
        if is_decrypt && deny.load(Ordering::SeqCst) {
            denied.fetch_add(1, Ordering::SeqCst);
            write!(
                out,
                "HTTP/1.1 400 Bad Request\r\nContent-Type: application/x-amz-json-1.1\r\n\
                 x-amzn-RequestId: 00000000-0000-0000-0000-000000000000\r\n\
                 Content-Length: {}\r\n\r\n{DENIED}",
                DENIED.len()
            )?;
            out.flush()?;
            continue;
        }
        let mut up = TcpStream::connect(("127.0.0.1", upstream_port))?;
        up.write_all(head.as_bytes())?;
        up.write_all(&body)?;
        up.flush()?;
        let mut ur = BufReader::new(up);
        let (rhead, rbody) = read_message(&mut ur)?
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "moto closed"))?;
        out.write_all(rhead.as_bytes())?;
        out.write_all(&rbody)?;
        out.flush()?;
    }
    Ok(())
}
