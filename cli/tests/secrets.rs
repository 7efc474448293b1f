//! Secrets in commands never reach the event log: a password in role DDL,
//! the value of a setting named like a secret (in the text, or bound as a
//! parameter), a connection string with a password. Each command runs (or
//! is refused) as sent; what is recorded has `'[redacted]'` in the
//! secret's place and says what was withheld. The proof reads every
//! message of the test's event stream, raw, and everything the gateway
//! logged meanwhile at every level.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use serde_json::Value;
use support::Env;

/// Everything logged, kept in memory.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Everything the gateway logs, at every level, from here on: its own
/// crates and the clients it uses (the test's own PostgreSQL client, which
/// logs its parameters, is not the gateway). Installed once for the tests
/// of this file, before any stack starts, so it is the one.
fn capture_logs() -> Logs {
    static LOGS: std::sync::OnceLock<Logs> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Logs::default();
        let sink = logs.clone();
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "gatehouse=trace,gatehouse_worker=trace,gatehouse_control_plane=trace,\
                 gatehouse_eventlog=trace,gatehouse_policystore=trace,gatehouse_policies=trace,\
                 gatehouse_identity=trace,sqlx=trace,async_nats=trace",
            ))
            .with_writer(move || sink.clone())
            .init();
        logs
    })
    .clone()
}

/// Every line logged so far, none with a secret.
fn assert_no_secret_logged(logs: &Logs) {
    let logged = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    assert!(
        logged.contains("gatehouse"),
        "the gateway's logs were captured"
    );
    for line in logged.lines() {
        assert!(
            !line.contains("sekret"),
            "a secret reached the logs: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_in_commands_are_not_recorded() {
    let logs = capture_logs();
    let env = Env::start().await;
    let client = env.connect("alice").await;
    let role = format!("gh_secret_{}", env.suffix);

    // Role DDL, rolled back: the role never exists.
    client.batch_execute("BEGIN").await.unwrap();
    let _ = client
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN PASSWORD 'sekret-role-1'"
        ))
        .await;
    client.batch_execute("ROLLBACK").await.unwrap();
    // A setting named like a secret, in the text and as a parameter: the
    // session has the values, the log does not.
    client
        .batch_execute("SET app.api_token = 'sekret-setting-2'")
        .await
        .unwrap();
    let shown: String = client
        .query_one("SELECT current_setting('app.api_token')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(shown, "sekret-setting-2", "the command ran as sent");
    let bound: String = client
        .query_one(
            "SELECT set_config('app.secret', $1, false)",
            &[&"sekret-param-3"],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(bound, "sekret-param-3");
    // A connection string with a password, as a literal and as a value.
    let _ = client
        .query_one("SELECT 'host=db user=u password=sekret-conn-4'::text", &[])
        .await
        .unwrap();
    let _ = client
        .query_one("SELECT $1::text", &[&"postgresql://u:sekret-url-5@db/app"])
        .await
        .unwrap();
    client
        .batch_execute("SELECT 'the last command'")
        .await
        .unwrap();

    let commands = env.audit_commands("alice", 8).await;
    let texts: Vec<&str> = commands
        .iter()
        .map(|c| c["statement"].as_str().unwrap())
        .collect();
    assert!(
        texts.contains(&"SET app.api_token = '[redacted]'"),
        "{texts:#?}"
    );
    assert!(texts.contains(&"SELECT '[redacted]'::text"), "{texts:#?}");
    assert!(
        texts
            .iter()
            .any(|t| t.starts_with(&format!("CREATE ROLE {role} LOGIN PASSWORD '[redacted]'"))),
        "{texts:#?}"
    );
    assert_eq!(texts.last(), Some(&"SELECT 'the last command'"));

    // The raw log: every event the test's session produced, none with a
    // secret; the redactions say what was withheld, and where a parameter.
    let bodies = env.stream_bodies().await;
    assert!(
        bodies.iter().any(|b| b.contains("the last command")),
        "stream read in full"
    );
    // Bound values sent in binary go to the log as base64.
    let encoded = ["sekret-param-3", "postgresql://u:sekret-url-5@db/app"]
        .map(|v| base64::engine::general_purpose::STANDARD.encode(v));
    for body in &bodies {
        assert!(!body.contains("sekret"), "a secret reached the log: {body}");
        for e in &encoded {
            assert!(
                !body.contains(e.as_str()),
                "a secret reached the log as base64: {body}"
            );
        }
    }
    let events: Vec<Value> = bodies
        .iter()
        .flat_map(|b| match serde_json::from_str::<Value>(b).unwrap() {
            Value::Array(events) => events,
            one => vec![one],
        })
        .collect();
    let payloads: Vec<&Value> = events
        .iter()
        .map(|e| &e["data"]["payload"])
        .filter(|p| p.get("redactions").is_some())
        .collect();
    let param_redacted = payloads.iter().any(|p| {
        p["statement"] == "SELECT set_config('app.secret', $1, false)"
            && p["params"][0]["value"] == "'[redacted]'"
            && p["redactions"][0]["param"] == 1
    });
    assert!(param_redacted, "{payloads:#?}");
    let url_redacted = payloads.iter().any(|p| {
        p["statement"] == "SELECT $1::text" && p["redactions"][0]["kind"] == "connection_string"
    });
    assert!(url_redacted, "{payloads:#?}");
    drop(client);
    env.cleanup().await;
    assert_no_secret_logged(&logs);
}

/// Secrets that stand elsewhere than right after their name: in a `DO`
/// body, as the argument of an `EXECUTE` whose prepared statement takes a
/// secret there, as the inserted value of a secret column, inside a
/// function call, under a key of a JSON document, given to pgcrypto, given
/// to a setting whose name is bound too. Each command runs as sent (or is refused) and is
/// recorded without the secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_in_bodies_executes_and_inserts_are_not_recorded() {
    let logs = capture_logs();
    let env = Env::start().await;
    let client = env.connect("alice").await;
    let role = format!("gh_body_{}", env.suffix);

    // Refused for alice (dynamic code is for dba) and recorded either way.
    let _ = client
        .batch_execute(&format!(
            "DO $$BEGIN CREATE ROLE {role} LOGIN PASSWORD 'sekret-body-1'; END$$"
        ))
        .await;
    client
        .batch_execute("PREPARE keep(text) AS SELECT set_config('app.secret', $1, false)")
        .await
        .unwrap();
    client
        .batch_execute("EXECUTE keep('sekret-exec-2')")
        .await
        .unwrap();
    let shown: String = client
        .query_one("SELECT current_setting('app.secret')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(shown, "sekret-exec-2", "the EXECUTE ran as sent");
    client
        .batch_execute("CREATE TEMP TABLE creds (name text, password text)")
        .await
        .unwrap();
    client
        .batch_execute("INSERT INTO creds (name, password) VALUES ('a', 'sekret-insert-3')")
        .await
        .unwrap();
    client
        .batch_execute("UPDATE creds SET password = md5('sekret-update-4') WHERE name = 'a'")
        .await
        .unwrap();
    // A setting whose name is bound too.
    let named: String = client
        .query_one(
            "SELECT set_config($1, $2, false)",
            &[&"app.api_token", &"sekret-named-8"],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(named, "sekret-named-8");
    // A password given to pgcrypto (recorded whether or not the target
    // has the extension).
    let _ = client
        .batch_execute("SELECT crypt('sekret-crypt-7', '$1$salt')")
        .await;
    // JSON documents with a secret key, as a literal and as a value.
    client
        .batch_execute(r#"SELECT '{"auth": {"token": "sekret-json-5"}}'::jsonb"#)
        .await
        .unwrap();
    let _ = client
        .query_one(
            "SELECT $1::text::jsonb",
            &[&r#"{"api_key": "sekret-json-6"}"#],
        )
        .await
        .unwrap();
    client
        .batch_execute("SELECT 'the last command'")
        .await
        .unwrap();

    let commands = env.audit_commands("alice", 12).await;
    let texts: Vec<&str> = commands
        .iter()
        .map(|c| c["statement"].as_str().unwrap())
        .collect();
    for want in [
        "SELECT crypt('[redacted]', '$1$salt')".to_string(),
        "SELECT '[redacted]'::jsonb".to_string(),
        format!("DO $$BEGIN CREATE ROLE {role} LOGIN PASSWORD '[redacted]'; END$$"),
        "EXECUTE keep('[redacted]')".to_string(),
        "INSERT INTO creds (name, password) VALUES ('a', '[redacted]')".to_string(),
        "UPDATE creds SET password = '[redacted]' WHERE name = 'a'".to_string(),
    ] {
        assert!(texts.contains(&want.as_str()), "{want}: {texts:#?}");
    }
    assert_eq!(texts.last(), Some(&"SELECT 'the last command'"));
    let bodies = env.stream_bodies().await;
    assert!(
        bodies.iter().any(|b| b.contains("the last command")),
        "stream read in full"
    );
    let encoded = [r#"{"api_key": "sekret-json-6"}"#, "sekret-named-8"]
        .map(|v| base64::engine::general_purpose::STANDARD.encode(v));
    for body in &bodies {
        assert!(!body.contains("sekret"), "a secret reached the log: {body}");
        for e in &encoded {
            assert!(
                !body.contains(e.as_str()),
                "a secret reached the log as base64: {body}"
            );
        }
    }
    drop(client);
    env.cleanup().await;
    assert_no_secret_logged(&logs);
}
