//! Hostile inputs and the audit trail: text parameters holding NUL bytes
//! or bytes that are not UTF-8, statements of about 1 MiB, a statement with
//! thousands of parameters. Every command that reaches the target has
//! exactly one row in the audit API, carrying what was sent losslessly
//! (base64, flagged, where it cannot be text), and a session running beside
//! them sees no error.

#[path = "support/raw.rs"]
mod raw;
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::{BufMut, BytesMut};
use gatehouse_pgwire as pg;
use raw::Raw;
use support::{Env, Options};

fn frame(out: &mut BytesMut, tag: u8, body: &[u8]) {
    out.extend_from_slice(&pg::Frame::new(tag, body).raw);
}

/// Parse (unnamed), Bind of text `params`, Execute, Sync.
fn extended(sql: &str, params: &[Option<&[u8]>]) -> BytesMut {
    let mut out = BytesMut::new();
    let mut b = BytesMut::new();
    b.put_u8(0);
    b.put_slice(sql.as_bytes());
    b.put_u8(0);
    b.put_i16(0);
    frame(&mut out, b'P', &b);
    let mut b = BytesMut::new();
    b.put_u8(0);
    b.put_u8(0);
    b.put_i16(0);
    b.put_i16(params.len() as i16);
    for p in params {
        match p {
            Some(v) => {
                b.put_i32(v.len() as i32);
                b.put_slice(v);
            }
            None => b.put_i32(-1),
        }
    }
    b.put_i16(0);
    frame(&mut out, b'B', &b);
    let mut b = BytesMut::new();
    b.put_u8(0);
    b.put_i32(0);
    frame(&mut out, b'E', &b);
    frame(&mut out, b'S', b"");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_a_hostile_client_runs_has_one_lossless_audit_row() {
    let env = Env::start_with(Options {
        allow_plaintext: true,
        ..Default::default()
    })
    .await;
    let addr = env.stack().pg_addr;

    // A bystander runs queries the whole time.
    let stop = Arc::new(AtomicBool::new(false));
    let (ran, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (mut bystander, _) = Raw::login(addr, "bob", &env.token("bob"), &[])
        .await
        .expect("bob logs in");
    let beside = tokio::spawn({
        let (stop, ran, failed) = (stop.clone(), ran.clone(), failed.clone());
        async move {
            while !stop.load(Ordering::Relaxed) {
                let r = bystander.query("SELECT 1").await;
                if r.ok() && r.value() == Some("1") {
                    ran.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });

    let (mut mallory, _) = Raw::login(addr, "mallory", &env.token("mallory"), &[])
        .await
        .expect("mallory logs in");
    // A NUL and bytes that are not UTF-8, as text parameters: the target
    // refuses both (22021), but they reached it, so they are recorded.
    let nul: &[u8] = b"before\0after";
    let not_utf8: &[u8] = b"caf\xe9 \xff";
    for value in [nul, not_utf8] {
        mallory
            .send(&extended("SELECT $1::text", &[Some(value)]))
            .await;
        let r = mallory.reply().await;
        assert_eq!(r.errors.len(), 1, "{r:?}");
        assert_eq!(r.errors[0].code, "22021", "{r:?}");
    }
    // A statement just under what the event log takes runs and is
    // recorded; one of 1 MiB is refused (54000) before it runs.
    let long = format!("SELECT length('{}')", "x".repeat(1000 * 1024));
    let r = mallory.query(&long).await;
    assert_eq!(r.value(), Some("1024000"), "{:?}", r.errors);
    let too_long = format!("SELECT length('{}')", "x".repeat(1 << 20));
    let r = mallory.query(&too_long).await;
    assert_eq!(r.errors.len(), 1, "{r:?}");
    assert_eq!(r.errors[0].code, "54000", "{r:?}");
    // Thousands of parameters, one NULL among them.
    let n = 5000;
    let sql = format!(
        "SELECT cardinality(array_remove(ARRAY[{}], NULL))",
        (1..=n)
            .map(|i| format!("${i}::text"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let values: Vec<String> = (1..=n).map(|i| i.to_string()).collect();
    let mut params: Vec<Option<&[u8]>> = values.iter().map(|v| Some(v.as_bytes())).collect();
    params[41] = None;
    mallory.send(&extended(&sql, &params)).await;
    let r = mallory.reply().await;
    assert_eq!(r.value(), Some("4999"), "{:?}", r.errors);

    stop.store(true, Ordering::Relaxed);
    beside.await.unwrap();
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "the bystander saw errors"
    );
    assert!(ran.load(Ordering::Relaxed) > 0);

    let audit = env.audit_commands("mallory", 4).await;
    assert_eq!(
        audit.len(),
        4,
        "one row per command: {:?}",
        audit.iter().map(|c| &c["statement"]).collect::<Vec<_>>()
    );
    for (row, sent) in audit[..2].iter().zip([nul, not_utf8]) {
        let p = &row["params"][0];
        assert_eq!(p["format"], "text", "{row}");
        assert_eq!(p["encoding"], "base64", "{row}");
        assert_eq!(STANDARD.decode(p["value"].as_str().unwrap()).unwrap(), sent);
    }
    assert_eq!(audit[2]["statement"].as_str().unwrap().len(), long.len());
    let many = audit[3]["params"].as_array().unwrap();
    assert_eq!(many.len(), n);
    assert_eq!(many[0]["value"], "1");
    assert!(many[0].get("encoding").is_none(), "plain text stays text");
    assert!(many[41]["value"].is_null());
    env.cleanup().await;
}
