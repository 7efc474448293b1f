//! Outbound notifications of approval changes to webhooks.
//!
//! Each change to an approval recorded after the control plane started
//! (requested, granted, denied, expired, cancelled) is POSTed to every
//! configured webhook as JSON, signed, and retried with back-off until the
//! receiver answers 2xx or the tries run out. A webhook may ask for a
//! Slack-compatible body (`{"text": …}`) instead of the approval itself.
//!
//! Signing: `X-Gatehouse-Timestamp` is the Unix time of the attempt and
//! `X-Gatehouse-Signature` is `sha256=` and the hex HMAC-SHA256, keyed with
//! the webhook's secret, of `<timestamp>.<body>`; a receiver recomputes it
//! and refuses a timestamp far from its clock. `X-Gatehouse-Delivery`
//! names the change (`<approval id>.<sequence>`), the same on every retry
//! and from every control-plane replica (each replica notifies): receivers
//! drop repeats by it. Secrets come from the environment or a file, never
//! from the config file itself, and are never logged.

use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use gatehouse_events::approval::{Approval, ApprovalState};
use gatehouse_policystore::approvals::{Approvals, Changed};
use serde::Deserialize;
use serde_json::json;

/// Tries of one delivery, the first included.
const TRIES: u32 = 6;
const FIRST_PAUSE: Duration = Duration::from_secs(1);
const MAX_PAUSE: Duration = Duration::from_secs(60);

/// `[[control_plane.approval_webhooks]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Where to POST (https, or http on a trusted network).
    pub url: String,
    /// The environment variable holding the signing secret.
    #[serde(default)]
    pub secret_env: Option<String>,
    /// A file holding the signing secret (trailing whitespace dropped).
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// `json` (the approval, the default) or `slack` (a message).
    #[serde(default)]
    pub format: WebhookFormat,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WebhookFormat {
    #[default]
    Json,
    Slack,
}

impl WebhookConfig {
    /// The signing secret, or why there is none (a webhook without one is
    /// refused at start: receivers could not tell a forged notification).
    pub fn secret(&self) -> Result<Vec<u8>, String> {
        let secret = match (&self.secret_env, &self.secret_file) {
            (Some(var), None) => std::env::var(var).map_err(|_| {
                format!(
                    "webhook {}: environment variable {var} is not set",
                    self.url
                )
            })?,
            (None, Some(file)) => std::fs::read_to_string(file)
                .map_err(|e| format!("webhook {}: cannot read {}: {e}", self.url, file.display()))?
                .trim_end()
                .to_string(),
            _ => {
                return Err(format!(
                    "webhook {}: give exactly one of secret_env and secret_file",
                    self.url
                ));
            }
        };
        if secret.len() < 16 {
            return Err(format!(
                "webhook {}: the secret must be at least 16 bytes",
                self.url
            ));
        }
        Ok(secret.into_bytes())
    }
}

/// A webhook ready to deliver to.
#[derive(Clone)]
pub(crate) struct Hook {
    url: String,
    key: ring::hmac::Key,
    format: WebhookFormat,
}

/// Checks every webhook (URL and secret) before anything starts.
pub(crate) fn prepare(configs: &[WebhookConfig]) -> Result<Vec<Hook>, String> {
    configs
        .iter()
        .map(|c| {
            let url = reqwest::Url::parse(&c.url)
                .map_err(|e| format!("webhook {:?}: not a URL: {e}", c.url))?;
            if !matches!(url.scheme(), "https" | "http") {
                return Err(format!("webhook {}: only http and https", c.url));
            }
            Ok(Hook {
                url: c.url.clone(),
                key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &c.secret()?),
                format: c.format,
            })
        })
        .collect()
}

/// Notifies `hooks` of every change recorded from now on, until the
/// approvals stream ends. `link` turns an approval id into a URL for
/// people (`{id}` replaced).
pub(crate) async fn run(approvals: Approvals, hooks: Vec<Hook>, link: Option<String>) {
    if hooks.is_empty() {
        return;
    }
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the webhook client; approval notifications are off");
            return;
        }
    };
    loop {
        // Only what happens from now on: a restart does not notify again
        // of every approval there ever was.
        let from = match approvals.position().await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "approval notifications: cannot read the stream; trying again");
                tokio::time::sleep(Duration::from_secs(5)).await;
                continue;
            }
        };
        let mut changes = match approvals.follow_all().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "approval notifications: cannot follow the stream; trying again");
                tokio::time::sleep(Duration::from_secs(5)).await;
                continue;
            }
        };
        let mut last = from;
        while let Some(next) = changes.next().await {
            let changed = match next {
                Ok(c) if c.sequence > last => c,
                Ok(_) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "approval notifications: a record was skipped");
                    continue;
                }
            };
            last = changed.sequence;
            for hook in &hooks {
                let delivery = Delivery::of(&changed, hook.format, link.as_deref());
                tokio::spawn(deliver(client.clone(), hook.clone(), delivery));
            }
        }
        tracing::warn!("approval notifications: the stream ended; following it again");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// One notification, as sent on every try.
struct Delivery {
    id: String,
    event: String,
    body: Vec<u8>,
}

impl Delivery {
    fn of(c: &Changed, format: WebhookFormat, link: Option<&str>) -> Self {
        let a = &c.approval;
        let link = link.map(|l| l.replace("{id}", &a.id.to_string()));
        let event = format!("approval.{}", c.change);
        let body = match format {
            WebhookFormat::Json => json!({
                "type": event,
                "approval": a,
                "link": link,
            }),
            WebhookFormat::Slack => json!({ "text": slack_text(a, &c.change, link.as_deref()) }),
        };
        Delivery {
            id: format!("{}.{}", a.id, c.sequence),
            event,
            body: serde_json::to_vec(&body).unwrap_or_default(),
        }
    }
}

/// A one-paragraph message for people.
fn slack_text(a: &Approval, change: &str, link: Option<&str>) -> String {
    let who = match a.requester.delegation.first() {
        Some(actor) => format!("{} (acting for {})", actor.subject, a.requester.username),
        None => a.requester.username.clone(),
    };
    // What is asked for, as "to run `…` on T" or "ddl access to T for 30 min".
    let asked = match (a.command(), a.access()) {
        (Some(c), _) => {
            let mut statement: String = c.statement.chars().take(300).collect();
            if statement.len() < c.statement.len() {
                statement.push('…');
            }
            format!("`{statement}` on {}", a.target.name)
        }
        (None, Some(x)) => format!(
            "{} access to {} for {} min ({})",
            x.scope,
            a.target.name,
            x.for_secs / 60,
            one_line(&x.reason)
        ),
        (None, None) => a.target.name.clone(),
    };
    let what = match a.state {
        ApprovalState::Pending if change == "requested" => format!(
            "{who} asks for {asked} — {} approval(s) needed before {}",
            a.approvers_required,
            a.expires_at.format("%H:%M:%S UTC")
        ),
        ApprovalState::Pending => format!(
            "{} of {} approvals for {who}'s {asked}",
            a.grants.len(),
            a.approvers_required,
        ),
        ApprovalState::Granted => format!(
            "granted by {}: {who}'s {asked}",
            a.grants
                .iter()
                .map(|g| g.username.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        ),
        ApprovalState::Denied => format!(
            "denied by {}: {who}'s {asked}",
            a.denial
                .as_ref()
                .map_or("an approver", |d| d.username.as_str()),
        ),
        ApprovalState::Expired => format!("expired without a decision: {who}'s {asked}"),
        ApprovalState::Cancelled => format!("withdrawn: {who}'s {asked}"),
        ApprovalState::Revoked => format!(
            "revoked by {}: {who}'s {asked}",
            a.revocation
                .as_ref()
                .map_or("someone", |r| r.username.as_str()),
        ),
    };
    match link {
        Some(l) => format!("Gatehouse approval {}: {what} <{l}|open>", a.id),
        None => format!("Gatehouse approval {}: {what}", a.id),
    }
}

/// Text on one line, at most 200 characters.
fn one_line(text: &str) -> String {
    let mut out: String = text
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(200)
        .collect();
    if out.chars().count() == 200 {
        out.push('…');
    }
    out
}

/// The signature headers' values for `body` at `timestamp`.
pub(crate) fn sign(key: &ring::hmac::Key, timestamp: i64, body: &[u8]) -> String {
    let mut ctx = ring::hmac::Context::with_key(key);
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    format!("sha256={}", hex::encode(ctx.sign().as_ref()))
}

async fn deliver(client: reqwest::Client, hook: Hook, d: Delivery) {
    let mut pause = FIRST_PAUSE;
    for attempt in 1..=TRIES {
        let timestamp = chrono::Utc::now().timestamp();
        let sent = client
            .post(&hook.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("X-Gatehouse-Event", &d.event)
            .header("X-Gatehouse-Delivery", &d.id)
            .header("X-Gatehouse-Timestamp", timestamp.to_string())
            .header("X-Gatehouse-Signature", sign(&hook.key, timestamp, &d.body))
            .body(d.body.clone())
            .send()
            .await;
        let failure = match sent {
            Ok(r) if r.status().is_success() => return,
            Ok(r) => format!("answered {}", r.status()),
            Err(e) => e.without_url().to_string(),
        };
        if attempt == TRIES {
            tracing::error!(webhook = %hook.url, delivery = %d.id, attempts = TRIES, failure, "approval notification not delivered; giving up");
            return;
        }
        tracing::warn!(webhook = %hook.url, delivery = %d.id, attempt, failure, "approval notification not delivered; trying again");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(MAX_PAUSE);
    }
}
