//! Real command-line clients through the worker: psql (a script with several
//! statements, `\copy` both ways) and pgbench (initialisation with DDL and
//! COPY, then select-only runs over the simple and the extended protocol),
//! with what they did checked on the target and in the audit API.

mod support;

use std::process::Output;

use support::Env;
use tokio::process::Command;

/// Runs `program` with `args` and the token as `PGPASSWORD`; the output
/// whatever the exit status.
async fn run(program: &str, args: &[&str], token: &str) -> Output {
    Command::new(program)
        .args(args)
        .env("PGPASSWORD", token)
        .env("PGCONNECT_TIMEOUT", "10")
        // Nothing from the environment of the machine may change the run.
        .env_remove("PGSERVICE")
        .env_remove("PGSSLROOTCERT")
        .env_remove("PGOPTIONS")
        .env("PSQLRC", "/dev/null")
        .kill_on_drop(true)
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `program`, panicking with its output unless it exits with 0.
async fn run_ok(program: &str, args: &[&str], token: &str) -> Output {
    let out = run(program, args, token).await;
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

/// Whitespace-insensitive form of a statement (psql builds `\copy`'s
/// `COPY … FROM STDIN` with spaces of its own).
fn squash(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_script_with_copy_in_and_out() {
    let env = Env::start().await;
    let user = "psql-user";
    let token = env.token(user);
    let dir = &env.data_dir;
    let copy_in = dir.join("fruit-in.tsv");
    let copy_out = dir.join("fruit-out.csv");
    std::fs::write(&copy_in, "3\tcherry\t7\n4\tdate\t11\n5\tfig\t\\N\n").unwrap();

    let script = format!(
        "CREATE TABLE fruit (id int PRIMARY KEY, name text NOT NULL, qty int);\n\
         INSERT INTO fruit VALUES (1, 'apple', 2), (2, 'banana', 5);\n\
         \\copy fruit FROM '{copy_in}'\n\
         BEGIN;\n\
         UPDATE fruit SET qty = qty * 10 WHERE id >= 3;\n\
         DELETE FROM fruit WHERE qty IS NULL;\n\
         COMMIT;\n\
         \\copy (SELECT id, name, qty FROM fruit ORDER BY id) TO '{copy_out}' WITH (FORMAT csv)\n\
         SELECT name || '=' || qty FROM fruit ORDER BY id;\n\
         SELECT count(*), sum(qty) FROM fruit;\n",
        copy_in = copy_in.display(),
        copy_out = copy_out.display(),
    );
    let script_path = dir.join("script.sql");
    std::fs::write(&script_path, &script).unwrap();

    let conninfo = env.conninfo(user, "app", "require");
    let out = run_ok(
        "psql",
        &[
            &conninfo,
            "-v",
            "ON_ERROR_STOP=1",
            "-X",
            "-At",
            "-f",
            script_path.to_str().unwrap(),
        ],
        &token,
    )
    .await;
    let stdout = text(&out.stdout);
    assert_eq!(
        stdout,
        "CREATE TABLE\n\
         INSERT 0 2\n\
         COPY 3\n\
         BEGIN\n\
         UPDATE 3\n\
         DELETE 1\n\
         COMMIT\n\
         COPY 4\n\
         apple=2\n\
         banana=5\n\
         cherry=70\n\
         date=110\n\
         4|187\n",
        "stderr:\n{}",
        text(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(&copy_out).unwrap(),
        "1,apple,2\n2,banana,5\n3,cherry,70\n4,date,110\n"
    );

    // A query whose output is read back on its own, over the same path.
    let out = run_ok(
        "psql",
        &[
            &conninfo,
            "-v",
            "ON_ERROR_STOP=1",
            "-X",
            "-At",
            "-c",
            "SELECT string_agg(name, ',' ORDER BY id) FROM fruit",
        ],
        &token,
    )
    .await;
    assert_eq!(text(&out.stdout), "apple,banana,cherry,date\n");

    // The target holds it.
    let direct = env.target().await;
    let n: i64 = direct
        .query_one("SELECT sum(qty) FROM fruit", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 187);

    // Every statement psql sent, exactly once, in order: psql sends a
    // statement with its terminating semicolon, and builds `\copy`'s COPY
    // with spacing of its own.
    let expected = [
        "CREATE TABLE fruit (id int PRIMARY KEY, name text NOT NULL, qty int);",
        "INSERT INTO fruit VALUES (1, 'apple', 2), (2, 'banana', 5);",
        "COPY fruit FROM STDIN",
        "BEGIN;",
        "UPDATE fruit SET qty = qty * 10 WHERE id >= 3;",
        "DELETE FROM fruit WHERE qty IS NULL;",
        "COMMIT;",
        "COPY ( SELECT id, name, qty FROM fruit ORDER BY id ) TO STDOUT WITH (FORMAT csv)",
        "SELECT name || '=' || qty FROM fruit ORDER BY id;",
        "SELECT count(*), sum(qty) FROM fruit;",
        "SELECT string_agg(name, ',' ORDER BY id) FROM fruit",
    ];
    let audit = env.audit_commands(user, expected.len()).await;
    let statements: Vec<String> = audit
        .iter()
        .map(|c| squash(c["statement"].as_str().unwrap()))
        .collect();
    assert_eq!(statements, expected, "{audit:#?}");
    let mut ids: Vec<&str> = audit
        .iter()
        .map(|c| c["event_id"].as_str().unwrap())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), expected.len());
    for c in &audit {
        assert_eq!(c["protocol"], "simple", "{c}");
        assert_eq!(c["target"], "app");
        assert_eq!(c["identity_username"], user);
    }
    env.cleanup().await;
}

/// `number of transactions actually processed: N` from pgbench's report.
fn processed(stdout: &str) -> u64 {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("number of transactions actually processed:"))
        .unwrap_or_else(|| panic!("no transaction count in:\n{stdout}"));
    line.split(':')
        .nth(1)
        .unwrap()
        .trim()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_initialises_and_runs_over_both_protocols() {
    let env = Env::start().await;
    let user = "bench-user";
    let token = env.token(user);
    let conninfo = env.conninfo(user, "app", "require");

    // Initialisation: DROP/CREATE TABLE, COPY of 100 000 rows, VACUUM,
    // primary keys.
    run_ok("pgbench", &["-i", "-s", "1", &conninfo], &token).await;
    let direct = env.target().await;
    let n: i64 = direct
        .query_one("SELECT count(*) FROM pgbench_accounts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 100_000);

    let mut total = 0;
    for protocol in ["simple", "extended"] {
        let out = run_ok(
            "pgbench",
            &["-S", "-M", protocol, "-T", "3", "-c", "4", "-n", &conninfo],
            &token,
        )
        .await;
        let stdout = text(&out.stdout);
        let done = processed(&stdout);
        assert!(done > 0, "no transactions ran over {protocol}:\n{stdout}");
        assert!(
            stdout.contains(&format!("query mode: {protocol}")),
            "{stdout}"
        );
        if let Some(failed) = stdout
            .lines()
            .find(|l| l.starts_with("number of failed transactions:"))
        {
            assert!(failed.contains(": 0 "), "{stdout}");
        }
        eprintln!("pgbench -M {protocol}: {done} transactions");
        total += done;
    }

    // Each select-only transaction is one statement execution, so at least
    // as many commands as transactions were recorded (plus initialisation).
    let audit = env.audit_commands(user, total as usize).await;
    assert!(
        audit.len() as u64 >= total,
        "{} commands recorded for {total} transactions",
        audit.len()
    );
    let selects = |protocol: &str| {
        audit
            .iter()
            .filter(|c| {
                c["protocol"] == protocol
                    && c["statement"]
                        .as_str()
                        .unwrap()
                        .contains("FROM pgbench_accounts WHERE aid =")
            })
            .count()
    };
    assert!(selects("simple") > 0 && selects("extended") > 0);
    assert!(
        audit
            .iter()
            .any(|c| squash(c["statement"].as_str().unwrap()).starts_with("copy pgbench_accounts")),
        "the initialisation COPY is recorded"
    );
    env.cleanup().await;
}
