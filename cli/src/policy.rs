//! `gatehouse policy validate|test|push|rollback|dry-run|keygen`: the
//! policy author's and administrator's tools.

use std::path::PathBuf;

use anyhow::{Context, bail};
use gatehouse_policies::{Bundle, Engine};

#[derive(clap::Subcommand, Debug)]
pub enum PolicyCommand {
    /// Parse the Cedar files of DIR and validate them against the schema;
    /// problems are reported as file:line:column.
    Validate { dir: PathBuf },
    /// Run the request corpora (tests.toml files) next to the policies of
    /// DIR and compare every decision with the expected one.
    Test { dir: PathBuf },
    /// Validate DIR and publish it through the control plane as the
    /// current bundle; every worker applies it at its sessions' next command.
    Push {
        dir: PathBuf,
        /// The control plane's base URL.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        api: String,
        /// A file holding a token whose groups include the policy admin
        /// group (`policy.admin_group`, default `policy-admins`). Without
        /// it, the token is read from the environment variable
        /// GATEHOUSE_TOKEN. (Never from the command line, where `ps` shows it.)
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// A label kept with the bundle (the control plane assigns the
        /// version).
        #[arg(long)]
        label: Option<String>,
    },
    /// Publish an earlier version's policies again, under a new version;
    /// recorded as a rollback.
    Rollback {
        /// The version to go back to.
        version: u64,
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        api: String,
        /// As for `push`: a token file, else GATEHOUSE_TOKEN.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
    },
    /// Record would-be denials on some targets without enforcing them, for
    /// a while (at most 24h); `--off` ends it now. Read-only sessions
    /// (agents) stay enforced.
    DryRun {
        /// A target (repeatable).
        #[arg(long = "target", conflicts_with_all = ["all_targets", "off"])]
        targets: Vec<String>,
        /// Every target.
        #[arg(long, conflicts_with = "off")]
        all_targets: bool,
        /// How long, e.g. 30m, 2h (at most 24h).
        #[arg(long = "for", value_name = "DURATION", required_unless_present = "off")]
        duration: Option<String>,
        /// End the dry-run now.
        #[arg(long)]
        off: bool,
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        api: String,
        /// As for `push`: a token file, else GATEHOUSE_TOKEN.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
    },
    /// Make an Ed25519 key for the control plane to sign bundles with
    /// (`policy.signing_key_file`) and print its public key, the value for
    /// workers' `policy.bundle_public_keys`.
    Keygen {
        /// Where to write the private key (PKCS#8 PEM); not overwritten.
        #[arg(long)]
        out: PathBuf,
    },
}

pub async fn run(cmd: PolicyCommand) -> anyhow::Result<()> {
    match cmd {
        PolicyCommand::Validate { dir } => {
            let (bundle, engine) = load(&dir)?;
            for w in engine.warnings() {
                println!("{w}");
            }
            println!(
                "{}: {} policies in {} files are valid (hash {})",
                dir.display(),
                engine.policy_ids().len(),
                bundle.files.len(),
                &bundle.hash[..12]
            );
            Ok(())
        }
        PolicyCommand::Test { dir } => {
            let report = gatehouse_policies::run_tests(&dir).map_err(|e| anyhow::anyhow!("{e}"))?;
            let text = report.to_string();
            println!("{}", text.trim_end());
            if report.results.is_empty() {
                bail!(
                    "no test cases found under {} (tests.toml files)",
                    dir.display()
                );
            }
            if !report.is_success() {
                bail!(
                    "{} of {} policy tests failed",
                    report.failed(),
                    report.results.len()
                );
            }
            Ok(())
        }
        PolicyCommand::Push {
            dir,
            api,
            token_file,
            label,
        } => {
            let token = push_token(token_file.as_deref(), std::env::var("GATEHOUSE_TOKEN").ok())?;
            let (bundle, _) = load(&dir)?;
            let body = serde_json::json!({
                "label": label.unwrap_or(bundle.label),
                "files": bundle.files,
                "schema": bundle.schema,
            });
            let (status, reply) =
                call(&api, &token, "POST", "/api/v1/policies", Some(body)).await?;
            if status == reqwest::StatusCode::OK {
                println!(
                    "unchanged: version {} already has these policies",
                    reply["version"]
                );
            } else {
                println!(
                    "published version {} (hash {})",
                    reply["version"],
                    reply["hash"].as_str().unwrap_or("?")
                );
            }
            Ok(())
        }
        PolicyCommand::Rollback {
            version,
            api,
            token_file,
        } => {
            let token = push_token(token_file.as_deref(), std::env::var("GATEHOUSE_TOKEN").ok())?;
            let body = serde_json::json!({ "version": version });
            let (_, reply) = call(
                &api,
                &token,
                "POST",
                "/api/v1/policies/rollback",
                Some(body),
            )
            .await?;
            println!(
                "published version {} with the policies of version {version}",
                reply["version"]
            );
            Ok(())
        }
        PolicyCommand::DryRun {
            targets,
            all_targets,
            duration,
            off,
            api,
            token_file,
        } => {
            let token = push_token(token_file.as_deref(), std::env::var("GATEHOUSE_TOKEN").ok())?;
            if off {
                let (_, reply) =
                    call(&api, &token, "DELETE", "/api/v1/policies/dry-run", None).await?;
                println!("dry-run ended (version {})", reply["version"]);
                return Ok(());
            }
            let duration = duration.expect("clap requires --for without --off");
            let secs = gatehouse_identity::parse_ttl(&duration)
                .map_err(|e| anyhow::anyhow!("--for: {e}"))?
                .as_secs();
            let body = serde_json::json!({
                "targets": targets,
                "all_targets": all_targets,
                "expires_in_secs": secs,
            });
            let (_, reply) =
                call(&api, &token, "POST", "/api/v1/policies/dry-run", Some(body)).await?;
            println!(
                "dry-run until {} (version {})",
                reply["dry_run"]["expires_at"].as_str().unwrap_or("?"),
                reply["version"]
            );
            Ok(())
        }
        PolicyCommand::Keygen { out } => {
            let (key, der) = gatehouse_policystore::SigningKey::generate();
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&out)
                .with_context(|| format!("--out: cannot create {}", out.display()))?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            }
            use std::io::Write;
            file.write_all(gatehouse_policystore::signing::pkcs8_pem(&der).as_bytes())?;
            println!("{}", key.public_key());
            Ok(())
        }
    }
}

/// Calls the control plane; a refusal is an error with its message and
/// details.
async fn call(
    api: &str,
    token: &str,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<(reqwest::StatusCode, serde_json::Value)> {
    let (status, text) = call_raw(api, token, method, path, body).await?;
    Ok((status, serde_json::from_str(&text).unwrap_or_default()))
}

/// [`call`], with the reply's body as the control plane sent it.
pub(crate) async fn call_raw(
    api: &str,
    token: &str,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<(reqwest::StatusCode, String)> {
    let url = format!("{}{path}", api.trim_end_matches('/'));
    let client = reqwest::Client::new();
    let mut request = match method {
        "GET" => client.get(&url),
        "DELETE" => client.delete(&url),
        _ => client.post(&url),
    }
    .bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("cannot reach the control plane at {api}"))?;
    let status = response.status();
    let text = response
        .text()
        .await
        .with_context(|| format!("cannot read the control plane's reply ({status})"))?;
    if !status.is_success() {
        let reply: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        let mut msg = format!(
            "the control plane refused ({status}): {}",
            reply["error"].as_str().unwrap_or("no detail")
        );
        for d in reply["details"].as_array().into_iter().flatten() {
            msg.push_str(&format!("\n  {}", d.as_str().unwrap_or_default()));
        }
        bail!(msg);
    }
    Ok((status, text))
}

fn load(dir: &std::path::Path) -> anyhow::Result<(Bundle, Engine)> {
    let bundle = Bundle::from_dir(dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    let engine = Engine::new(&bundle).map_err(|e| {
        let problems: Vec<String> = e.problems().iter().map(|p| p.to_string()).collect();
        if problems.is_empty() {
            anyhow::anyhow!("{}: {e}", dir.display())
        } else {
            anyhow::anyhow!("{} is not valid:\n{}", dir.display(), problems.join("\n"))
        }
    })?;
    Ok((bundle, engine))
}

/// The token for `policy push`: from `--token-file`, else `GATEHOUSE_TOKEN`.
fn push_token(file: Option<&std::path::Path>, env: Option<String>) -> anyhow::Result<String> {
    api_token(file, env, "include the policy admin group")
}

/// A token for the control plane's API: from `--token-file`, else
/// `GATEHOUSE_TOKEN` (`env`); never from the command line. `groups` says
/// what the token's groups must do, for the error without one.
pub(crate) fn api_token(
    file: Option<&std::path::Path>,
    env: Option<String>,
    groups: &str,
) -> anyhow::Result<String> {
    let token = match file {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("--token-file: cannot read {}", path.display()))?,
        None => env.with_context(|| {
            format!(
                "no token: set GATEHOUSE_TOKEN or pass --token-file FILE (a token whose groups \
                 {groups})"
            )
        })?,
    };
    let token = token.trim().to_owned();
    if token.is_empty() {
        bail!(
            "{}: the token is empty",
            if file.is_some() {
                "--token-file"
            } else {
                "GATEHOUSE_TOKEN"
            }
        );
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_push_token_comes_from_a_file_or_the_environment() {
        let dir = std::env::temp_dir().join(format!("gh-token-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "from-file\n").unwrap();
        assert_eq!(
            push_token(Some(&file), Some("env".into())).unwrap(),
            "from-file"
        );
        assert_eq!(
            push_token(None, Some("from-env".into())).unwrap(),
            "from-env"
        );
        let e = push_token(None, None).unwrap_err().to_string();
        assert!(
            e.contains("GATEHOUSE_TOKEN") && e.contains("--token-file"),
            "{e}"
        );
        let e = push_token(Some(&dir.join("missing")), None)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--token-file:"), "{e}");
        std::fs::write(&file, "\n").unwrap();
        assert!(push_token(Some(&file), None).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
