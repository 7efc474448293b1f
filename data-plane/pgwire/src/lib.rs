//! A pure codec for the PostgreSQL frontend/backend protocol, version 3.0
//! (<https://www.postgresql.org/docs/current/protocol-message-formats.html>).
//!
//! No I/O, no policy, no NATS: bytes in, typed messages out, and encoders for
//! the few messages Gatehouse writes itself. Framing ([`decode_startup`],
//! [`decode_frame`], [`complete_frames`]) is separate from parsing a frame's
//! body ([`FrontendMessage::parse`], [`BackendMessage::parse`]), so a proxy can
//! forward frames it does not need to understand untouched.
//!
//! "Not enough bytes yet" is `Ok(None)`; malformed input is a
//! [`ProtocolError`]. [`fuzz_input`] drives every decoder and is the body of
//! the fuzz target in `fuzz/`.
#![forbid(unsafe_code)]

mod backend;
mod encode;
mod frame;
mod frontend;

pub use backend::{BackendMessage, ErrorFields, TransactionStatus};
pub use encode::*;
pub use frame::{
    Frame, RESERVE_AHEAD, StartupPacket, complete_frames, decode_frame, decode_startup,
    pending_frame_len,
};
pub use frontend::{Bind, FrontendMessage, Parse, password_text};

/// Protocol version 3.0 in a StartupMessage.
pub const PROTOCOL_3_0: i32 = 196_608;
pub const SSL_REQUEST_CODE: i32 = 80_877_103;
pub const GSSENC_REQUEST_CODE: i32 = 80_877_104;
pub const CANCEL_REQUEST_CODE: i32 = 80_877_102;

/// Largest frame accepted by default: PostgreSQL's own limit for a message.
pub const DEFAULT_MAX_FRAME: usize = 1 << 30;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("invalid message length {0}")]
    BadLength(i64),
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("unsupported protocol version {major}.{minor}")]
    UnsupportedVersion { major: i32, minor: i32 },
    #[error("malformed {message} message: {why}")]
    Malformed {
        message: &'static str,
        why: &'static str,
    },
}

impl ProtocolError {
    fn malformed(message: &'static str, why: &'static str) -> Self {
        ProtocolError::Malformed { message, why }
    }
}

/// Runs every decoder over arbitrary bytes; it must never panic.
pub fn fuzz_input(data: &[u8]) {
    let mut buf = bytes::BytesMut::from(data);
    let _ = decode_startup(&mut buf, 1 << 20);
    let mut buf = bytes::BytesMut::from(data);
    while let Ok(Some(frame)) = decode_frame(&mut buf, 1 << 20) {
        let _ = FrontendMessage::parse(&frame);
        let _ = BackendMessage::parse(&frame);
    }
    let _ = complete_frames(data, 1 << 20, |_, _| {});
}

/// A cursor over a message body: C strings, big-endian integers.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    message: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], message: &'static str) -> Self {
        Self { buf, message }
    }

    /// A C string that must be UTF-8 (names, protocol-level keywords).
    pub(crate) fn cstr(&mut self) -> Result<&'a str, ProtocolError> {
        let message = self.message;
        std::str::from_utf8(self.cbytes()?)
            .map_err(|_| ProtocolError::malformed(message, "string is not UTF-8"))
    }

    /// A C string's bytes, whatever their encoding (text the client sends in
    /// its `client_encoding`).
    pub(crate) fn cbytes(&mut self) -> Result<&'a [u8], ProtocolError> {
        let nul = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or(ProtocolError::malformed(
                self.message,
                "unterminated string",
            ))?;
        let s = &self.buf[..nul];
        self.buf = &self.buf[nul + 1..];
        Ok(s)
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.buf.len() < n {
            return Err(ProtocolError::malformed(self.message, "truncated"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.bytes(1)?[0])
    }

    pub(crate) fn i16(&mut self) -> Result<i16, ProtocolError> {
        let b = self.bytes(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    pub(crate) fn i32(&mut self) -> Result<i32, ProtocolError> {
        let b = self.bytes(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn count(&mut self) -> Result<usize, ProtocolError> {
        let n = self.i16()?;
        usize::try_from(n).map_err(|_| ProtocolError::malformed(self.message, "negative count"))
    }

    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}
