//! `gatehouse access request|list|show|revoke`: asking for access to a
//! target for a while, over the control plane's API. An approver grants
//! the request with `gatehouse approvals grant <id>`; while it is in
//! force, the requester's sessions on the target see its scope in the
//! policy context (`context.grants`).

use std::time::Duration;

use gatehouse_events::approval::{Approval, ApprovalState};
use serde::Deserialize;
use uuid::Uuid;

use crate::approvals::{Api, State, details, parse, state_line, table};
use crate::policy::call_raw;

const MAY: &str = "the control plane accepts (any identity may ask for access)";

#[derive(clap::Subcommand, Debug)]
pub enum AccessCommand {
    /// Ask for access to a target for a while; an approver grants it.
    Request {
        /// The target, as the workers name it.
        #[arg(long)]
        target: String,
        /// How long, once granted: e.g. 30m, 2h (at most 24h).
        #[arg(long = "for", value_name = "DURATION")]
        duration: String,
        /// Why: shown to approvers and kept with the grant.
        #[arg(long)]
        reason: String,
        /// What policies see in `context.grants` (default: access).
        #[arg(long)]
        scope: Option<String>,
        /// Wait until an approver decides, then say how.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        api: Api,
    },
    /// List your requests for access (by default, every state).
    List {
        #[arg(long, value_enum)]
        state: Option<State>,
        /// Print the control plane's JSON as it came.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: Api,
    },
    /// Print one of your requests for access in full.
    Show {
        id: Uuid,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: Api,
    },
    /// End access: withdraw your pending request or give up access granted
    /// (yours, or as an approver, anyone's).
    Revoke {
        id: Uuid,
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        api: Api,
    },
}

#[derive(Deserialize)]
struct List {
    access: Vec<Approval>,
}

pub async fn run(cmd: AccessCommand) -> anyhow::Result<()> {
    match cmd {
        AccessCommand::Request {
            target,
            duration,
            reason,
            scope,
            wait,
            api,
        } => {
            let token = api.token_of(MAY)?;
            let mut body = serde_json::json!({
                "target": target,
                "for": duration,
                "reason": reason,
            });
            if let Some(scope) = scope {
                body["scope"] = scope.into();
            }
            let (_, text) =
                call_raw(&api.api, &token, "POST", "/api/v1/access", Some(body)).await?;
            let mut a: Approval = parse(&text)?;
            println!(
                "access request {id} is pending until an approver grants it \
                 (gatehouse approvals grant {id}); it expires at {}",
                a.expires_at.format("%Y-%m-%dT%H:%M:%SZ"),
                id = a.id,
            );
            if !wait {
                return Ok(());
            }
            let path = format!("/api/v1/access/{}", a.id);
            while a.state == ApprovalState::Pending {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let (_, text) = call_raw(&api.api, &token, "GET", &path, None).await?;
                a = parse(&text)?;
            }
            println!("access request {}: {}", a.id, state_line(&a));
            if a.state != ApprovalState::Granted {
                anyhow::bail!("access was not granted ({})", a.state.as_str());
            }
            Ok(())
        }
        AccessCommand::List { state, json, api } => {
            let token = api.token_of(MAY)?;
            let path = match state {
                Some(s) => format!("/api/v1/access?state={}", s.as_str()),
                None => "/api/v1/access".to_string(),
            };
            let (_, text) = call_raw(&api.api, &token, "GET", &path, None).await?;
            if json {
                println!("{}", text.trim_end());
                return Ok(());
            }
            let list: List = parse(&text)?;
            if list.access.is_empty() {
                println!("no requests for access");
            } else {
                print!("{}", table(&list.access));
            }
            Ok(())
        }
        AccessCommand::Show { id, json, api } => {
            let token = api.token_of(MAY)?;
            let path = format!("/api/v1/access/{id}");
            let (_, text) = call_raw(&api.api, &token, "GET", &path, None).await?;
            if json {
                println!("{}", text.trim_end());
                return Ok(());
            }
            let a: Approval = parse(&text)?;
            print!("{}", details(&a));
            Ok(())
        }
        AccessCommand::Revoke { id, reason, api } => {
            let token = api.token_of(MAY)?;
            let body = match reason {
                Some(r) => serde_json::json!({ "reason": r }),
                None => serde_json::json!({}),
            };
            let path = format!("/api/v1/access/{id}/revoke");
            let (_, text) = call_raw(&api.api, &token, "POST", &path, Some(body)).await?;
            let a: Approval = parse(&text)?;
            println!("access request {id}: {}", state_line(&a));
            Ok(())
        }
    }
}
