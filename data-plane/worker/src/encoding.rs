//! Reading a session's text as the server reads it: in its
//! `client_encoding`, with its `standard_conforming_strings`.
//!
//! The classifier works on UTF-8. A client may send text in any encoding
//! PostgreSQL accepts; some (SJIS, BIG5, GBK, UHC, GB18030) have multi-byte
//! characters whose second byte is an ASCII backslash, so text read as UTF-8
//! (or as the wrong encoding) can end a string literal where the server
//! does not. Text is therefore transcoded with the encoding the server
//! reports, strictly: bytes the encoding does not allow are refused, never
//! replaced. Encodings without an exact decoder here are refused outright.

use std::borrow::Cow;

use encoding_rs::{DecoderResult, Encoding};
use gatehouse_policies::Reading;

use crate::error::ClientError;

/// SQLSTATE for text that is not valid in the session's encoding
/// (`character_not_in_repertoire`).
pub const INVALID_TEXT: &str = "22021";

/// A client encoding the worker can read exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientEncoding {
    /// PostgreSQL's name for it, as `ParameterStatus` reports it.
    name: &'static str,
    decode: Decode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decode {
    Utf8,
    /// No conversion in the server: high bytes are taken as they come.
    SqlAscii,
    /// A WHATWG encoding, adjusted where PostgreSQL's tables differ.
    Whatwg(&'static Encoding, Fix),
}

/// Where PostgreSQL's conversion of a single-byte encoding differs from
/// the WHATWG decoder used for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fix {
    None,
    /// An ISO 8859 encoding read through the Windows code page that extends
    /// it (WHATWG maps the ISO label to it): bytes 0x80–0x9F are the C1
    /// controls U+0080–U+009F, as in ISO 8859.
    C1Controls,
    /// A Windows code page: the bytes WHATWG maps to C1 controls are
    /// undefined in the code page, and PostgreSQL refuses them, as it does
    /// the bytes listed.
    C1Undefined(&'static [u8]),
    /// KOI8-U as in RFC 2319 (PostgreSQL's); WHATWG's is KOI8-RU, which has
    /// Belarusian letters at 0xAE and 0xBE instead of box drawings.
    Koi8U,
    /// Characters PostgreSQL maps differently, each decoded from one byte
    /// sequence only: `(WHATWG's, PostgreSQL's)`.
    Chars(&'static [(char, char)]),
    /// Shift_JIS as PostgreSQL's SJIS: 0x80 is no character (WHATWG reads
    /// it as U+0080), nor is the user-defined area (leads 0xF0–0xF9,
    /// which WHATWG maps to U+E000–U+E757).
    Sjis,
}

/// Every client encoding the worker reads, by PostgreSQL's name for it.
/// Each was compared with PostgreSQL 15's own conversion, every byte of
/// the single-byte encodings and every two-byte sequence of the others:
/// where both accept a sequence they read the same characters, so the
/// recorded text is what the server ran. The single-byte encodings and
/// SJIS accept exactly what PostgreSQL accepts; the others refuse a few
/// sequences it accepts (the UHC user-defined area, EUC_KR 0xA2E8) and
/// accept some it refuses (rare extensions, which the server then refuses
/// itself). Where both accept a text, they split it into the same
/// characters.
///
/// Left out, because no decoder here reads them as PostgreSQL does:
/// `EUC_TW`, `EUC_JIS_2004`, `SHIFT_JIS_2004`, `JOHAB`, `MULE_INTERNAL`;
/// `BIG5` (WHATWG's Big5 is Big5-HKSCS: some 270 characters differ from
/// PostgreSQL's, among them the ETEN extensions) and `GB18030` (which
/// PostgreSQL maps per GB 18030-2000 before version 17, and WHATWG per
/// 2022).
const SUPPORTED: &[(&str, Decode)] = {
    use Decode::*;
    use Fix::*;
    use encoding_rs as e;
    &[
        ("UTF8", Utf8),
        ("SQL_ASCII", SqlAscii),
        ("LATIN1", Whatwg(e::WINDOWS_1252, C1Controls)),
        ("LATIN2", Whatwg(e::ISO_8859_2, None)),
        ("LATIN3", Whatwg(e::ISO_8859_3, None)),
        ("LATIN4", Whatwg(e::ISO_8859_4, None)),
        ("LATIN5", Whatwg(e::WINDOWS_1254, C1Controls)),
        ("LATIN6", Whatwg(e::ISO_8859_10, None)),
        ("LATIN7", Whatwg(e::ISO_8859_13, None)),
        ("LATIN8", Whatwg(e::ISO_8859_14, None)),
        ("LATIN9", Whatwg(e::ISO_8859_15, None)),
        ("LATIN10", Whatwg(e::ISO_8859_16, None)),
        ("ISO_8859_5", Whatwg(e::ISO_8859_5, None)),
        ("ISO_8859_6", Whatwg(e::ISO_8859_6, None)),
        ("ISO_8859_7", Whatwg(e::ISO_8859_7, None)),
        ("ISO_8859_8", Whatwg(e::ISO_8859_8, None)),
        ("WIN1250", Whatwg(e::WINDOWS_1250, C1Undefined(&[]))),
        ("WIN1251", Whatwg(e::WINDOWS_1251, C1Undefined(&[]))),
        ("WIN1252", Whatwg(e::WINDOWS_1252, C1Undefined(&[]))),
        ("WIN1253", Whatwg(e::WINDOWS_1253, C1Undefined(&[]))),
        ("WIN1254", Whatwg(e::WINDOWS_1254, C1Undefined(&[]))),
        // U+05BA, added to CP1255 after PostgreSQL took its table.
        ("WIN1255", Whatwg(e::WINDOWS_1255, C1Undefined(&[0xca]))),
        ("WIN1256", Whatwg(e::WINDOWS_1256, C1Undefined(&[]))),
        ("WIN1257", Whatwg(e::WINDOWS_1257, C1Undefined(&[]))),
        ("WIN1258", Whatwg(e::WINDOWS_1258, C1Undefined(&[]))),
        ("WIN866", Whatwg(e::IBM866, None)),
        ("WIN874", Whatwg(e::WINDOWS_874, C1Undefined(&[]))),
        ("KOI8R", Whatwg(e::KOI8_R, None)),
        ("KOI8U", Whatwg(e::KOI8_U, Koi8U)),
        ("SJIS", Whatwg(e::SHIFT_JIS, Sjis)),
        ("EUC_JP", Whatwg(e::EUC_JP, None)),
        ("EUC_KR", Whatwg(e::EUC_KR, None)),
        ("UHC", Whatwg(e::EUC_KR, None)),
        // GB 2312 is a subset of GBK; PostgreSQL reads two of its symbols
        // (0xA1A4, 0xA1AA) as in GB 2312's original mapping.
        (
            "EUC_CN",
            Whatwg(
                e::GBK,
                Chars(&[('\u{b7}', '\u{30fb}'), ('\u{2014}', '\u{2015}')]),
            ),
        ),
        ("GBK", Whatwg(e::GBK, None)),
    ]
};

/// Client-only encodings whose multi-byte characters may end in an ASCII
/// byte (a backslash, for one): the reason text must be read in them.
const ASCII_UNSAFE: &[&str] = &["SJIS", "GBK", "UHC"];

/// An encoding the worker cannot read exactly, by the name the server gave.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "client_encoding \"{0}\" is not supported through Gatehouse; use UTF8 or another supported encoding"
)]
pub struct UnsupportedEncoding(pub String);

impl UnsupportedEncoding {
    /// What the client is told (`0A000`); `fatal` ends the session.
    pub fn client_error(&self, fatal: bool) -> ClientError {
        let e = ClientError::error("0A000", self.to_string());
        ClientError { fatal, ..e }
    }
}

/// Text that is not valid in the session's encoding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid byte sequence for client_encoding \"{encoding}\": {} at byte {offset}; \
     Gatehouse refuses text it cannot read as the server would",
    hex(bytes)
)]
pub struct InvalidText {
    pub encoding: &'static str,
    /// The offending bytes (at most a few).
    pub bytes: Vec<u8>,
    pub offset: usize,
}

impl InvalidText {
    pub fn client_error(&self) -> ClientError {
        ClientError::error(INVALID_TEXT, self.to_string())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("0x{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Normalises an encoding name as PostgreSQL does: letters and digits
/// only, any case.
fn clean(name: &str) -> String {
    name.chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

impl ClientEncoding {
    pub const UTF8: ClientEncoding = ClientEncoding {
        name: "UTF8",
        decode: Decode::Utf8,
    };

    /// The encoding PostgreSQL calls `name` (its canonical names, as
    /// `ParameterStatus` reports them; case and punctuation are ignored).
    pub fn named(name: &str) -> Result<ClientEncoding, UnsupportedEncoding> {
        let wanted = clean(name);
        SUPPORTED
            .iter()
            .find(|(n, _)| clean(n) == wanted)
            .map(|&(name, decode)| ClientEncoding { name, decode })
            .ok_or_else(|| UnsupportedEncoding(name.to_string()))
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// `bytes` as UTF-8, exactly as the server reads them; borrowed when
    /// they already are.
    pub fn decode<'a>(&self, bytes: &'a [u8]) -> Result<Cow<'a, str>, InvalidText> {
        if bytes.is_ascii() {
            // Every supported encoding is ASCII in its first 128 bytes.
            return Ok(Cow::Borrowed(
                std::str::from_utf8(bytes).expect("ASCII is UTF-8"),
            ));
        }
        match self.decode {
            Decode::Utf8 => std::str::from_utf8(bytes).map(Cow::Borrowed).map_err(|e| {
                let at = e.valid_up_to();
                let len = e.error_len().unwrap_or(bytes.len() - at);
                self.invalid(bytes, at, len)
            }),
            Decode::SqlAscii => Ok(sql_ascii(bytes)),
            Decode::Whatwg(encoding, fix) => {
                let text = self.whatwg(encoding, bytes)?;
                if !ASCII_UNSAFE.contains(&self.name) {
                    // In these every byte of a multi-byte character is
                    // 0x80 or above: one that swallowed an ASCII byte is no
                    // character for PostgreSQL (WHATWG's EUC-KR, say, is
                    // UHC).
                    let ascii = |n: usize, a: bool| n + usize::from(a);
                    if bytes.iter().map(u8::is_ascii).fold(0, ascii)
                        != text.chars().map(|c| c.is_ascii()).fold(0, ascii)
                    {
                        let at = bytes.iter().position(|b| !b.is_ascii()).unwrap_or(0);
                        return Err(self.invalid(bytes, at, 2));
                    }
                }
                self.fix(fix, bytes, text)
            }
        }
    }

    fn invalid(&self, bytes: &[u8], at: usize, len: usize) -> InvalidText {
        let end = (at + len.clamp(1, 4)).min(bytes.len());
        InvalidText {
            encoding: self.name,
            bytes: bytes[at..end].to_vec(),
            offset: at,
        }
    }

    /// Strict WHATWG decoding: the first malformed sequence is an error.
    fn whatwg(&self, encoding: &'static Encoding, bytes: &[u8]) -> Result<String, InvalidText> {
        let mut decoder = encoding.new_decoder_without_bom_handling();
        let capacity = decoder
            .max_utf8_buffer_length_without_replacement(bytes.len())
            .unwrap_or(bytes.len() * 3);
        let mut out = String::with_capacity(capacity);
        let mut read = 0;
        loop {
            let (result, n) =
                decoder.decode_to_string_without_replacement(&bytes[read..], &mut out, true);
            read += n;
            match result {
                DecoderResult::InputEmpty => return Ok(out),
                DecoderResult::OutputFull => out.reserve(bytes.len() - read + 16),
                DecoderResult::Malformed(bad, after) => {
                    let at = read - usize::from(bad) - usize::from(after);
                    return Err(self.invalid(bytes, at, usize::from(bad)));
                }
            }
        }
    }

    /// Applies where PostgreSQL's table differs from WHATWG's. All but
    /// `Chars` are for single-byte encodings, where byte `i` is character
    /// `i`.
    fn fix<'a>(&self, fix: Fix, bytes: &[u8], text: String) -> Result<Cow<'a, str>, InvalidText> {
        match fix {
            Fix::None => Ok(Cow::Owned(text)),
            Fix::C1Controls => Ok(Cow::Owned(
                bytes
                    .iter()
                    .zip(text.chars())
                    .map(|(&b, c)| {
                        if (0x80..=0x9f).contains(&b) {
                            char::from(b)
                        } else {
                            c
                        }
                    })
                    .collect(),
            )),
            Fix::C1Undefined(also) => {
                let undefined = bytes
                    .iter()
                    .zip(text.chars())
                    .position(|(b, c)| ('\u{80}'..='\u{9f}').contains(&c) || also.contains(b));
                match undefined {
                    Some(at) => Err(self.invalid(bytes, at, 1)),
                    None => Ok(Cow::Owned(text)),
                }
            }
            Fix::Sjis => match text
                .chars()
                .position(|c| c == '\u{80}' || ('\u{e000}'..='\u{e757}').contains(&c))
            {
                // Offsets here count characters, not bytes: good enough
                // to point at the trouble.
                Some(at) => Err(self.invalid(bytes, at.min(bytes.len() - 1), 1)),
                None => Ok(Cow::Owned(text)),
            },
            Fix::Chars(table) => Ok(Cow::Owned(
                text.chars()
                    .map(|c| table.iter().find(|(w, _)| *w == c).map_or(c, |(_, p)| *p))
                    .collect(),
            )),
            Fix::Koi8U => Ok(Cow::Owned(
                bytes
                    .iter()
                    .zip(text.chars())
                    .map(|(&b, c)| match b {
                        0xae => '\u{255d}',
                        0xbe => '\u{256c}',
                        _ => c,
                    })
                    .collect(),
            )),
        }
    }
}

/// `SQL_ASCII`: the server converts nothing and checks the bytes against
/// its own encoding. Text that is UTF-8 is taken as such (a UTF8 server
/// reads it so); otherwise each byte from 0x80 stands for a letter of its
/// own (U+0100 + byte − 0x80). The server's lexer takes high bytes for
/// parts of names and literals, never for quotes or backslashes, and so
/// does the classifier with letters: the statement's structure is the
/// same.
fn sql_ascii(bytes: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => Cow::Owned(
            bytes
                .iter()
                .map(|&b| {
                    if b < 0x80 {
                        char::from(b)
                    } else {
                        char::from_u32(0x100 + u32::from(b) - 0x80).expect("a letter")
                    }
                })
                .collect(),
        ),
    }
}

/// How the server reads the session's text right now, from its
/// `ParameterStatus` messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsing {
    pub encoding: Result<ClientEncoding, UnsupportedEncoding>,
    pub standard_conforming_strings: bool,
}

impl Default for Parsing {
    /// The server's defaults for a UTF8 database.
    fn default() -> Self {
        Parsing {
            encoding: Ok(ClientEncoding::UTF8),
            standard_conforming_strings: true,
        }
    }
}

impl Parsing {
    /// The settings a login reported (defaults for any it did not).
    pub fn from_parameters<'a>(params: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut p = Parsing::default();
        for (name, value) in params {
            p.apply(name.as_bytes(), value.as_bytes());
        }
        p
    }

    /// Takes in one `ParameterStatus`; true when it changed how text is
    /// read. Other parameters are ignored.
    pub fn apply(&mut self, name: &[u8], value: &[u8]) -> bool {
        let before = self.clone();
        let value = String::from_utf8_lossy(value);
        if name.eq_ignore_ascii_case(b"client_encoding") {
            self.encoding = ClientEncoding::named(&value);
        } else if name.eq_ignore_ascii_case(b"standard_conforming_strings") {
            // The server reports `on` or `off`; anything else is read as
            // off, where a backslash escapes.
            self.standard_conforming_strings = value.eq_ignore_ascii_case("on");
        }
        *self != before
    }

    /// What the classifier needs besides the (transcoded) text.
    pub fn reading(&self) -> Reading {
        Reading {
            standard_conforming_strings: self.standard_conforming_strings,
        }
    }

    /// Text from the client as UTF-8, read as the server reads it.
    pub fn decode<'a>(&self, bytes: &'a [u8]) -> Result<Cow<'a, str>, ClientError> {
        match &self.encoding {
            Ok(e) => e.decode(bytes).map_err(|e| e.client_error()),
            Err(u) => Err(u.client_error(false)),
        }
    }
}

/// Parses a `ParameterStatus` body (name and value, each NUL-terminated)
/// without assuming either is UTF-8.
pub fn parameter_status(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let mut parts = body.splitn(3, |&b| b == 0);
    let name = parts.next()?;
    let value = parts.next()?;
    parts.next()?;
    Some((name, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(encoding: &str, bytes: &[u8]) -> Result<String, InvalidText> {
        ClientEncoding::named(encoding)
            .unwrap()
            .decode(bytes)
            .map(Cow::into_owned)
    }

    #[test]
    fn every_name_postgres_reports_is_supported_or_refused() {
        // pg_enc2name_tbl, as the server spells them.
        let all = [
            "SQL_ASCII",
            "EUC_JP",
            "EUC_CN",
            "EUC_KR",
            "EUC_TW",
            "EUC_JIS_2004",
            "UTF8",
            "MULE_INTERNAL",
            "LATIN1",
            "LATIN2",
            "LATIN3",
            "LATIN4",
            "LATIN5",
            "LATIN6",
            "LATIN7",
            "LATIN8",
            "LATIN9",
            "LATIN10",
            "WIN1256",
            "WIN1258",
            "WIN866",
            "WIN874",
            "KOI8R",
            "WIN1251",
            "WIN1252",
            "ISO_8859_5",
            "ISO_8859_6",
            "ISO_8859_7",
            "ISO_8859_8",
            "WIN1250",
            "WIN1253",
            "WIN1254",
            "WIN1255",
            "WIN1257",
            "KOI8U",
            "SJIS",
            "BIG5",
            "GBK",
            "UHC",
            "GB18030",
            "JOHAB",
            "SHIFT_JIS_2004",
        ];
        let refused = [
            "EUC_TW",
            "EUC_JIS_2004",
            "MULE_INTERNAL",
            "JOHAB",
            "SHIFT_JIS_2004",
            "BIG5",
            "GB18030",
        ];
        for name in all {
            match ClientEncoding::named(name) {
                Ok(e) => {
                    assert!(!refused.contains(&name), "{name}");
                    assert_eq!(e.name(), name);
                }
                Err(u) => {
                    assert!(refused.contains(&name), "{name} should be supported");
                    assert_eq!(
                        u.to_string(),
                        format!(
                            "client_encoding \"{name}\" is not supported through Gatehouse; \
                             use UTF8 or another supported encoding"
                        )
                    );
                }
            }
        }
        assert_eq!(SUPPORTED.len(), all.len() - refused.len());
        // Case and punctuation do not matter, as in PostgreSQL.
        assert_eq!(ClientEncoding::named("sjis").unwrap().name(), "SJIS");
        assert_eq!(ClientEncoding::named("utf-8").unwrap().name(), "UTF8");
        assert_eq!(
            ClientEncoding::named("iso-8859-5").unwrap().name(),
            "ISO_8859_5"
        );
        assert!(ClientEncoding::named("EBCDIC").is_err());
    }

    #[test]
    fn the_backslash_inside_a_shift_jis_character_is_no_backslash() {
        // 'ソ' and '表' end in 0x5C; read as SJIS they are one character.
        assert_eq!(decode("SJIS", b"SELECT '\x83\x5c'").unwrap(), "SELECT 'ソ'");
        assert_eq!(decode("SJIS", b"'\x95\x5c'").unwrap(), "'表'");
        // Half-width katakana are single bytes.
        assert_eq!(decode("SJIS", b"\xb1").unwrap(), "ｱ");
        assert_eq!(decode("GBK", b"\x81\x5c").unwrap(), "乗");
        assert_eq!(decode("EUC_JP", b"\xa5\xbd").unwrap(), "ソ");
        assert_eq!(decode("UHC", b"\x81\x41").unwrap(), "갂");
        assert_eq!(
            decode("EUC_CN", b"\xa1\xa4\xa1\xaa\xb1\xed").unwrap(),
            "・―表"
        );
    }

    #[test]
    fn invalid_bytes_are_refused_with_where_they_are() {
        let e = decode("SJIS", b"SELECT '\x83").unwrap_err();
        assert_eq!((e.offset, e.bytes.as_slice()), (8, &b"\x83"[..]));
        assert_eq!(
            e.to_string(),
            "invalid byte sequence for client_encoding \"SJIS\": 0x83 at byte 8; \
             Gatehouse refuses text it cannot read as the server would"
        );
        assert_eq!(e.client_error().sqlstate, "22021");
        // A lead byte followed by a quote is no character.
        let e = decode("SJIS", b"'\x83' ").unwrap_err();
        assert_eq!(e.offset, 1);
        let e = decode("UTF8", b"ok \xc3\x28").unwrap_err();
        assert_eq!((e.offset, e.bytes.as_slice()), (3, &b"\xc3"[..]));
        assert!(decode("UTF8", b"\xed\xa0\x80").is_err(), "surrogate");
        assert!(decode("EUC_JP", b"\xa5").is_err());
        assert!(
            decode("LATIN3", b"\xa5").is_err(),
            "undefined in ISO 8859-3"
        );
        assert!(decode("ISO_8859_6", b"\xa1").is_err());
        assert!(decode("WIN1252", b"\x81").is_err(), "undefined in CP1252");
        assert!(decode("WIN874", b"\x90").is_err());
        assert!(decode("WIN1255", b"\xca").is_err());
        assert!(decode("GBK", b"\x81").is_err());
        // Not characters in PostgreSQL's tables, though WHATWG's have them.
        assert!(decode("SJIS", b"\x80").is_err());
        assert!(decode("SJIS", b"\xf0\x40").is_err(), "user-defined area");
        assert!(decode("EUC_KR", b"\x81\x41").is_err(), "UHC, not EUC-KR");
        assert!(decode("EUC_KR", b"\xb0\x41").is_err());
        assert_eq!(decode("EUC_KR", b"\xb0\xa1").unwrap(), "가");
    }

    #[test]
    fn single_byte_encodings_follow_postgres_tables() {
        // LATIN1 is the first 256 code points (WHATWG's ISO-8859-1 is
        // windows-1252, which has '€' at 0x80).
        assert_eq!(
            decode("LATIN1", b"\x80\x9f\xe9\xff").unwrap(),
            "\u{80}\u{9f}éÿ"
        );
        assert_eq!(decode("LATIN5", b"\x80\xd0\xfd").unwrap(), "\u{80}Ğı");
        assert_eq!(decode("LATIN9", b"\xa4").unwrap(), "€");
        assert_eq!(decode("LATIN2", b"\x80").unwrap(), "\u{80}");
        assert_eq!(decode("WIN1252", b"\x80\xe9").unwrap(), "€é");
        assert_eq!(decode("KOI8U", b"\xae\xbe\xa4").unwrap(), "╝╬є");
        assert_eq!(decode("KOI8R", b"\xc1").unwrap(), "а");
        assert_eq!(decode("WIN866", b"\x80").unwrap(), "А");
    }

    #[test]
    fn sql_ascii_keeps_utf8_and_letters_for_other_high_bytes() {
        assert_eq!(decode("SQL_ASCII", "é".as_bytes()).unwrap(), "é");
        let s = decode("SQL_ASCII", b"'\x83\\'").unwrap();
        assert_eq!(s, "'\u{103}\\'");
        assert!(s.chars().all(|c| c.is_ascii() || c.is_alphabetic()));
        // Every high byte becomes a letter.
        let all: Vec<u8> = (0x80..=0xff).collect();
        let s = decode("SQL_ASCII", &all).unwrap();
        assert_eq!(s.chars().count(), 128);
        assert!(s.chars().all(char::is_alphabetic));
    }

    #[test]
    fn ascii_and_utf8_text_is_borrowed() {
        let utf8 = ClientEncoding::UTF8;
        assert!(matches!(
            utf8.decode("SELECT 'é'".as_bytes()),
            Ok(Cow::Borrowed(_))
        ));
        let sjis = ClientEncoding::named("SJIS").unwrap();
        assert!(matches!(sjis.decode(b"SELECT 1"), Ok(Cow::Borrowed(_))));
    }

    #[test]
    fn parameter_status_follows_the_server() {
        let mut p = Parsing::from_parameters([
            ("server_version", "17.0"),
            ("client_encoding", "SJIS"),
            ("standard_conforming_strings", "on"),
        ]);
        assert_eq!(p.encoding.as_ref().unwrap().name(), "SJIS");
        assert_eq!(p.reading(), Reading::default());
        assert!(!p.apply(b"client_encoding", b"SJIS"), "no change");
        assert!(!p.apply(b"search_path", b"\x83\x5c"), "not about reading");
        assert!(p.apply(b"standard_conforming_strings", b"off"));
        assert!(!p.reading().standard_conforming_strings);
        assert!(p.apply(b"client_encoding", b"MULE_INTERNAL"));
        let e = p.decode(b"SELECT 1").unwrap_err();
        assert_eq!((e.sqlstate, e.fatal), ("0A000", false));
        assert!(e.message.contains("\"MULE_INTERNAL\""), "{}", e.message);
        assert!(p.apply(b"client_encoding", b"UTF8"));
        assert_eq!(p.decode("é".as_bytes()).unwrap(), "é");
        assert_eq!(Parsing::from_parameters([]), Parsing::default());
    }

    #[test]
    fn parameter_status_bodies_are_split_without_utf8() {
        assert_eq!(
            parameter_status(b"client_encoding\0SJIS\0"),
            Some((&b"client_encoding"[..], &b"SJIS"[..]))
        );
        assert_eq!(
            parameter_status(b"application_name\0\x83\x5c\0"),
            Some((&b"application_name"[..], &b"\x83\x5c"[..]))
        );
        assert_eq!(parameter_status(b"client_encoding\0SJIS"), None);
        assert_eq!(parameter_status(b"client_encoding"), None);
    }
}
