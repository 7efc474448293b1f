//! Approvals in the audit store: every approval's last record, then each
//! change as it is recorded, written to the `approvals` table, so that
//! compliance queries join commands, the approvals they waited for and
//! the access they ran under. Idempotent (a row takes only a later
//! record), so replicas doing the same and a restart that reads each
//! approval's last record again change nothing.

use std::time::Duration;

use futures::StreamExt;
use gatehouse_policystore::approvals::Approvals;

use crate::audit::AuditStore;

/// Projects the approvals stream into `audit` until aborted.
pub(crate) async fn run(approvals: Approvals, audit: AuditStore) {
    loop {
        match approvals.follow_all().await {
            Ok(mut changes) => {
                while let Some(next) = changes.next().await {
                    let c = match next {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::warn!(error = %e, "approvals audit: a record was skipped");
                            continue;
                        }
                    };
                    // The store may be away for a while: the change waits.
                    while let Err(e) = audit.store_approval(&c.approval, c.sequence).await {
                        tracing::warn!(approval = %c.approval.id, error = %e, "approvals audit: cannot write; trying again");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
                tracing::warn!("approvals audit: the stream ended; following it again");
            }
            Err(e) => {
                tracing::warn!(error = %e, "approvals audit: cannot follow the stream; trying again")
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {

    use crate::ControlPlaneConfig;

    /// A record older than the row (a replica or a restart replaying it)
    /// changes nothing; a newer one replaces it.
    #[tokio::test]
    async fn a_row_takes_only_a_later_record() {
        let dir = std::env::temp_dir().join(format!("gatehouse-apaudit-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = ControlPlaneConfig {
            audit_db_url: format!("sqlite:{}", dir.join("audit.db").display()),
            ..Default::default()
        };
        let audit = crate::audit::connect_audit_db(&config).await.unwrap();
        let now = chrono::Utc::now();
        let pending: gatehouse_events::approval::Approval =
            serde_json::from_value(serde_json::json!({
                "schema_version": 1, "id": uuid::Uuid::now_v7(), "state": "pending",
                "requested_at": now, "expires_at": now + chrono::Duration::hours(1),
                "requester": {"issuer": "i", "subject": "alice", "username": "alice"},
                "target": {"name": "app", "kind": "postgres", "environment": "prod"},
                "access": {"scope": "ddl", "for_secs": 600, "reason": "migration"},
                "approvers_required": 1,
            }))
            .unwrap();
        let mut granted = pending.clone();
        granted.state = gatehouse_events::approval::ApprovalState::Granted;
        granted.ended_at = Some(now);
        audit.store_approval(&pending, 1).await.unwrap();
        audit.store_approval(&granted, 2).await.unwrap();
        audit.store_approval(&pending, 1).await.unwrap();
        let rows: Vec<(String, String, Option<String>)> = audit
            .query("SELECT kind, state, access_until FROM approvals", &[])
            .await
            .unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].0.as_str(), rows[0].1.as_str()),
            ("access", "granted")
        );
        assert!(rows[0].2.is_some(), "granted access has an end");
        audit.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
