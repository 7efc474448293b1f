//! Encoders for the messages Gatehouse writes itself. Each appends one
//! message to `buf`.

use bytes::{BufMut, BytesMut};

use crate::{CANCEL_REQUEST_CODE, PROTOCOL_3_0, SSL_REQUEST_CODE, TransactionStatus};

fn message(buf: &mut BytesMut, tag: Option<u8>, body: impl FnOnce(&mut BytesMut)) {
    if let Some(tag) = tag {
        buf.put_u8(tag);
    }
    let at = buf.len();
    buf.put_i32(0);
    body(buf);
    let len = (buf.len() - at) as i32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn cstr(buf: &mut BytesMut, s: &str) {
    buf.put_slice(s.as_bytes());
    buf.put_u8(0);
}

/// `ErrorResponse` with severity, SQLSTATE and message. `severity` is
/// `ERROR` or `FATAL`.
pub fn error_response(buf: &mut BytesMut, severity: &str, sqlstate: &str, msg: &str) {
    message(buf, Some(b'E'), |b| {
        for (code, value) in [
            (b'S', severity),
            (b'V', severity),
            (b'C', sqlstate),
            (b'M', msg),
        ] {
            b.put_u8(code);
            cstr(b, value);
        }
        b.put_u8(0);
    });
}

/// `NoticeResponse` with severity `NOTICE`, SQLSTATE and message: shown
/// by the client (psql prints it) without ending anything.
pub fn notice_response(buf: &mut BytesMut, sqlstate: &str, msg: &str) {
    message(buf, Some(b'N'), |b| {
        for (code, value) in [
            (b'S', "NOTICE"),
            (b'V', "NOTICE"),
            (b'C', sqlstate),
            (b'M', msg),
        ] {
            b.put_u8(code);
            cstr(b, value);
        }
        b.put_u8(0);
    });
}

pub fn ready_for_query(buf: &mut BytesMut, status: TransactionStatus) {
    message(buf, Some(b'Z'), |b| b.put_u8(status.byte()));
}

pub fn authentication_ok(buf: &mut BytesMut) {
    message(buf, Some(b'R'), |b| b.put_i32(0));
}

pub fn authentication_cleartext_password(buf: &mut BytesMut) {
    message(buf, Some(b'R'), |b| b.put_i32(3));
}

pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    message(buf, Some(b'S'), |b| {
        cstr(b, name);
        cstr(b, value);
    });
}

pub fn backend_key_data(buf: &mut BytesMut, process_id: i32, secret_key: i32) {
    message(buf, Some(b'K'), |b| {
        b.put_i32(process_id);
        b.put_i32(secret_key);
    });
}

pub fn startup_message<'a>(
    buf: &mut BytesMut,
    params: impl IntoIterator<Item = (&'a str, &'a str)>,
) {
    message(buf, None, |b| {
        b.put_i32(PROTOCOL_3_0);
        for (k, v) in params {
            cstr(b, k);
            cstr(b, v);
        }
        b.put_u8(0);
    });
}

pub fn ssl_request(buf: &mut BytesMut) {
    message(buf, None, |b| b.put_i32(SSL_REQUEST_CODE));
}

pub fn cancel_request(buf: &mut BytesMut, process_id: i32, secret_key: i32) {
    message(buf, None, |b| {
        b.put_i32(CANCEL_REQUEST_CODE);
        b.put_i32(process_id);
        b.put_i32(secret_key);
    });
}

/// A cleartext (or MD5-hashed) `PasswordMessage`.
pub fn password_message(buf: &mut BytesMut, password: &str) {
    message(buf, Some(b'p'), |b| cstr(b, password));
}

pub fn sasl_initial_response(buf: &mut BytesMut, mechanism: &str, data: &[u8]) {
    message(buf, Some(b'p'), |b| {
        cstr(b, mechanism);
        b.put_i32(data.len() as i32);
        b.put_slice(data);
    });
}

pub fn sasl_response(buf: &mut BytesMut, data: &[u8]) {
    message(buf, Some(b'p'), |b| b.put_slice(data));
}

/// `Query`; `text` is in the session's `client_encoding` (any bytes but NUL).
pub fn query(buf: &mut BytesMut, text: impl AsRef<[u8]>) {
    message(buf, Some(b'Q'), |b| {
        b.put_slice(text.as_ref());
        b.put_u8(0);
    });
}

/// `Describe` of a portal (`kind` `P`) or statement (`S`) by its name's
/// bytes.
pub fn describe(buf: &mut BytesMut, kind: u8, name: &[u8]) {
    message(buf, Some(b'D'), |b| {
        b.put_u8(kind);
        b.put_slice(name);
        b.put_u8(0);
    });
}

pub fn terminate(buf: &mut BytesMut) {
    message(buf, Some(b'X'), |_| {});
}
