//! `gatehouse approvals list|show|grant|deny` and `gatehouse access`, the
//! binary itself, against a real stack: a session's DELETE waits for an
//! approval that an approver lists, reads and grants (or denies) from the
//! command line; a person asks for access and waits while an approver
//! grants it.

mod support;

use std::process::Output;
use std::time::Duration;

use serde_json::Value;
use support::Env;
use tokio::process::Command;

/// Runs `gatehouse approvals ARGS` against `env`'s control plane with
/// `token` as GATEHOUSE_TOKEN (none if `None`); the output whatever the
/// exit status.
async fn approvals(env: Option<&Env>, token: Option<&str>, args: &[&str]) -> Output {
    gatehouse(env, token, "approvals", args).await
}

/// Runs `gatehouse COMMAND ARGS` as [`approvals`] does.
async fn gatehouse(env: Option<&Env>, token: Option<&str>, command: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gatehouse"));
    cmd.arg(command).args(args);
    if let Some(env) = env {
        cmd.args(["--api", &env.api("")]);
    }
    cmd.env_remove("GATEHOUSE_TOKEN");
    if let Some(token) = token {
        cmd.env("GATEHOUSE_TOKEN", token);
    }
    cmd.kill_on_drop(true)
        .output()
        .await
        .expect("the gatehouse binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Its stdout, after checking that it exited with 0.
fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approver_lists_shows_and_grants_from_the_command_line() {
    let env = Env::start_with(support::Options {
        bundle: gatehouse_policies::Bundle::defaults(),
        ..Default::default()
    })
    .await;
    env.target()
        .await
        .batch_execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1), (2)")
        .await
        .unwrap();
    let alice = env
        .try_connect("alice", &env.stack().token("alice", &[]))
        .await
        .expect("connects");
    let waiting = tokio::spawn(async move {
        let deleted = alice.execute("DELETE FROM t", &[]).await;
        (alice, deleted)
    });
    let pending = env.pending_approvals(1).await;
    let id = pending[0]["id"].as_str().unwrap().to_string();
    let dave = env.stack().api_token("dave", &["approvers"]);

    let out = ok(
        &approvals(Some(&env), Some(&dave), &["list"]).await,
        "approvals list",
    );
    let line = out
        .lines()
        .find(|l| l.contains(&id))
        .unwrap_or_else(|| panic!("{id} listed:\n{out}"));
    for expected in ["pending", "alice", "DELETE FROM t", "app", "0/1"] {
        assert!(line.contains(expected), "{expected:?} in {line:?}");
    }
    // Nothing granted yet.
    let out = ok(
        &approvals(Some(&env), Some(&dave), &["list", "--state", "granted"]).await,
        "approvals list --state granted",
    );
    assert!(!out.contains(&id), "{out}");
    // The API's JSON as it is.
    let out = ok(
        &approvals(Some(&env), Some(&dave), &["list", "--json"]).await,
        "approvals list --json",
    );
    let json: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(json["approvals"][0]["id"], id.as_str(), "{out}");

    // The token from a file.
    let token_file = env.data_dir.join("approver-token");
    std::fs::write(&token_file, format!("{dave}\n")).unwrap();
    let out = ok(
        &approvals(
            Some(&env),
            None,
            &["show", &id, "--token-file", token_file.to_str().unwrap()],
        )
        .await,
        "approvals show",
    );
    for expected in [
        id.as_str(),
        "DELETE FROM t",
        "unbounded-write-needs-approval",
        "alice",
        "pending: 0 of 1 approvals",
    ] {
        assert!(out.contains(expected), "{expected:?} in:\n{out}");
    }
    assert_eq!(env.target_ids().await, [1, 2], "nothing ran yet");

    let out = ok(
        &approvals(Some(&env), Some(&dave), &["grant", &id, "--comment", "ok"]).await,
        "approvals grant",
    );
    assert!(out.contains("granted"), "{out}");
    let (alice, deleted) = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("the DELETE completes once granted")
        .unwrap();
    assert_eq!(deleted.unwrap(), 2);
    assert!(env.target_ids().await.is_empty());

    // The grant is shown with who, when and why.
    let out = ok(
        &approvals(Some(&env), Some(&dave), &["show", &id]).await,
        "approvals show (granted)",
    );
    assert!(out.contains("dave at ") && out.contains(": ok"), "{out}");

    // Decided: a second grant is refused, with the API's message.
    let out = approvals(Some(&env), Some(&dave), &["grant", &id]).await;
    let err = text(&out.stderr);
    assert!(!out.status.success(), "a second grant succeeded: {err}");
    assert!(
        err.contains("409") && err.contains("already granted"),
        "{err}"
    );

    // A denial: the next one never runs.
    env.target()
        .await
        .batch_execute("INSERT INTO t VALUES (3)")
        .await
        .unwrap();
    let waiting = tokio::spawn(async move { alice.execute("DELETE FROM t", &[]).await });
    let pending = env.pending_approvals(1).await;
    let second = pending[0]["id"].as_str().unwrap().to_string();
    assert_ne!(second, id);
    let out = ok(
        &approvals(
            Some(&env),
            Some(&dave),
            &["deny", &second, "--comment", "not now"],
        )
        .await,
        "approvals deny",
    );
    assert!(out.contains("denied"), "{out}");
    let refused = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("the DELETE ends once denied")
        .unwrap();
    assert!(refused.is_err(), "a denied DELETE ran: {refused:?}");
    assert_eq!(env.target_ids().await, [3]);
    let out = ok(
        &approvals(Some(&env), Some(&dave), &["list", "--state", "denied"]).await,
        "approvals list --state denied",
    );
    assert!(out.contains(&second), "{out}");

    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denial_without_a_comment_is_a_usage_error() {
    let id = "6f1c2d7e-0000-4000-8000-000000000001";
    let out = approvals(None, Some("unused"), &["deny", id]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("--comment"),
        "{}",
        text(&out.stderr)
    );
    // And no token is ever taken from the command line.
    let out = approvals(None, None, &["list", "--token", "secret"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_asks_for_access_and_waits_while_an_approver_grants_it() {
    let env = Env::start().await;
    let alice = env.stack().api_token("alice", &["dev"]);
    let dave = env.stack().api_token("dave", &["approvers"]);
    let api = env.api("");
    let asking = {
        let (alice, api) = (alice.clone(), api.clone());
        tokio::spawn(async move {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_gatehouse"));
            cmd.args(["access", "request", "--target", "app", "--for", "30m"])
                .args(["--reason", "migration 42", "--scope", "ddl", "--wait"])
                .args(["--api", &api])
                .env("GATEHOUSE_TOKEN", alice)
                .kill_on_drop(true);
            cmd.output().await.expect("the gatehouse binary runs")
        })
    };
    let pending = env.pending_approvals(1).await;
    let id = pending[0]["id"].as_str().unwrap().to_string();
    let out = ok(
        &approvals(Some(&env), Some(&dave), &["list"]).await,
        "approvals list",
    );
    assert!(
        out.contains("ddl access for 30 min: migration 42"),
        "listed as what it asks for:\n{out}"
    );
    ok(
        &approvals(Some(&env), Some(&dave), &["grant", &id]).await,
        "approvals grant",
    );
    let asked = tokio::time::timeout(Duration::from_secs(20), asking)
        .await
        .expect("the request returns once decided")
        .unwrap();
    let out = ok(&asked, "access request --wait");
    assert!(
        out.contains(&format!("access request {id} is pending")),
        "{out}"
    );
    assert!(out.contains("granted: in force until"), "{out}");

    let out = ok(
        &gatehouse(Some(&env), Some(&alice), "access", &["list"]).await,
        "access list",
    );
    assert!(out.contains(&id) && out.contains("granted"), "{out}");
    let out = ok(
        &gatehouse(Some(&env), Some(&alice), "access", &["show", &id]).await,
        "access show",
    );
    assert!(out.contains("access:       ddl for 30 min"), "{out}");
    let out = ok(
        &gatehouse(Some(&env), Some(&alice), "access", &["revoke", &id]).await,
        "access revoke",
    );
    assert_eq!(out.trim(), format!("access request {id}: revoked"));
    // Asked without a reason: refused before anything is sent.
    let out = gatehouse(
        Some(&env),
        Some(&alice),
        "access",
        &["request", "--target", "app", "--for", "30m"],
    )
    .await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--reason"),
        "{}",
        text(&out.stderr)
    );
    env.cleanup().await;
}
