//! Responses are masked in the stream for those no `unmask` permit applies
//! to: in text rows (psql, simple queries), in binary rows (tokio-postgres),
//! in COPY TO STDOUT and in the values PostgreSQL quotes in an error. A
//! member of `pii-readers` sees the same rows as they are.

mod support;

use futures::StreamExt;
use gatehouse_worker::masking::{ColumnRuleConfig, MaskingConfig, StyleName};
use support::{Env, Options};
use tokio::process::Command;

const EMAIL: &str = "alice@example.com";
const SSN: &str = "123-45-6789";
const CARD: &str = "4111 1111 1111 1111";
/// Fails the Luhn check: not a card number.
const NOT_A_CARD: &str = "4111 1111 1111 1112";
const NESTED_EMAIL: &str = "bob@example.org";

async fn masked_env() -> Env {
    let env = Env::start_with(Options {
        masking: Some(MaskingConfig {
            columns: vec![
                ColumnRuleConfig {
                    pattern: "users.ssn".into(),
                    style: StyleName::Partial,
                    keep_last: 4,
                },
                ColumnRuleConfig {
                    pattern: "nickname".into(),
                    style: StyleName::Redact,
                    keep_last: 4,
                },
            ],
            ..Default::default()
        }),
        ..Default::default()
    })
    .await;
    env.target()
        .await
        .batch_execute(&format!(
            "CREATE TABLE users (id int PRIMARY KEY, email text UNIQUE, ssn text, \
             card text, profile jsonb, nickname text, age int);
             INSERT INTO users VALUES
               (1, '{EMAIL}', '{SSN}', '{CARD}',
                '{{\"contact\": \"{NESTED_EMAIL}\", \"n\": 1}}', 'ally', 41),
               (2, 'no e-mail', '987-65-4321', '{NOT_A_CARD}', '{{\"n\": 2}}', 'bo', 7);"
        ))
        .await
        .unwrap();
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_are_masked_in_text_binary_copy_and_errors() {
    let env = masked_env().await;
    let client = env.connect("mallory").await;

    // Binary rows (tokio-postgres asks for every column in binary).
    let rows = client
        .query(
            "SELECT email, ssn, card, profile::text, nickname, age, profile \
             FROM users ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    let first = &rows[0];
    assert_eq!(first.get::<_, String>(0), "[masked:email]");
    assert_eq!(
        first.get::<_, String>(1),
        "***-**-6789",
        "a column rule, partial"
    );
    assert_eq!(first.get::<_, String>(2), "[masked:payment_card]");
    let profile: String = first.get(3);
    assert!(
        profile.contains("[masked:email]") && !profile.contains(NESTED_EMAIL),
        "{profile}"
    );
    assert_eq!(
        first.get::<_, String>(4),
        "[masked]",
        "a column with a rule is masked whole though it holds nothing a detector finds"
    );
    assert_eq!(first.get::<_, i32>(5), 41, "other types are left alone");
    let jsonb = first.get::<_, Jsonb>(6).0;
    assert_eq!(
        jsonb["contact"], "[masked:email]",
        "jsonb in binary: {jsonb}"
    );
    let second = &rows[1];
    assert_eq!(second.get::<_, String>(0), "no e-mail");
    assert_eq!(
        second.get::<_, String>(2),
        NOT_A_CARD,
        "a number that fails the Luhn check is no card"
    );

    // The rule follows the column, not its name in the result.
    let aliased: String = client
        .query_one("SELECT ssn AS x FROM users WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(aliased, "***-**-6789");

    // Text rows, through the simple protocol.
    let text = client
        .simple_query("SELECT email, ssn FROM users WHERE id = 1")
        .await
        .unwrap();
    let row = text
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .unwrap();
    assert_eq!(row.get(0), Some("[masked:email]"));
    assert_eq!(row.get(1), Some("***-**-6789"));

    // COPY data names no columns, so column rules could not apply to it:
    // refused, with the session going on.
    let err = client
        .copy_out("COPY users (id, email) TO STDOUT")
        .await
        .err()
        .expect("refused");
    assert_eq!(err.as_db_error().unwrap().code().code(), "42501", "{err}");

    // A unique violation quotes the value it collided with.
    let err = client
        .execute(
            "INSERT INTO users (id, email) SELECT 3, email FROM users WHERE id = 1",
            &[],
        )
        .await
        .unwrap_err();
    let db = err.as_db_error().expect("a database error");
    assert_eq!(db.code().code(), "23505");
    let detail = db.detail().unwrap_or_default();
    assert!(
        !detail.contains(EMAIL) && detail.contains("[masked:email]"),
        "{detail}"
    );
    // A failing row quotes every value of the row.
    let err = client
        .execute("UPDATE users SET id = NULL WHERE id = 1", &[])
        .await
        .unwrap_err();
    let db = err.as_db_error().unwrap();
    assert_eq!(db.code().code(), "23502");
    let detail = db.detail().unwrap_or_default();
    assert!(
        detail.starts_with("Failing row contains")
            && !detail.contains(SSN)
            && !detail.contains(EMAIL),
        "{detail}"
    );

    // What is in the target is what was there.
    let direct: String = env
        .target()
        .await
        .query_one("SELECT email FROM users WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(direct, EMAIL);

    // The responses are recorded as the client got them.
    drop(client);
    let bodies = until_recorded(&env, "SELECT 2").await;
    let selected = responses(&bodies)
        .into_iter()
        .find(|r| {
            r["summary"]["tags"][0] == "SELECT 2" && cell(&r["rows"][0][0]) == "[masked:email]"
        })
        .expect("the first SELECT's response is recorded");
    assert_eq!(selected["last"], true);
    assert_eq!(cell(&selected["rows"][0][1]), "***-**-6789");
    assert!(
        selected["rows"][0][1]["base64"].is_string(),
        "binary values are recorded as base64"
    );
    assert_eq!(cell(&selected["rows"][1][0]), "no e-mail");
    let text = responses(&bodies)
        .into_iter()
        .find(|r| r["rows"][0][0] == "[masked:email]")
        .expect("the simple query's text rows are recorded as text");
    assert_eq!(text["rows"][0][1], "***-**-6789");
    assert_eq!(selected["summary"]["rows"], 2);
    assert_eq!(selected["summary"]["truncated"], false);
    // The e-mail column, the profile as text and as jsonb; one card.
    let masked = &selected["summary"]["masked"];
    assert_eq!(masked["detectors"]["email"], 3, "{selected}");
    assert_eq!(masked["detectors"]["payment_card"], 1, "{selected}");
    assert!(
        responses(&bodies)
            .iter()
            .any(|r| r["summary"]["error"] == "23505"),
        "the failed INSERT's response says how it failed"
    );

    // No raw value in anything the session recorded.
    assert!(!bodies.is_empty());
    for raw in [EMAIL, SSN, CARD, NESTED_EMAIL] {
        assert!(
            !bodies.iter().any(|b| b.contains(raw)),
            "{raw} is in the event log"
        );
    }
    env.cleanup().await;
}

/// A value computed from a rule column, or read through a view of one, is
/// masked as the column is: the rule follows the column into expressions,
/// subqueries, CTEs, set operations, whole rows, cursors and views (over
/// views). A pii-reader sees them clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn computed_values_and_views_are_masked_like_their_columns() {
    let env = masked_env().await;
    env.target()
        .await
        .batch_execute(
            "CREATE VIEW contacts AS SELECT id, ssn AS tax_id, upper(nickname) AS nick FROM users;
             CREATE VIEW contacts_again AS SELECT tax_id AS t, id FROM contacts;
             CREATE FUNCTION ssn_of(i int) RETURNS text LANGUAGE sql
               AS 'SELECT ssn FROM users WHERE id = i';
             CREATE TABLE users_archive () INHERITS (users);
             INSERT INTO users_archive (id, ssn) VALUES (3, '555-12-3456');
             ANALYZE users;",
        )
        .await
        .unwrap();
    let client = env.connect("mallory").await;
    let one = |sql: &'static str| {
        let client = &client;
        async move {
            let row = client.query_one(sql, &[]).await.unwrap();
            row.get::<_, Option<String>>(0).unwrap_or_default()
        }
    };
    for sql in [
        "SELECT upper(ssn) FROM users WHERE id = 1",
        "SELECT ssn || '' FROM users WHERE id = 1",
        "SELECT (SELECT max(ssn) FROM users WHERE id = 1)",
        "SELECT x FROM (SELECT upper(ssn) AS x, id FROM users) q WHERE id = 1",
        "WITH c AS (SELECT ssn, id FROM users) SELECT c.ssn || '' FROM c WHERE id = 1",
        "SELECT ssn FROM users WHERE id = 1 UNION ALL SELECT 'x' LIMIT 1",
        "SELECT tax_id FROM contacts WHERE id = 1",
        "SELECT lower(tax_id) FROM contacts WHERE id = 1",
        "SELECT t FROM contacts_again WHERE id = 1",
    ] {
        assert_eq!(one(sql).await, "***-**-6789", "{sql}");
    }
    // The rule on users.ssn covers its children (and partitions).
    assert_eq!(
        one("SELECT ssn FROM users_archive").await,
        "***-**-3456",
        "an inheritance child"
    );
    for sql in [
        "SELECT coalesce(nickname, '') FROM users WHERE id = 1",
        "SELECT nick FROM contacts WHERE id = 1",
        "SELECT format('%s!', nickname) FROM users WHERE id = 1",
    ] {
        assert_eq!(one(sql).await, "[masked]", "{sql}");
    }
    for sql in [
        "SELECT row_to_json(u)::text FROM users u WHERE id = 1",
        "SELECT u::text FROM users u WHERE id = 1",
        "SELECT to_jsonb(c.*)::text FROM contacts c WHERE id = 1",
    ] {
        let v = one(sql).await;
        assert!(!v.contains("45-67") && !v.contains("ally"), "{sql}: {v}");
    }
    // A function defined in the database reads what the text does not
    // name; one that runs SQL given as text, too.
    assert_eq!(one("SELECT ssn_of(1)").await, "[masked]");
    assert_eq!(
        one("SELECT x FROM (SELECT ssn_of(id) AS x FROM users WHERE id = 1) q").await,
        "[masked]"
    );
    match client
        .query_one(
            "SELECT query_to_xml('SELECT ssn FROM users', true, true, '')::text",
            &[],
        )
        .await
    {
        Ok(row) => assert!(!row.get::<_, String>(0).contains("45-67")),
        Err(e) => assert_eq!(e.as_db_error().unwrap().code().code(), "42501", "{e}"),
    }
    // The planner's statistics hold sample values of every column.
    let mut sampled = false;
    for row in client
        .simple_query(
            "SELECT most_common_vals, histogram_bounds::text FROM pg_stats \
             WHERE tablename = 'users' AND attname IN ('nickname', 'ssn')",
        )
        .await
        .unwrap()
    {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = row {
            for v in [r.get(0), r.get(1)].into_iter().flatten() {
                sampled = true;
                assert_eq!(v, "[masked]");
            }
        }
    }
    assert!(sampled, "ANALYZE gathered statistics");
    // A failed cast quotes the value it failed on.
    let err = client
        .query_one("SELECT nickname::int FROM users WHERE id = 1", &[])
        .await
        .unwrap_err();
    let db = err.as_db_error().expect("a database error");
    assert_eq!(db.code().code(), "22P02");
    assert!(
        !db.message().contains("ally") && db.message().contains("[masked]"),
        "{}",
        db.message()
    );
    // So does a lookup by name (in a filter, too), and the failed cast of
    // a value computed from a masked column.
    for sql in [
        "SELECT 1 FROM users WHERE id = 1 AND nickname::regclass IS NOT NULL",
        "SELECT ('x' || nickname)::regrole FROM users WHERE id = 1",
    ] {
        let err = client.query_one(sql, &[]).await.unwrap_err();
        let db = err.as_db_error().expect("a database error");
        assert!(
            !db.message().contains("ally") && db.message().contains("[masked]"),
            "{sql}: {}",
            db.message()
        );
    }
    // A binary value of another type computed from a rule column: NULL.
    let row = client
        .query_one("SELECT length(nickname), id FROM users WHERE id = 1", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<i32>>(0), None);
    assert_eq!(row.get::<_, i32>(1), 1);
    // Columns computed from others stay as they are.
    assert_eq!(
        one("SELECT upper(email) || id FROM users WHERE id = 2").await,
        "NO E-MAIL2"
    );
    // A cursor's rows: their text is not at hand, so what is computed in
    // them is masked wherever there are column rules.
    let text = client
        .simple_query(
            "BEGIN; DECLARE c CURSOR FOR SELECT upper(nickname), id FROM users ORDER BY id; \
             FETCH 1 FROM c; COMMIT",
        )
        .await
        .unwrap();
    let fetched: Vec<_> = text
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some((r.get(0), r.get(1))),
            _ => None,
        })
        .collect();
    assert_eq!(fetched, [(Some("[masked]"), Some("1"))]);

    // A copy would not be masked: storing one is refused (also through a
    // function that keeps its argument).
    for sql in [
        "CREATE TEMP TABLE copied AS SELECT ssn AS x FROM users",
        "SELECT upper(nickname) AS n INTO TEMP copied FROM users",
        "CREATE TEMP VIEW copied AS SELECT ssn AS x FROM users",
        "SELECT set_config('app.copied', nickname, false) FROM users",
    ] {
        let err = client.batch_execute(sql).await.unwrap_err();
        let db = err.as_db_error().expect("a database error");
        assert_eq!(db.code().code(), "42501", "{sql}: {}", db.message());
        assert!(
            db.message().contains("masks columns") || db.message().contains("masked column"),
            "{sql}: {}",
            db.message()
        );
    }
    client
        .batch_execute("CREATE TEMP TABLE kept AS SELECT id, age FROM users")
        .await
        .expect("what stores nothing masked goes on");

    // A pii-reader sees them clear.
    let token = env.stack().token("priya", &["pii-readers"]);
    let mut config: tokio_postgres::Config =
        env.conninfo("priya", "app", "require").parse().unwrap();
    config.password(token);
    let (reader, conn) = config.connect(env.tls()).await.unwrap();
    tokio::spawn(conn);
    reader
        .batch_execute("CREATE TEMP TABLE copied AS SELECT ssn AS x FROM users")
        .await
        .expect("a pii-reader may copy");
    for (sql, want) in [
        (
            "SELECT x FROM copied ORDER BY x DESC LIMIT 1",
            "987-65-4321",
        ),
        ("SELECT upper(ssn) FROM users WHERE id = 1", SSN),
        ("SELECT t FROM contacts_again WHERE id = 1", SSN),
        ("SELECT nick FROM contacts WHERE id = 1", "ALLY"),
    ] {
        let row = reader.query_one(sql, &[]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), want, "{sql}");
    }
    // What mallory was answered is recorded masked too (the pii-reader's
    // responses are recorded masked as well).
    drop((client, reader));
    let bodies = until_recorded(&env, "SELECT 1").await;
    assert!(responses(&bodies).len() >= 10, "the responses are recorded");
    for raw in [SSN, "987-65-4321", "555-12-3456", "\"ALLY\"", "\"ally\""] {
        assert!(
            !bodies.iter().any(|b| b.contains(raw)),
            "{raw} is in the event log"
        );
    }
    env.cleanup().await;
}

/// Without column rules, COPY data goes through the detectors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_out_is_masked_by_the_detectors() {
    let env = Env::start().await;
    env.target()
        .await
        .batch_execute(&format!(
            "CREATE TABLE users (id int, email text, card text);
             INSERT INTO users VALUES (1, '{EMAIL}', '{CARD}'), (2, 'none', '{NOT_A_CARD}');"
        ))
        .await
        .unwrap();
    let client = env.connect("mallory").await;
    let copied = copy_out(&client, "COPY users TO STDOUT").await;
    assert_eq!(
        copied,
        format!("1\t[masked:email]\t[masked:payment_card]\n2\tnone\t{NOT_A_CARD}\n")
    );
    let csv = copy_out(&client, "COPY (SELECT * FROM users) TO STDOUT (FORMAT csv)").await;
    assert!(
        csv.starts_with("1,[masked:email],[masked:payment_card]\n"),
        "{csv}"
    );
    let binary = copy_out(&client, "COPY users (email) TO STDOUT (FORMAT binary)").await;
    assert!(
        !binary.contains(EMAIL) && binary.contains("[masked:email]"),
        "{binary:?}"
    );
    drop(client);
    let bodies = until_recorded(&env, "COPY 2").await;
    for raw in [EMAIL, CARD] {
        assert!(
            !bodies.iter().any(|b| b.contains(raw)),
            "{raw} is in the event log"
        );
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_shows_masked_values_and_pii_readers_see_them_clear() {
    let env = masked_env().await;
    let sql = "SELECT email, ssn, nickname FROM users WHERE id = 1";
    let masked = psql(&env, &env.token("mallory"), "mallory", sql).await;
    assert_eq!(masked, "[masked:email]|***-**-6789|[masked]\n");
    let token = env.stack().token("priya", &["pii-readers"]);
    let clear = psql(&env, &token, "priya", sql).await;
    assert_eq!(clear, format!("{EMAIL}|{SSN}|ally\n"));

    let mut config: tokio_postgres::Config =
        env.conninfo("priya", "app", "require").parse().unwrap();
    config.password(token);
    let (client, conn) = config.connect(env.tls()).await.unwrap();
    tokio::spawn(conn);
    let row = client
        .query_one("SELECT email, card, profile FROM users WHERE id = 1", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), EMAIL);
    assert_eq!(row.get::<_, String>(1), CARD);
    let profile = row.get::<_, Jsonb>(2).0;
    assert_eq!(profile["contact"], NESTED_EMAIL);
    let copied = copy_out(&client, "COPY users (email, ssn) TO STDOUT").await;
    assert!(copied.starts_with(&format!("{EMAIL}\t{SSN}\n")), "{copied}");

    // What a pii-reader saw clear is recorded masked all the same.
    drop(client);
    let bodies = until_recorded(&env, "SELECT 1").await;
    let recorded = responses(&bodies);
    assert!(recorded.len() >= 3, "{recorded:?}");
    for raw in [EMAIL, SSN, CARD, NESTED_EMAIL] {
        assert!(
            !bodies.iter().any(|b| b.contains(raw)),
            "{raw} is in the event log"
        );
    }
    assert!(
        recorded
            .iter()
            .any(|r| cell(&r["rows"][0][0]) == "[masked:email]"
                && cell(&r["rows"][0][1]) == "[masked:payment_card]"),
        "{recorded:?}"
    );
    env.cleanup().await;
}

/// A `jsonb` value in binary: a version byte, then JSON.
struct Jsonb(serde_json::Value);

impl<'a> tokio_postgres::types::FromSql<'a> for Jsonb {
    fn from_sql(
        _: &tokio_postgres::types::Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let (version, json) = raw.split_first().ok_or("empty jsonb")?;
        assert_eq!(*version, 1);
        Ok(Jsonb(serde_json::from_slice(json)?))
    }

    fn accepts(t: &tokio_postgres::types::Type) -> bool {
        *t == tokio_postgres::types::Type::JSONB
    }
}

async fn psql(env: &Env, token: &str, user: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args([
            &env.conninfo(user, "app", "require"),
            "-X",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ])
        .env("PGPASSWORD", token)
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGSERVICE")
        .env_remove("PGOPTIONS")
        .env("PSQLRC", "/dev/null")
        .kill_on_drop(true)
        .output()
        .await
        .expect("psql runs");
    assert!(
        out.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

async fn copy_out(client: &tokio_postgres::Client, sql: &str) -> String {
    let stream = client.copy_out(sql).await.unwrap();
    let chunks: Vec<bytes::Bytes> = stream.map(|c| c.unwrap()).collect().await;
    String::from_utf8_lossy(&chunks.concat()).into_owned()
}

/// A recorded value as text: a string, or the bytes of `{"base64": …}`.
fn cell(v: &serde_json::Value) -> String {
    use base64::Engine as _;
    match v["base64"].as_str() {
        Some(b) => {
            String::from_utf8_lossy(&base64::engine::general_purpose::STANDARD.decode(b).unwrap())
                .into_owned()
        }
        None => v.as_str().unwrap_or_default().to_string(),
    }
}

/// The payloads of the `ResponseRecorded` events in `bodies`.
fn responses(bodies: &[String]) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for b in bodies {
        let v: serde_json::Value = serde_json::from_str(b).unwrap();
        let events = match v {
            serde_json::Value::Array(a) => a,
            one => vec![one],
        };
        for e in events {
            if e["type"] == "dev.gatehouse.response_recorded.v1" {
                out.push(e["data"]["payload"].clone());
            }
        }
    }
    out
}

/// The stream's bodies, once a response with `tag` and the last session's
/// end are recorded.
async fn until_recorded(env: &Env, tag: &str) -> Vec<String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let bodies = env.stream_bodies().await;
        let tagged = responses(&bodies)
            .iter()
            .any(|r| r["summary"]["tags"][0] == tag);
        let closed = bodies
            .iter()
            .filter(|b| b.contains("dev.gatehouse.session_closed.v1"))
            .count();
        if tagged && closed >= 1 {
            return bodies;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no response tagged {tag}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}
