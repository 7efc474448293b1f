use crate::{Frame, ProtocolError, Reader};

/// Transaction status reported by `ReadyForQuery`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransactionStatus {
    Idle,
    InTransaction,
    Failed,
}

impl TransactionStatus {
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            b'I' => Some(Self::Idle),
            b'T' => Some(Self::InTransaction),
            b'E' => Some(Self::Failed),
            _ => None,
        }
    }

    pub fn byte(self) -> u8 {
        match self {
            Self::Idle => b'I',
            Self::InTransaction => b'T',
            Self::Failed => b'E',
        }
    }
}

/// Fields of an `ErrorResponse` or `NoticeResponse`, by their field codes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
}

/// A backend (server-to-client) message that a gateway inspects. Everything
/// else is [`Other`](BackendMessage::Other) and is forwarded untouched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendMessage<'a> {
    /// `R`: an authentication request; `code` 0 is AuthenticationOk, 3
    /// cleartext, 5 MD5 (with salt in `data`), 10/11/12 SASL steps.
    Authentication {
        code: i32,
        data: &'a [u8],
    },
    /// `K`
    BackendKeyData {
        process_id: i32,
        secret_key: i32,
    },
    /// `S`
    ParameterStatus {
        name: &'a str,
        value: &'a str,
    },
    /// `Z`
    ReadyForQuery(TransactionStatus),
    /// `E`
    ErrorResponse(ErrorFields),
    /// `C`: the command tag, e.g. `INSERT 0 1`.
    CommandComplete(&'a str),
    /// `D`
    DataRow,
    Other(u8),
}

impl<'a> BackendMessage<'a> {
    pub fn parse(frame: &'a Frame) -> Result<Self, ProtocolError> {
        Self::parse_body(frame.tag, frame.body())
    }

    pub fn parse_body(tag: u8, body: &'a [u8]) -> Result<Self, ProtocolError> {
        Ok(match tag {
            b'R' => {
                let mut r = Reader::new(body, "Authentication");
                BackendMessage::Authentication {
                    code: r.i32()?,
                    data: r.rest(),
                }
            }
            b'K' => {
                let mut r = Reader::new(body, "BackendKeyData");
                BackendMessage::BackendKeyData {
                    process_id: r.i32()?,
                    secret_key: r.i32()?,
                }
            }
            b'S' => {
                let mut r = Reader::new(body, "ParameterStatus");
                BackendMessage::ParameterStatus {
                    name: r.cstr()?,
                    value: r.cstr()?,
                }
            }
            b'Z' => {
                let mut r = Reader::new(body, "ReadyForQuery");
                let status = TransactionStatus::from_byte(r.u8()?)
                    .ok_or(ProtocolError::malformed("ReadyForQuery", "unknown status"))?;
                BackendMessage::ReadyForQuery(status)
            }
            b'E' => BackendMessage::ErrorResponse(parse_fields(body)?),
            b'C' => BackendMessage::CommandComplete(Reader::new(body, "CommandComplete").cstr()?),
            b'D' => BackendMessage::DataRow,
            other => BackendMessage::Other(other),
        })
    }
}

fn parse_fields(body: &[u8]) -> Result<ErrorFields, ProtocolError> {
    let mut r = Reader::new(body, "ErrorResponse");
    let mut fields = ErrorFields::default();
    loop {
        let code = r.u8()?;
        if code == 0 {
            break;
        }
        let value = r.cstr()?.to_owned();
        match code {
            b'V' => fields.severity = value,
            b'S' if fields.severity.is_empty() => fields.severity = value,
            b'C' => fields.code = value,
            b'M' => fields.message = value,
            _ => {}
        }
    }
    Ok(fields)
}
