//! Text in the session's client encoding: statements in legacy encodings
//! run and are recorded as UTF-8, and the worker reads every statement as
//! the server does — in its `client_encoding` (a Shift_JIS character whose
//! second byte is a backslash ends no string) and with its
//! `standard_conforming_strings`, also when a pipelined statement changes
//! them. Clients speak the raw protocol here: drivers insist on UTF8.

mod support;

use bytes::{Buf, BufMut, BytesMut};
use gatehouse_pgwire as pg;
use support::{Env, Options};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What the target answered to one `Query` or `Sync`, up to its
/// ReadyForQuery (or the end of the connection).
#[derive(Debug, Default)]
struct Answer {
    /// Text values of every DataRow, as sent (in the client encoding).
    rows: Vec<Vec<Option<Vec<u8>>>>,
    tags: Vec<String>,
    /// `(severity, SQLSTATE, message)` of every ErrorResponse.
    errors: Vec<(String, String, String)>,
    parameters: Vec<(String, String)>,
    /// The connection ended instead of a ReadyForQuery.
    closed: bool,
}

impl Answer {
    fn codes(&self) -> Vec<&str> {
        self.errors.iter().map(|(_, c, _)| c.as_str()).collect()
    }

    fn ok(&self) -> bool {
        self.errors.is_empty() && !self.closed
    }
}

/// A client speaking the protocol by hand, over plaintext.
struct Raw {
    tcp: TcpStream,
    buf: BytesMut,
}

fn cstrings(mut body: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(nul) = body.iter().position(|&b| b == 0) {
        out.push(String::from_utf8_lossy(&body[..nul]).into_owned());
        body = &body[nul + 1..];
    }
    out
}

impl Raw {
    /// Logs in as `user` (a member of `groups`) with startup `params`; the
    /// refusal when the worker says no.
    async fn connect(
        env: &Env,
        user: &str,
        groups: &[&str],
        params: &[(&str, &str)],
    ) -> Result<Raw, Answer> {
        let tcp = TcpStream::connect(env.stack().pg_addr).await.unwrap();
        let mut raw = Raw {
            tcp,
            buf: BytesMut::new(),
        };
        let mut out = BytesMut::new();
        let mut all = vec![("user", user), ("database", "app")];
        all.extend_from_slice(params);
        pg::startup_message(&mut out, all);
        raw.send(&out).await;
        let (tag, body) = raw.frame().await.expect("an answer to the startup");
        if tag == b'E' {
            return Err(raw.answer_from(tag, body).await);
        }
        assert_eq!((tag, &body[..]), (b'R', &3i32.to_be_bytes()[..]));
        out.clear();
        pg::password_message(&mut out, &env.stack().token(user, groups));
        raw.send(&out).await;
        let answer = raw.answer().await;
        if answer.ok() { Ok(raw) } else { Err(answer) }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.tcp.write_all(bytes).await.unwrap();
    }

    /// The next backend message, `None` when the connection ended.
    async fn frame(&mut self) -> Option<(u8, Vec<u8>)> {
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
    async fn answer(&mut self) -> Answer {
        match self.frame().await {
            Some((tag, body)) => self.answer_from(tag, body).await,
            None => Answer {
                closed: true,
                ..Answer::default()
            },
        }
    }

    async fn answer_from(&mut self, mut tag: u8, mut body: Vec<u8>) -> Answer {
        let mut a = Answer::default();
        loop {
            match tag {
                b'Z' => return a,
                b'D' => {
                    let mut b = &body[..];
                    let n = b.get_i16();
                    let row = (0..n)
                        .map(|_| match b.get_i32() {
                            -1 => None,
                            len => {
                                let v = b[..len as usize].to_vec();
                                b.advance(len as usize);
                                Some(v)
                            }
                        })
                        .collect();
                    a.rows.push(row);
                }
                b'C' => a.tags.extend(cstrings(&body)),
                b'S' => {
                    let s = cstrings(&body);
                    a.parameters.push((s[0].clone(), s[1].clone()));
                }
                b'E' => {
                    let (mut severity, mut code, mut message) = Default::default();
                    let mut b = &body[..];
                    while let Some((&field, rest)) = b.split_first() {
                        if field == 0 {
                            break;
                        }
                        let nul = rest.iter().position(|&x| x == 0).unwrap();
                        let value = String::from_utf8_lossy(&rest[..nul]).into_owned();
                        match field {
                            b'S' => severity = value,
                            b'C' => code = value,
                            b'M' => message = value,
                            _ => {}
                        }
                        b = &rest[nul + 1..];
                    }
                    a.errors.push((severity, code, message));
                }
                _ => {}
            }
            match self.frame().await {
                Some((t, b)) => (tag, body) = (t, b),
                None => {
                    a.closed = true;
                    return a;
                }
            }
        }
    }

    /// Runs `sql` (bytes in the session's encoding) as a simple query.
    async fn query(&mut self, sql: &[u8]) -> Answer {
        let mut out = BytesMut::new();
        pg::query(&mut out, sql);
        self.send(&out).await;
        self.answer().await
    }
}

/// `Parse` (unnamed), `Bind` with text parameters, `Execute`, no `Sync`.
fn extended(out: &mut BytesMut, sql: &[u8], params: &[&[u8]]) {
    let mut body = BytesMut::new();
    body.put_u8(0);
    body.put_slice(sql);
    body.put_u8(0);
    body.put_i16(0);
    out.extend_from_slice(&pg::Frame::new(b'P', &body).raw);
    body.clear();
    body.put_slice(b"\0\0");
    body.put_i16(0);
    body.put_i16(params.len() as i16);
    for p in params {
        body.put_i32(p.len() as i32);
        body.put_slice(p);
    }
    body.put_i16(0);
    out.extend_from_slice(&pg::Frame::new(b'B', &body).raw);
    out.extend_from_slice(&pg::Frame::new(b'E', b"\0\0\0\0\0").raw);
}

fn sync(out: &mut BytesMut) {
    out.extend_from_slice(&pg::Frame::new(b'S', b"").raw);
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

async fn target_rows(env: &Env, sql: &str) -> Vec<String> {
    env.target()
        .await
        .query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn plaintext() -> Options {
    Options {
        allow_plaintext: true,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_in_legacy_encodings_run_and_are_recorded_as_utf8() {
    let env = Env::start_with(plaintext()).await;
    env.target()
        .await
        .batch_execute("CREATE TABLE t (id int, s text)")
        .await
        .unwrap();
    // (client_encoding, text in it, the same in UTF-8). 'ソ' and '表' in
    // Shift_JIS end in 0x5C, a backslash.
    let cases: [(&str, &[u8], &str); 6] = [
        ("LATIN1", b"caf\xe9", "café"),
        ("LATIN9", b"\xa4 caf\xe9", "€ café"),
        ("WIN1252", b"\x80 caf\xe9", "€ café"),
        ("SJIS", b"\x83\x5c\x95\x5c", "ソ表"),
        ("EUC_JP", b"\xa5\xbd\xc9\xbd", "ソ表"),
        // The server converts nothing: UTF-8 bytes go in as they are.
        ("SQL_ASCII", "café".as_bytes(), "café"),
    ];
    for (i, (encoding, text, utf8)) in cases.iter().enumerate() {
        let user = format!("enc-{}", encoding.to_lowercase().replace('_', "-"));
        let mut db = Raw::connect(&env, &user, &[], &[("client_encoding", encoding)])
            .await
            .unwrap_or_else(|a| panic!("{encoding}: {a:?}"));
        let id = (i * 10) as i32;
        let insert = cat(&[
            format!("INSERT INTO t VALUES ({id}, '").as_bytes(),
            text,
            b"')",
        ]);
        let a = db.query(&insert).await;
        assert!(a.ok(), "{encoding}: {a:?}");
        assert_eq!(a.tags, ["INSERT 0 1"], "{encoding}");
        // Extended protocol, with the text in a bound parameter too.
        let mut out = BytesMut::new();
        let sql = cat(&[
            format!("INSERT INTO t VALUES ({} , '", id + 1).as_bytes(),
            text,
            b"' || $1)",
        ]);
        extended(&mut out, &sql, &[text]);
        sync(&mut out);
        db.send(&out).await;
        let a = db.answer().await;
        assert!(a.ok(), "{encoding}: {a:?}");
        // Read back in the client's encoding.
        let a = db
            .query(format!("SELECT s FROM t WHERE id = {id}").as_bytes())
            .await;
        assert_eq!(a.rows, [[Some(text.to_vec())]], "{encoding}");

        // The target holds the right characters.
        assert_eq!(
            target_rows(
                &env,
                &format!("SELECT s FROM t WHERE id IN ({id}, {}) ORDER BY id", id + 1)
            )
            .await,
            [utf8.to_string(), format!("{utf8}{utf8}")],
            "{encoding}"
        );
        // And the audit trail has them as UTF-8, parameters included.
        let audit = env.audit_commands(&user, 3).await;
        assert_eq!(
            audit[0]["statement"],
            format!("INSERT INTO t VALUES ({id}, '{utf8}')"),
            "{encoding}"
        );
        assert_eq!(
            audit[1]["statement"],
            format!("INSERT INTO t VALUES ({} , '{utf8}' || $1)", id + 1)
        );
        assert_eq!(audit[1]["params"][0]["value"], *utf8, "{encoding}");
        assert_eq!(audit[1]["decision"]["effect"], "allow");
    }

    // Set later with SET, not at startup: the worker follows the server.
    let mut db = Raw::connect(&env, "enc-set", &[], &[]).await.unwrap();
    let a = db.query(b"SET client_encoding TO 'SJIS'").await;
    assert!(a.ok(), "{a:?}");
    assert!(
        a.parameters
            .contains(&("client_encoding".into(), "SJIS".into()))
    );
    let a = db.query(b"INSERT INTO t VALUES (100, '\x83\x5c')").await;
    assert!(a.ok(), "{a:?}");
    let a = db.query(b"SET client_encoding TO 'LATIN1'").await;
    assert!(a.ok(), "{a:?}");
    let a = db.query(b"INSERT INTO t VALUES (101, '\xe9')").await;
    assert!(a.ok(), "{a:?}");
    assert_eq!(
        target_rows(&env, "SELECT s FROM t WHERE id >= 100 ORDER BY id").await,
        ["ソ", "é"]
    );
    let statements = env.audit_statements("enc-set", 4).await;
    assert_eq!(statements[1], "INSERT INTO t VALUES (100, 'ソ')");
    assert_eq!(statements[3], "INSERT INTO t VALUES (101, 'é')");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_the_encoding_does_not_allow_is_refused_and_unsupported_encodings_too() {
    let env = Env::start_with(plaintext()).await;
    // A lead byte followed by a quote is no Shift_JIS character.
    let mut db = Raw::connect(&env, "enc-bad", &[], &[("client_encoding", "SJIS")])
        .await
        .unwrap();
    let a = db.query(b"SELECT '\x83'").await;
    assert_eq!(a.codes(), ["22021"], "{a:?}");
    assert!(a.errors[0].2.contains("\"SJIS\""), "{a:?}");
    // In the extended protocol the batch is refused up to its Sync.
    let mut out = BytesMut::new();
    extended(&mut out, b"SELECT '\x83'", &[]);
    sync(&mut out);
    db.send(&out).await;
    let a = db.answer().await;
    assert_eq!(a.codes(), ["22021"], "{a:?}");
    // The session goes on.
    let a = db.query(b"SELECT 1").await;
    assert!(a.ok(), "{a:?}");

    // An encoding the worker cannot read: refused at startup...
    let refused = Raw::connect(&env, "enc-tw", &[], &[("client_encoding", "EUC_TW")])
        .await
        .err()
        .expect("EUC_TW is refused");
    assert_eq!(refused.errors[0].0, "FATAL");
    assert_eq!(refused.errors[0].1, "0A000");
    assert_eq!(
        refused.errors[0].2,
        "client_encoding \"EUC_TW\" is not supported through Gatehouse; \
         use UTF8 or another supported encoding"
    );
    // ... and when set later, the session ends.
    let mut db = Raw::connect(&env, "enc-johab", &[], &[]).await.unwrap();
    let a = db.query(b"SET client_encoding TO 'JOHAB'").await;
    assert!(a.ok(), "{a:?}");
    let a = db.answer().await;
    assert!(a.closed, "{a:?}");
    assert_eq!(a.codes(), ["0A000"], "{a:?}");
    assert!(a.errors[0].2.contains("\"JOHAB\""), "{a:?}");
    env.cleanup().await;
}

/// Connects as a member of the `agents` group (read-only by policy).
async fn agent(env: &Env, name: &str, params: &[(&str, &str)]) -> Raw {
    Raw::connect(env, name, &["agents"], params)
        .await
        .unwrap_or_else(|a| panic!("{a:?}"))
}

/// The agent's write was refused by the worker (not merely by the
/// read-only target session, whose code would be 25006), and nothing
/// reached the table.
async fn refused_by_policy(env: &Env, a: &Answer, what: &str) {
    // (The target may add errors of its own, say for a Parse of two
    // statements; the worker's refusal is there whatever they are.)
    assert!(a.codes().contains(&"42501"), "{what}: {a:?}");
    assert!(
        target_rows(env, "SELECT id::text FROM t").await.is_empty(),
        "{what}: written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quote_hidden_by_the_encoding_or_a_backslash_hides_no_write() {
    let env = Env::start_with(plaintext()).await;
    env.target()
        .await
        .batch_execute("CREATE TABLE t (id int)")
        .await
        .unwrap();

    // Shift_JIS: 0x83 0x5C is 'ソ'. Read as bytes, the 0x5C escapes the
    // quote and the INSERT is inside a string; the server reads it as a
    // statement.
    let mut bot = agent(&env, "bot-sjis", &[("client_encoding", "SJIS")]).await;
    for sql in [
        &b"SELECT E'\x83\x5c'; INSERT INTO t VALUES (1) -- '"[..],
        b"SELECT '\x83\x5c'; INSERT INTO t VALUES (1) -- '",
    ] {
        let a = bot.query(sql).await;
        refused_by_policy(&env, &a, &String::from_utf8_lossy(sql)).await;
    }
    // Reading is still allowed.
    let a = bot.query(b"SELECT '\x83\x5c'").await;
    assert_eq!(a.rows, [[Some(b"\x83\x5c".to_vec())]], "{a:?}");
    let audit = env.audit_commands("bot-sjis", 3).await;
    assert_eq!(
        audit[0]["statement"],
        "SELECT E'ソ'; INSERT INTO t VALUES (1) -- '"
    );
    assert_eq!(audit[0]["decision"]["effect"], "deny");
    assert_eq!(
        audit[0]["decision"]["kinds"],
        serde_json::json!(["select", "insert"])
    );

    // standard_conforming_strings off: `\'` escapes the quote, so the
    // string ends at the next one and the INSERT is a statement.
    let mut bot = agent(&env, "bot-scs", &[]).await;
    let a = bot.query(b"SET standard_conforming_strings = off").await;
    assert!(a.ok(), "{a:?}");
    let a = bot
        .query(b"SELECT 'a\\''; INSERT INTO t VALUES (2); -- '")
        .await;
    refused_by_policy(&env, &a, "backslash-quote").await;
    let a = bot.query(b"SELECT 'it\\'s'").await;
    assert_eq!(a.rows, [[Some(b"it's".to_vec())]], "{a:?}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_after_a_settings_change_is_read_with_the_new_settings() {
    let env = Env::start_with(plaintext()).await;
    env.target()
        .await
        .batch_execute("CREATE TABLE t (id int)")
        .await
        .unwrap();
    // E3 81 81 is 'ぁ' in UTF-8; in Shift_JIS, E3 81 and 81 5C are two
    // characters, and the quote after them ends the string. Valid in both,
    // read differently: the second query must be read in Shift_JIS.
    let attack = &b"SELECT E'\xe3\x81\x81\x5c'; INSERT INTO t VALUES (3) -- '"[..];

    // Simple protocol: both queries in one write.
    let mut bot = agent(&env, "bot-pipe", &[]).await;
    let mut out = BytesMut::new();
    pg::query(&mut out, "SET client_encoding TO 'SJIS'");
    pg::query(&mut out, attack);
    bot.send(&out).await;
    let a = bot.answer().await;
    assert!(a.ok(), "{a:?}");
    let a = bot.answer().await;
    refused_by_policy(&env, &a, "pipelined after SET").await;
    let audit = env.audit_commands("bot-pipe", 2).await;
    assert_eq!(
        audit[1]["statement"],
        "SELECT E'縺―'; INSERT INTO t VALUES (3) -- '"
    );

    // Extended protocol: a statement after the change, before Sync, is
    // refused, and as after any error the server rolls the batch back, the
    // change with it; after a Sync that commits it, text is read in the new
    // encoding.
    let mut bot = agent(&env, "bot-batch", &[]).await;
    let mut out = BytesMut::new();
    extended(&mut out, b"SET client_encoding TO 'SJIS'", &[]);
    extended(&mut out, attack, &[]);
    sync(&mut out);
    extended(&mut out, attack, &[]);
    sync(&mut out);
    bot.send(&out).await;
    let a = bot.answer().await;
    assert_eq!(a.codes(), ["0A000"], "{a:?}");
    assert!(a.errors[0].2.contains("send Sync"), "{a:?}");
    assert!(
        !a.parameters
            .contains(&("client_encoding".into(), "SJIS".into())),
        "rolled back with the batch: {a:?}"
    );
    // Still UTF-8: one SELECT of one string.
    let a = bot.answer().await;
    assert!(a.ok(), "{a:?}");
    let mut out = BytesMut::new();
    extended(&mut out, b"SET client_encoding TO 'SJIS'", &[]);
    sync(&mut out);
    extended(&mut out, attack, &[]);
    sync(&mut out);
    bot.send(&out).await;
    let a = bot.answer().await;
    assert!(
        a.parameters
            .contains(&("client_encoding".into(), "SJIS".into())),
        "{a:?}"
    );
    let a = bot.answer().await;
    refused_by_policy(&env, &a, "after Sync").await;

    // A session that used COPY through a driver (which sends a Sync the
    // server ignores during COPY) still gets past a settings change.
    let db = env.connect("copier").await;
    db.batch_execute("CREATE TABLE c (s text)").await.unwrap();
    let sink = db.copy_in("COPY c FROM STDIN").await.unwrap();
    futures::pin_mut!(sink);
    futures::SinkExt::send(&mut sink, bytes::Bytes::from_static(b"x\n"))
        .await
        .unwrap();
    sink.finish().await.unwrap();
    db.batch_execute("SET standard_conforming_strings = off")
        .await
        .unwrap();
    let row = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        db.simple_query("SELECT 'it\\'s'"),
    )
    .await
    .expect("no wait for a ReadyForQuery that never comes")
    .unwrap();
    let tokio_postgres::SimpleQueryMessage::Row(row) = &row[1] else {
        panic!("{row:?}")
    };
    assert_eq!(row.get(0), Some("it's"));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_nothing_foresaw_ends_a_session_with_text_in_flight() {
    let env = Env::start_with(plaintext()).await;
    // A function that changes how later text is read, where the classifier
    // cannot see it: created straight on the target.
    env.target()
        .await
        .batch_execute(
            "CREATE FUNCTION quiet() RETURNS text LANGUAGE plpgsql AS \
             $$ BEGIN RETURN set_config('standard_conforming_strings', 'off', false); END $$",
        )
        .await
        .unwrap();
    // Alone, it is harmless: nothing else was read with the old setting,
    // and the next statement is read with the new one.
    let mut db = Raw::connect(&env, "quiet-alone", &[], &[]).await.unwrap();
    let a = db.query(b"SELECT quiet()").await;
    assert!(a.ok(), "{a:?}");
    let a = db.query(b"SELECT 'it\\'s'").await;
    assert_eq!(a.rows, [[Some(b"it's".to_vec())]], "{a:?}");

    // With the next statement already sent, that statement was read with
    // the old setting: the session ends.
    let mut db = Raw::connect(&env, "quiet-pipelined", &[], &[])
        .await
        .unwrap();
    let mut out = BytesMut::new();
    pg::query(&mut out, "SELECT quiet()");
    pg::query(&mut out, "SELECT 1");
    db.send(&out).await;
    let a = db.answer().await;
    assert!(a.closed, "{a:?}");
    assert_eq!(a.codes(), ["0A000"], "{a:?}");
    assert!(a.errors[0].2.contains("could not foresee"), "{a:?}");
    env.cleanup().await;
}
