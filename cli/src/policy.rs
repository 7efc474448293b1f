//! `gatehouse policy validate|test|push`: the policy author's tools.

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
        /// A token whose groups include the policy admin group
        /// (`policy.admin_group`, default `policy-admins`).
        #[arg(long, env = "GATEHOUSE_TOKEN", hide_env_values = true)]
        token: String,
        /// Version label; default: the UTC time and the hash prefix.
        #[arg(long)]
        version: Option<String>,
        /// Record would-be denials without enforcing them.
        #[arg(long)]
        dry_run: bool,
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
            token,
            version,
            dry_run,
        } => {
            let (bundle, _) = load(&dir)?;
            let body = serde_json::json!({
                "version": version,
                "files": bundle.files,
                "schema": bundle.schema,
                "dry_run": dry_run,
            });
            let url = format!("{}/api/v1/policies", api.trim_end_matches('/'));
            let response = reqwest::Client::new()
                .post(&url)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .with_context(|| format!("cannot reach the control plane at {api}"))?;
            let status = response.status();
            let reply: serde_json::Value = response.json().await.unwrap_or_default();
            if !status.is_success() {
                let mut msg = format!(
                    "the control plane refused the bundle ({status}): {}",
                    reply["error"].as_str().unwrap_or("no detail")
                );
                for d in reply["details"].as_array().into_iter().flatten() {
                    msg.push_str(&format!("\n  {}", d.as_str().unwrap_or_default()));
                }
                bail!(msg);
            }
            println!(
                "published bundle {} (hash {}){}",
                reply["version"].as_str().unwrap_or("?"),
                reply["hash"].as_str().unwrap_or("?"),
                if dry_run { " in dry-run mode" } else { "" }
            );
            Ok(())
        }
    }
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
