use crate::{Frame, ProtocolError, Reader};

/// A frontend (client-to-server) message, borrowing from its frame. Only the
/// messages a gateway must understand are parsed; the rest are [`Other`].
///
/// [`Other`]: FrontendMessage::Other
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrontendMessage<'a> {
    /// `Q`: simple query; the text may hold several statements. Raw bytes in
    /// the session's `client_encoding`, which need not be UTF-8.
    Query(&'a [u8]),
    /// `P`
    Parse(Parse<'a>),
    /// `B`
    Bind(Bind<'a>),
    /// `E`: run a bound portal.
    Execute { portal: &'a str, max_rows: i32 },
    /// `C`: close a statement (`b'S'`) or portal (`b'P'`).
    Close { kind: u8, name: &'a str },
    /// `D`: describe a statement (`b'S'`) or portal (`b'P'`).
    Describe { kind: u8, name: &'a str },
    /// `S`
    Sync,
    /// `H`
    Flush,
    /// `X`
    Terminate,
    /// `d`
    CopyData(&'a [u8]),
    /// `c`
    CopyDone,
    /// `f`: the reason, in the session's `client_encoding`.
    CopyFail(&'a [u8]),
    /// `p`: password, SASL or GSS response; its meaning depends on the
    /// authentication exchange in progress.
    Password(&'a [u8]),
    /// Anything else (e.g. `F` function call), forwarded as it is.
    Other(u8),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parse<'a> {
    pub statement: &'a str,
    /// The statement's text: raw bytes in the session's `client_encoding`.
    pub query: &'a [u8],
    pub param_types: Vec<i32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind<'a> {
    pub portal: &'a str,
    pub statement: &'a str,
    /// Parameter format codes as sent: none (all text), one (applies to all),
    /// or one per parameter. Use [`Bind::param_format`].
    pub param_formats: Vec<i16>,
    /// Parameter values; `None` is SQL NULL.
    pub params: Vec<Option<&'a [u8]>>,
    pub result_formats: Vec<i16>,
}

impl Bind<'_> {
    /// The format code (0 text, 1 binary) of parameter `i`.
    pub fn param_format(&self, i: usize) -> i16 {
        match self.param_formats.as_slice() {
            [] => 0,
            [one] => *one,
            many => many.get(i).copied().unwrap_or(0),
        }
    }
}

impl<'a> FrontendMessage<'a> {
    pub fn parse(frame: &'a Frame) -> Result<Self, ProtocolError> {
        let body = frame.body();
        Ok(match frame.tag {
            b'Q' => FrontendMessage::Query(Reader::new(body, "Query").cbytes()?),
            b'P' => {
                let mut r = Reader::new(body, "Parse");
                let statement = r.cstr()?;
                let query = r.cbytes()?;
                let n = r.count()?;
                let param_types = (0..n).map(|_| r.i32()).collect::<Result<_, _>>()?;
                FrontendMessage::Parse(Parse {
                    statement,
                    query,
                    param_types,
                })
            }
            b'B' => {
                let mut r = Reader::new(body, "Bind");
                let portal = r.cstr()?;
                let statement = r.cstr()?;
                let n = r.count()?;
                let param_formats = (0..n).map(|_| r.i16()).collect::<Result<_, _>>()?;
                let n = r.count()?;
                let mut params = Vec::with_capacity(n);
                for _ in 0..n {
                    let len = r.i32()?;
                    params.push(match len {
                        -1 => None,
                        l if l >= 0 => Some(r.bytes(l as usize)?),
                        _ => return Err(ProtocolError::malformed("Bind", "negative length")),
                    });
                }
                let n = r.count()?;
                let result_formats = (0..n).map(|_| r.i16()).collect::<Result<_, _>>()?;
                FrontendMessage::Bind(Bind {
                    portal,
                    statement,
                    param_formats,
                    params,
                    result_formats,
                })
            }
            b'E' => {
                let mut r = Reader::new(body, "Execute");
                FrontendMessage::Execute {
                    portal: r.cstr()?,
                    max_rows: r.i32()?,
                }
            }
            b'C' | b'D' => {
                let what = if frame.tag == b'C' {
                    "Close"
                } else {
                    "Describe"
                };
                let mut r = Reader::new(body, what);
                let kind = r.u8()?;
                if kind != b'S' && kind != b'P' {
                    return Err(ProtocolError::malformed(what, "kind must be 'S' or 'P'"));
                }
                let name = r.cstr()?;
                if frame.tag == b'C' {
                    FrontendMessage::Close { kind, name }
                } else {
                    FrontendMessage::Describe { kind, name }
                }
            }
            b'S' => FrontendMessage::Sync,
            b'H' => FrontendMessage::Flush,
            b'X' => FrontendMessage::Terminate,
            b'd' => FrontendMessage::CopyData(body),
            b'c' => FrontendMessage::CopyDone,
            b'f' => FrontendMessage::CopyFail(Reader::new(body, "CopyFail").cbytes()?),
            b'p' => FrontendMessage::Password(body),
            other => FrontendMessage::Other(other),
        })
    }
}

/// Reads a cleartext `PasswordMessage` body.
pub fn password_text(body: &[u8]) -> Result<&str, ProtocolError> {
    let mut r = Reader::new(body, "PasswordMessage");
    let s = r.cstr()?;
    if !r.is_empty() {
        return Err(ProtocolError::malformed(
            "PasswordMessage",
            "trailing bytes",
        ));
    }
    Ok(s)
}
