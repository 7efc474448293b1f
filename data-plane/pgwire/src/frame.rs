use bytes::{Bytes, BytesMut};

use crate::{
    CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, PROTOCOL_3_0, ProtocolError, Reader, SSL_REQUEST_CODE,
};

/// The first packet of a connection, which has no type byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    CancelRequest {
        process_id: i32,
        secret_key: i32,
    },
    /// A protocol 3.0 StartupMessage with its parameters (`user`,
    /// `database`, `application_name`, options…), in the order sent.
    Startup {
        params: Vec<(String, String)>,
    },
}

impl StartupPacket {
    pub fn param(&self, key: &str) -> Option<&str> {
        match self {
            StartupPacket::Startup { params } => params
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str()),
            _ => None,
        }
    }
}

/// Decodes a startup-phase packet: `Ok(None)` until the whole packet is in `buf`.
pub fn decode_startup(
    buf: &mut BytesMut,
    max_len: usize,
) -> Result<Option<StartupPacket>, ProtocolError> {
    if buf.len() < 8 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len < 8 {
        return Err(ProtocolError::BadLength(len.into()));
    }
    let len = len as usize;
    if len > max_len {
        return Err(ProtocolError::TooLarge { len, max: max_len });
    }
    if buf.len() < len {
        return Ok(None);
    }
    let packet = buf.split_to(len);
    let mut r = Reader::new(&packet[4..], "startup");
    let code = r.i32()?;
    let parsed = match code {
        SSL_REQUEST_CODE => StartupPacket::SslRequest,
        GSSENC_REQUEST_CODE => StartupPacket::GssEncRequest,
        CANCEL_REQUEST_CODE => StartupPacket::CancelRequest {
            process_id: r.i32()?,
            secret_key: r.i32()?,
        },
        PROTOCOL_3_0 => {
            let mut params = Vec::new();
            loop {
                let key = r.cstr()?;
                if key.is_empty() {
                    break;
                }
                params.push((key.to_owned(), r.cstr()?.to_owned()));
            }
            StartupPacket::Startup { params }
        }
        other => {
            return Err(ProtocolError::UnsupportedVersion {
                major: other >> 16,
                minor: other & 0xffff,
            });
        }
    };
    Ok(Some(parsed))
}

/// One typed message as it arrived: the type byte and the whole frame
/// (header included), kept as shared bytes so it can be forwarded untouched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub tag: u8,
    pub raw: Bytes,
}

impl Frame {
    /// The message body, after the type byte and length.
    pub fn body(&self) -> &[u8] {
        &self.raw[5..]
    }
}

/// Reads the header at the start of `buf`: `(tag, total frame length)`.
fn header(buf: &[u8], max_len: usize) -> Result<Option<(u8, usize)>, ProtocolError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(ProtocolError::BadLength(len.into()));
    }
    let total = len as usize + 1;
    if total > max_len {
        return Err(ProtocolError::TooLarge {
            len: total,
            max: max_len,
        });
    }
    Ok(Some((buf[0], total)))
}

/// Most room [`decode_frame`] makes ahead of the bytes that have arrived for
/// a frame not yet whole; a larger frame's buffer grows as its bytes come.
pub const RESERVE_AHEAD: usize = 256 * 1024;

/// Splits one whole frame off the front of `buf`, or `Ok(None)` if it has not
/// fully arrived. `buf` keeps any bytes after the frame.
pub fn decode_frame(buf: &mut BytesMut, max_len: usize) -> Result<Option<Frame>, ProtocolError> {
    match header(buf, max_len)? {
        Some((tag, total)) if buf.len() >= total => Ok(Some(Frame {
            tag,
            raw: buf.split_to(total).freeze(),
        })),
        Some((_, total)) => {
            // Room for what is still to come, but never more than
            // `RESERVE_AHEAD` beyond what has arrived: a header alone must not
            // claim memory for a frame whose bytes never come.
            buf.reserve((total - buf.len()).min(RESERVE_AHEAD));
            Ok(None)
        }
        None => Ok(None),
    }
}

/// Walks the whole frames at the front of `buf` without copying, calling
/// `visit(tag, body)` for each, and returns how many bytes they span. A relay
/// forwards exactly that prefix and keeps the rest for the next read.
pub fn complete_frames(
    buf: &[u8],
    max_len: usize,
    mut visit: impl FnMut(u8, &[u8]),
) -> Result<usize, ProtocolError> {
    let mut pos = 0;
    while let Some((tag, total)) = header(&buf[pos..], max_len)? {
        if buf.len() - pos < total {
            break;
        }
        visit(tag, &buf[pos + 5..pos + total]);
        pos += total;
    }
    Ok(pos)
}

/// Length of the frame at the front of `buf` if its header has arrived.
pub fn pending_frame_len(buf: &[u8], max_len: usize) -> Result<Option<usize>, ProtocolError> {
    Ok(header(buf, max_len)?.map(|(_, total)| total))
}

impl Frame {
    /// Builds a frame from a type byte and body (for tests and encoders).
    pub fn new(tag: u8, body: &[u8]) -> Self {
        let mut raw = BytesMut::with_capacity(body.len() + 5);
        raw.extend_from_slice(&[tag]);
        raw.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        raw.extend_from_slice(body);
        Frame {
            tag,
            raw: raw.freeze(),
        }
    }
}
