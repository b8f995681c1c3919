//! The one blocking NBD client of the tests, built on the crate's client
//! codec (`ear_sidecar::protocol`): fixed-newstyle handshake (`NBD_OPT_GO`,
//! or `NBD_OPT_EXPORT_NAME` where a test needs the old way in), then simple
//! replies. Raw [`Client::send`] / [`Client::recv`] give byte-exact control
//! (distinctive payloads, invalid or pipelined requests) that the
//! command-line clients cannot express. Socket reads time out after 60 s.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use bytes::BytesMut;
use ear_sidecar::protocol::{self, consts::*, OptionReplyHeader, RawRequest, SimpleReplyHeader};

/// How long any socket read or write may block.
const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// A blocking NBD client in transmission phase.
pub struct Client {
    /// The socket (to send raw bytes or shut one direction down).
    pub s: UnixStream,
    /// Export size announced by the server.
    pub size: u64,
    /// Transmission flags announced by the server (`NBD_OPT_EXPORT_NAME` only).
    pub flags: u16,
    next_cookie: u64,
}

fn proto(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// The client's side of a fixed-newstyle handshake that asks for `export`
/// with `NBD_OPT_GO` (client flags with no zeroes, then the option).
pub fn go_request(export: &str) -> Vec<u8> {
    let mut b = BytesMut::new();
    protocol::encode_go_opening(&mut b, export, true);
    b.to_vec()
}

impl Client {
    /// Connects, reads the greeting and returns the client with the server's
    /// handshake flags.
    fn open(socket: &Path) -> io::Result<(Client, u16)> {
        let s = UnixStream::connect(socket)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        let mut c = Client {
            s,
            size: 0,
            flags: 0,
            next_cookie: 1,
        };
        let mut g = [0u8; GREETING_LEN];
        c.s.read_exact(&mut g)?;
        let hflags = protocol::parse_greeting(&g).map_err(proto)?;
        Ok((c, hflags))
    }

    /// Connects and negotiates `export` with `NBD_OPT_GO`.
    pub fn connect(socket: &Path, export: &str) -> io::Result<Client> {
        let (mut c, _) = Client::open(socket)?;
        c.s.write_all(&go_request(export))?;
        loop {
            let (h, data) = c.read_option_reply()?;
            if h.is_error() {
                return Err(proto(format!("GO refused: {:#x}", h.reply_type)));
            }
            match h.reply_type {
                NBD_REP_ACK => break,
                NBD_REP_INFO => {
                    if let Ok(protocol::InfoReply::Export { size, flags }) =
                        protocol::parse_rep_info(&data)
                    {
                        c.size = size;
                        c.flags = flags;
                    }
                }
                _ => {}
            }
        }
        Ok(c)
    }

    /// Connects and enters transmission on `export` with
    /// `NBD_OPT_EXPORT_NAME` (the server closes the connection on an
    /// unknown export instead of replying).
    pub fn connect_export_name(socket: &Path, export: &str) -> io::Result<Client> {
        let (mut c, hflags) = Client::open(socket)?;
        let no_zeroes = hflags & NBD_FLAG_NO_ZEROES != 0;
        let mut b = BytesMut::new();
        let mut cflags = NBD_FLAG_C_FIXED_NEWSTYLE;
        if no_zeroes {
            cflags |= NBD_FLAG_C_NO_ZEROES;
        }
        protocol::encode_client_flags(&mut b, cflags);
        protocol::encode_option(&mut b, NBD_OPT_EXPORT_NAME, export.as_bytes());
        c.s.write_all(&b)?;
        let mut reply = [0u8; 10];
        c.s.read_exact(&mut reply)?;
        (c.size, c.flags) = protocol::parse_export_name_reply(&reply);
        if !no_zeroes {
            let mut z = [0u8; EXPORT_NAME_ZEROES];
            c.s.read_exact(&mut z)?;
        }
        Ok(c)
    }

    /// Reads one option reply (header and data).
    pub fn read_option_reply(&mut self) -> io::Result<(OptionReplyHeader, Vec<u8>)> {
        let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
        self.s.read_exact(&mut h)?;
        let h = protocol::parse_option_reply_header(&h).map_err(proto)?;
        let mut data = vec![0u8; h.length as usize];
        self.s.read_exact(&mut data)?;
        Ok((h, data))
    }

    /// A fresh cookie.
    pub fn cookie(&mut self) -> u64 {
        self.next_cookie += 1;
        self.next_cookie
    }

    /// Sends a raw request header and `payload` right after it (of any
    /// length: tests send inconsistent ones on purpose).
    pub fn send(
        &mut self,
        command: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> io::Result<()> {
        let mut b = BytesMut::with_capacity(REQUEST_HEADER_LEN + payload.len());
        protocol::encode_request(
            &mut b,
            &RawRequest {
                flags,
                command,
                cookie,
                offset,
                length,
            },
        );
        b.extend_from_slice(payload);
        self.s.write_all(&b)
    }

    /// Reads one simple reply header.
    pub fn recv(&mut self) -> io::Result<SimpleReplyHeader> {
        let mut h = [0u8; SIMPLE_REPLY_HEADER_LEN];
        self.s.read_exact(&mut h)?;
        protocol::parse_simple_reply_header(&h).map_err(proto)
    }

    /// Reads `n` bytes (READ reply payload).
    pub fn recv_data(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut v = vec![0u8; n];
        self.s.read_exact(&mut v)?;
        Ok(v)
    }

    /// READ: `Ok(Ok(data))`, `Ok(Err(errno))`, or a socket error.
    pub fn read(&mut self, offset: u64, len: u32) -> io::Result<Result<Vec<u8>, u32>> {
        let ck = self.cookie();
        self.send(NBD_CMD_READ, 0, ck, offset, len, &[])?;
        let h = self.recv()?;
        if h.cookie != ck {
            return Err(proto("cookie mismatch"));
        }
        if h.error != 0 {
            return Ok(Err(h.error));
        }
        Ok(Ok(self.recv_data(len as usize)?))
    }

    /// WRITE (with FUA when `fua`).
    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> io::Result<Result<(), u32>> {
        let ck = self.cookie();
        let len = u32::try_from(data.len()).map_err(proto)?;
        let flags = if fua { NBD_CMD_FLAG_FUA } else { 0 };
        self.send(NBD_CMD_WRITE, flags, ck, offset, len, data)?;
        self.expect_reply(ck)
    }

    /// FLUSH.
    pub fn flush(&mut self) -> io::Result<Result<(), u32>> {
        let ck = self.cookie();
        self.send(NBD_CMD_FLUSH, 0, ck, 0, 0, &[])?;
        self.expect_reply(ck)
    }

    fn expect_reply(&mut self, ck: u64) -> io::Result<Result<(), u32>> {
        let h = self.recv()?;
        if h.cookie != ck {
            return Err(proto("cookie mismatch"));
        }
        Ok(if h.error == 0 { Ok(()) } else { Err(h.error) })
    }

    /// Sends `NBD_CMD_DISC` and closes.
    pub fn disconnect(mut self) {
        let _ = self.send(NBD_CMD_DISC, 0, 0, 0, 0, &[]);
    }

    /// True once the server has closed the connection (EOF or reset) within
    /// the read timeout; false if it sent data instead.
    pub fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ),
        }
    }
}
