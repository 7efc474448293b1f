//! What a client asks for at startup, through a worker with real clients
//! and the built-in defaults: every startup parameter and every `-c` in
//! `options` is a setting, decided as the `SET` it amounts to and then in
//! force on the target, or refused at connect with a `FATAL` naming it
//! (and recorded); a setting the target does not take gets the target's
//! own `FATAL`. A first packet that is no startup at all is closed without
//! a word, as PostgreSQL closes it.

#[path = "support/raw.rs"]
mod raw;
mod support;

use std::time::Duration;

use raw::Raw;
use support::{Env, Options};

/// A session through the worker over TLS with `options`, as `user` in
/// `groups`.
async fn with_options(
    env: &Env,
    user: &str,
    groups: &[&str],
    options: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut config: tokio_postgres::Config = env.conninfo(user, "app", "require").parse().unwrap();
    config.password(env.stack().token(user, groups));
    config.options(options);
    let (client, conn) = config.connect(env.tls()).await?;
    tokio::spawn(conn);
    Ok(client)
}

async fn show(client: &tokio_postgres::Client, name: &str) -> String {
    client
        .query_one(&format!("SHOW {name}"), &[])
        .await
        .unwrap()
        .get(0)
}

/// The reasons of the projected `authentication_failures` of `user`, once
/// there are `expect` (or after ~10 s, with what there is).
async fn failures(env: &Env, user: &str, expect: usize) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let reasons: Vec<String> = env
            .audit_query::<(String,)>(
                "SELECT reason FROM authentication_failures WHERE claimed_user = $1 ORDER BY time",
                &[user],
            )
            .await
            .into_iter()
            .map(|(r,)| r)
            .collect();
        if reasons.len() >= expect || tokio::time::Instant::now() > deadline {
            return reasons;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A refused connection's `(severity, SQLSTATE, message)`.
fn fatal(err: &tokio_postgres::Error) -> (String, String, String) {
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("expected an ErrorResponse, got {err:?}"));
    (
        db.severity().to_string(),
        db.code().code().to_string(),
        db.message().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_in_options_and_startup_parameters_are_in_force() {
    let env = Env::start_with(Options {
        allow_plaintext: true,
        ..Options::default()
    })
    .await;
    env.target()
        .await
        .batch_execute("CREATE SCHEMA s1; CREATE TABLE s1.only_here (v text); INSERT INTO s1.only_here VALUES ('found')")
        .await
        .unwrap();

    // A driver's `options`, in each of PostgreSQL's spellings.
    let alice = with_options(
        &env,
        "alice",
        &[],
        "-c default_transaction_isolation=serializable -cwork_mem=1234kB \
         --statement-timeout=7s -c application_name=two\\ words",
    )
    .await
    .expect("settings in options are allowed");
    assert_eq!(show(&alice, "transaction_isolation").await, "serializable");
    assert_eq!(show(&alice, "work_mem").await, "1234kB");
    assert_eq!(show(&alice, "statement_timeout").await, "7s");
    assert_eq!(show(&alice, "application_name").await, "two words");

    // Any setting as a startup parameter of its own; one given both ways
    // is the parameter's, as PostgreSQL applies options first.
    let token = env.stack().token("bob", &[]);
    let (mut bob, login) = Raw::login(
        env.stack().pg_addr,
        "bob",
        &token,
        &[
            ("options", "-c search_path=nowhere"),
            ("search_path", "s1, public"),
            ("idle_in_transaction_session_timeout", "12345"),
            ("DateStyle", "SQL, DMY"),
        ],
    )
    .await
    .expect("settings as startup parameters are allowed");
    assert!(
        login
            .parameters
            .contains(&("DateStyle".into(), "SQL, DMY".into())),
        "{:?}",
        login.parameters
    );
    // What the target says about the worker's own login (it logs in as
    // postgres, a superuser) is shown as the client's.
    for (name, shown) in [("session_authorization", "bob"), ("is_superuser", "off")] {
        assert!(
            login.parameters.contains(&(name.into(), shown.into())),
            "{name}: {:?}",
            login.parameters
        );
    }
    let r = bob.query("SHOW search_path").await;
    assert_eq!(r.value(), Some("s1, public"), "{r:?}");
    let r = bob.query("SHOW idle_in_transaction_session_timeout").await;
    assert_eq!(r.value(), Some("12345ms"), "{r:?}");
    let r = bob.query("SELECT v FROM only_here").await;
    assert_eq!(r.value(), Some("found"), "{r:?}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cannot_start_a_writable_session() {
    let env = Env::start_with(Options {
        allow_plaintext: true,
        ..Options::default()
    })
    .await;

    let err = with_options(
        &env,
        "bot",
        &["agents"],
        "-c default_transaction_read_only=off",
    )
    .await
    .expect_err("an agent turning read-only mode off");
    let (severity, code, message) = fatal(&err);
    assert_eq!((severity.as_str(), code.as_str()), ("FATAL", "42501"));
    assert!(
        message.contains("\"default_transaction_read_only\"") && message.contains("read-only"),
        "{message}"
    );

    // The same as startup parameters of their own, and a change of role
    // (which agents may not SET either).
    let token = env.stack().token("bot", &["agents"]);
    for (name, value) in [
        ("default_transaction_read_only", "false"),
        ("transaction_read_only", "0"),
        ("role", "postgres"),
    ] {
        let refused = Raw::login(env.stack().pg_addr, "bot", &token, &[(name, value)])
            .await
            .err()
            .unwrap_or_else(|| panic!("{name}={value} was allowed"));
        let e = &refused.errors[0];
        assert_eq!((e.severity.as_str(), e.code.as_str()), ("FATAL", "42501"));
        assert!(e.message.contains(&format!("\"{name}\"")), "{e:?}");
    }
    assert_eq!(failures(&env, "bot", 4).await, ["setting_denied"; 4]);

    // An agent may ask for what it has anyway; the session stays
    // read-only on the target.
    let bot = with_options(
        &env,
        "bot",
        &["agents"],
        "-c default_transaction_read_only=on -c search_path=public",
    )
    .await
    .expect("read-only mode, asked for");
    assert_eq!(show(&bot, "default_transaction_read_only").await, "on");
    assert_eq!(show(&bot, "search_path").await, "public");
    // A person may turn it off (the defaults let anyone SET it).
    let alice = with_options(&env, "alice", &[], "-c default_transaction_read_only=off")
        .await
        .expect("a person's setting");
    assert_eq!(show(&alice, "default_transaction_read_only").await, "off");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_other_than_settings_are_refused_by_name() {
    let env = Env::start().await;
    for (user, options, code, named) in [
        ("carol", "-d 5", "0A000", "\"-d\""),
        ("dave", "-c search_path=public -B 100", "0A000", "\"-B\""),
        (
            "erin",
            "-c search_path",
            "42601",
            "-c search_path requires a value",
        ),
        ("frank", "public", "42601", "\"public\""),
    ] {
        let err = with_options(&env, user, &[], options)
            .await
            .err()
            .unwrap_or_else(|| panic!("{options:?} was allowed"));
        let (severity, c, message) = fatal(&err);
        assert_eq!(
            (severity.as_str(), c.as_str()),
            ("FATAL", code),
            "{message}"
        );
        assert!(message.contains(named), "{options}: {message}");
        assert_eq!(failures(&env, user, 1).await, ["options_refused"]);
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_setting_the_target_refuses_gets_the_targets_own_error() {
    let env = Env::start().await;
    for (user, options, code, message) in [
        (
            "gina",
            "-c no_such_setting=1",
            "42704",
            "unrecognized configuration parameter \"no_such_setting\"",
        ),
        (
            "hank",
            "-c shared_buffers=1MB",
            "55P02",
            "parameter \"shared_buffers\" cannot be changed without restarting the server",
        ),
        (
            "ida",
            "-c work_mem=lots",
            "22023",
            "invalid value for parameter \"work_mem\": \"lots\"",
        ),
    ] {
        let err = with_options(&env, user, &[], options)
            .await
            .err()
            .unwrap_or_else(|| panic!("{options:?} was allowed"));
        let (severity, c, m) = fatal(&err);
        assert_eq!((severity.as_str(), c.as_str()), ("FATAL", code), "{m}");
        assert_eq!(m, message);
        assert_eq!(failures(&env, user, 1).await, ["target_refused"]);
    }
    // A custom setting (with a dot) is the target's to take, and it does.
    let client = with_options(&env, "jo", &[], "-c myapp.tenant=42")
        .await
        .unwrap();
    assert_eq!(show(&client, "myapp.tenant").await, "42");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_packet_that_is_no_startup_is_closed_without_a_word() {
    // TLS required: a plaintext startup is refused, and recorded.
    let env = Env::start().await;
    let addr = env.stack().pg_addr;

    let terminate: &[u8] = b"X\0\0\0\x04";
    let http: &[u8] = b"GET / HTTP/1.1\r\nHost: gatehouse\r\n\r\n";
    let too_long: &[u8] = &[0, 1, 0, 0, 0, 3, 0, 0];
    let too_short: &[u8] = &[0, 0, 0, 4];
    for packet in [terminate, http, too_long, too_short] {
        let mut raw = Raw::open(addr).await;
        raw.send(packet).await;
        // The client keeps its side open: the worker closes at once.
        let answer = raw.until_closed(Duration::from_secs(5)).await;
        assert!(answer.is_empty(), "{packet:?} was answered: {answer:?}");
    }
    // Nothing at all, or a partial length.
    drop(Raw::open(addr).await);
    let mut raw = Raw::open(addr).await;
    raw.send(&[0, 0]).await;
    drop(raw);

    // A real attempt after them is still refused with a word, and recorded;
    // it is the only failure recorded.
    let err = Raw::login(addr, "probe", "not-a-token", &[])
        .await
        .err()
        .expect("plaintext refused");
    assert_eq!(err.errors[0].code, "28000");
    assert_eq!(failures(&env, "probe", 1).await, ["tls_required"]);
    let all = env
        .audit_count("SELECT count(*) FROM authentication_failures", &[])
        .await;
    assert_eq!(all, 1, "a packet that was no startup was recorded");
    // The worker is unharmed.
    let client = env.connect("alice").await;
    client.simple_query("SELECT 1").await.unwrap();
    env.cleanup().await;
}
