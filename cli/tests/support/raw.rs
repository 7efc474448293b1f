//! A client speaking the protocol by hand over plaintext, for what drivers
//! do not show or cannot send: the BackendKeyData, any startup parameter,
//! bytes that are no protocol at all. Included with
//! `#[path = "support/raw.rs"] mod raw;` by the tests that need it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use gatehouse_pgwire as pg;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct Raw {
    pub tcp: TcpStream,
    buf: BytesMut,
}

/// An `ErrorResponse`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub severity: String,
    pub code: String,
    pub message: String,
}

/// What the server sent up to a ReadyForQuery (or the connection's end).
#[derive(Debug, Default)]
pub struct Reply {
    /// Text values of every DataRow.
    pub rows: Vec<Vec<Option<String>>>,
    pub errors: Vec<Error>,
    /// `(process id, channel, payload)` of every NotificationResponse.
    pub notifications: Vec<(i32, String, String)>,
    pub parameters: Vec<(String, String)>,
    /// The BackendKeyData: `(process id, secret)`.
    pub key: Option<(i32, i32)>,
    /// The connection ended instead of a ReadyForQuery.
    pub closed: bool,
}

impl Reply {
    pub fn ok(&self) -> bool {
        self.errors.is_empty() && !self.closed
    }

    /// The only value of the only row.
    pub fn value(&self) -> Option<&str> {
        match self.rows.as_slice() {
            [row] => row.first()?.as_deref(),
            _ => None,
        }
    }
}

fn cstrings(mut body: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(nul) = body.iter().position(|&b| b == 0) {
        out.push(String::from_utf8_lossy(&body[..nul]).into_owned());
        body = &body[nul + 1..];
    }
    out
}

pub fn error_fields(body: &[u8]) -> Error {
    let mut e = Error {
        severity: String::new(),
        code: String::new(),
        message: String::new(),
    };
    for field in cstrings(body) {
        let mut chars = field.chars();
        match chars.next() {
            Some('S') => e.severity = chars.collect(),
            Some('C') => e.code = chars.collect(),
            Some('M') => e.message = chars.collect(),
            _ => {}
        }
    }
    e
}

impl Raw {
    pub async fn open(addr: SocketAddr) -> Raw {
        Raw::from_tcp(TcpStream::connect(addr).await.unwrap())
    }

    pub fn from_tcp(tcp: TcpStream) -> Raw {
        Raw {
            tcp,
            buf: BytesMut::new(),
        }
    }

    /// Logs in as `user` with `token` and the startup `params` (beside user
    /// and, unless they name one, database `app`): the session and what the login said, or what
    /// the refusal said.
    pub async fn login(
        addr: SocketAddr,
        user: &str,
        token: &str,
        params: &[(&str, &str)],
    ) -> Result<(Raw, Reply), Reply> {
        Raw::open(addr).await.login_on(user, token, params).await
    }

    /// [`Raw::login`] on a connection already open.
    pub async fn login_on(
        mut self,
        user: &str,
        token: &str,
        params: &[(&str, &str)],
    ) -> Result<(Raw, Reply), Reply> {
        let raw = &mut self;
        let mut out = BytesMut::new();
        let mut all = vec![("user", user)];
        if !params.iter().any(|(k, _)| *k == "database") {
            all.push(("database", "app"));
        }
        all.extend_from_slice(params);
        pg::startup_message(&mut out, all);
        raw.send(&out).await;
        let (tag, body) = raw.frame().await.expect("an answer to the startup");
        if tag == b'E' {
            return Err(raw.reply_from(tag, body).await);
        }
        assert_eq!((tag, &body[..]), (b'R', &3i32.to_be_bytes()[..]));
        out.clear();
        pg::password_message(&mut out, token);
        raw.send(&out).await;
        let reply = raw.reply().await;
        if reply.ok() {
            Ok((self, reply))
        } else {
            Err(reply)
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.tcp.write_all(bytes).await.unwrap();
    }

    /// The next message, `None` when the connection ended.
    pub async fn frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 5 {
                let len = i32::from_be_bytes(self.buf[1..5].try_into().unwrap()) as usize;
                if self.buf.len() > len {
                    let tag = self.buf.get_u8();
                    self.buf.advance(4);
                    return Some((tag, self.buf.split_to(len - 4).to_vec()));
                }
            }
            match self.tcp.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// Messages up to the next ReadyForQuery.
    pub async fn reply(&mut self) -> Reply {
        match self.frame().await {
            Some((tag, body)) => self.reply_from(tag, body).await,
            None => Reply {
                closed: true,
                ..Reply::default()
            },
        }
    }

    async fn reply_from(&mut self, mut tag: u8, mut body: Vec<u8>) -> Reply {
        let mut r = Reply::default();
        loop {
            match tag {
                b'Z' => return r,
                b'E' => r.errors.push(error_fields(&body)),
                b'D' => {
                    let mut b = &body[..];
                    let n = b.get_i16();
                    let mut row = Vec::new();
                    for _ in 0..n {
                        let len = b.get_i32();
                        if len < 0 {
                            row.push(None);
                        } else {
                            let (v, rest) = b.split_at(len as usize);
                            row.push(Some(String::from_utf8_lossy(v).into_owned()));
                            b = rest;
                        }
                    }
                    r.rows.push(row);
                }
                b'A' => {
                    let pid = i32::from_be_bytes(body[..4].try_into().unwrap());
                    let s = cstrings(&body[4..]);
                    r.notifications.push((pid, s[0].clone(), s[1].clone()));
                }
                b'S' => {
                    let s = cstrings(&body);
                    r.parameters.push((s[0].clone(), s[1].clone()));
                }
                b'K' => {
                    let pid = i32::from_be_bytes(body[..4].try_into().unwrap());
                    let secret = i32::from_be_bytes(body[4..8].try_into().unwrap());
                    r.key = Some((pid, secret));
                }
                _ => {}
            }
            match self.frame().await {
                Some((t, b)) => (tag, body) = (t, b),
                None => {
                    r.closed = true;
                    return r;
                }
            }
        }
    }

    /// Runs `sql` as a simple Query.
    pub async fn query(&mut self, sql: &str) -> Reply {
        let mut out = BytesMut::new();
        pg::query(&mut out, sql);
        self.send(&out).await;
        self.reply().await
    }

    /// Waits up to `wait` for the next message (a notification, say).
    pub async fn next_within(&mut self, wait: Duration) -> Option<(u8, Vec<u8>)> {
        tokio::time::timeout(wait, self.frame())
            .await
            .ok()
            .flatten()
    }

    /// Reads until the server closes the connection; the bytes it sent
    /// meanwhile. Panics if it does not close within `wait`.
    pub async fn until_closed(&mut self, wait: Duration) -> Vec<u8> {
        let mut got = self.buf.to_vec();
        let read = async {
            let mut chunk = [0u8; 4096];
            loop {
                match self.tcp.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&chunk[..n]),
                }
            }
        };
        tokio::time::timeout(wait, read)
            .await
            .expect("the server closes the connection");
        got
    }
}
