//! Approvals on the stream of records, on both stores: JetStream (the
//! machine's NATS on 127.0.0.1:4222, a stream of the test's own) and the
//! embedded SQLite file. Races between writers end in one outcome; a store
//! opened again (a restarted control plane) finds what is pending.

use chrono::{Duration, Utc};
use futures::StreamExt;
use gatehouse_eventlog::{EmbeddedLog, RecordStore};
use gatehouse_events::approval::{
    Approval, ApprovalState, ApprovalTarget, Approver, Change, Refusal, Requested,
};
use gatehouse_events::{Actor, CommandReceived, Identity, Protocol};
use gatehouse_policystore::approvals::{ApprovalError, Approvals, stream_for};
use uuid::Uuid;

struct Env {
    dir: std::path::PathBuf,
    js: async_nats::jetstream::Context,
    revocations: String,
    stores: Vec<(&'static str, RecordStore)>,
}

impl Env {
    async fn new() -> Self {
        let suffix = Uuid::new_v4().simple().to_string();
        let dir = std::env::temp_dir().join(format!("gatehouse-approvals-{suffix}"));
        std::fs::create_dir_all(&dir).unwrap();
        let log = EmbeddedLog::open(&dir.join("gatehouse.db")).await.unwrap();
        let js =
            async_nats::jetstream::new(async_nats::connect("nats://127.0.0.1:4222").await.unwrap());
        Self {
            dir,
            revocations: format!("APPRTEST_{suffix}"),
            stores: vec![
                ("jetstream", RecordStore::JetStream(js.clone())),
                ("embedded", RecordStore::Embedded(log)),
            ],
            js,
        }
    }

    async fn cleanup(self) {
        let _ = self.js.delete_stream(stream_for(&self.revocations)).await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn identity(subject: &str, delegation: &[&str]) -> Identity {
    Identity {
        issuer: "https://issuer.test".into(),
        subject: subject.into(),
        username: subject.into(),
        groups: vec![],
        delegation: delegation
            .iter()
            .map(|s| Actor {
                subject: s.to_string(),
                issuer: None,
            })
            .collect(),
    }
}

fn approver(subject: &str) -> Approver {
    Approver {
        subject: subject.into(),
        username: subject.into(),
        actors: vec![],
    }
}

fn pending(requester: Identity, approvers_required: u32, ttl: Duration) -> Approval {
    let now = Utc::now();
    Approval {
        schema_version: 1,
        id: Uuid::new_v4(),
        state: ApprovalState::Pending,
        requested_at: now,
        expires_at: now + ttl,
        requester,
        target: ApprovalTarget {
            name: "app".into(),
            kind: "postgres".into(),
            environment: "prod".into(),
            tags: vec![],
        },
        request: Requested::Command {
            session_id: Uuid::now_v7(),
            worker_id: "worker-test".into(),
            command: Box::new(CommandReceived {
                protocol: Protocol::Simple,
                statement: "DELETE FROM t".into(),
                statement_name: None,
                portal: None,
                params: vec![],
                executes: vec![],
                decision: None,
                redactions: vec![],
                approval: None,
            }),
        },
        approvers_required,
        grants: vec![],
        denial: None,
        ended_at: None,
        cancel_reason: None,
        revocation: None,
        replaces: None,
    }
}

fn grant(by: &str) -> Change {
    Change::Grant {
        by: approver(by),
        comment: None,
    }
}

fn deny(by: &str) -> Change {
    Change::Deny {
        by: approver(by),
        comment: "not now".into(),
    }
}

#[tokio::test]
async fn racing_grant_and_deny_from_two_writers_end_in_one_outcome() {
    let env = Env::new().await;
    for (kind, store) in &env.stores {
        // Two handles: two control-plane replicas.
        let a = Approvals::open(store, &env.revocations).await.unwrap();
        let b = Approvals::open(store, &env.revocations).await.unwrap();
        for round in 0..10 {
            let request = pending(identity("alice", &[]), 1, Duration::minutes(5));
            a.request(&request).await.unwrap();
            let now = Utc::now();
            let (g, d) = (grant("bob"), deny("carol"));
            let (granted, denied) =
                tokio::join!(a.change(request.id, &g, now), b.change(request.id, &d, now));
            let outcome = b.get(request.id).await.unwrap().unwrap().0;
            match (&granted, &denied) {
                (Ok(g), Err(ApprovalError::Refused(Refusal::Ended(ApprovalState::Granted)))) => {
                    assert_eq!(g, &outcome, "{kind} round {round}");
                    assert_eq!(outcome.state, ApprovalState::Granted);
                }
                (Err(ApprovalError::Refused(Refusal::Ended(ApprovalState::Denied))), Ok(d)) => {
                    assert_eq!(d, &outcome, "{kind} round {round}");
                    assert_eq!(outcome.state, ApprovalState::Denied);
                    assert_eq!(outcome.denial.as_ref().unwrap().subject, "carol");
                }
                other => panic!("{kind} round {round}: not exactly one winner: {other:?}"),
            }
            // Terminal: nothing changes it any more.
            assert!(matches!(
                a.change(
                    request.id,
                    &Change::Cancel {
                        reason: "late".into()
                    },
                    Utc::now()
                )
                .await,
                Err(ApprovalError::Refused(Refusal::Ended(_)))
            ));
        }
        // A second request under the same id is refused: the subject is
        // taken.
        let request = pending(identity("alice", &[]), 1, Duration::minutes(5));
        a.request(&request).await.unwrap();
        let mut again = request.clone();
        if let Requested::Command { command, .. } = &mut again.request {
            command.statement = "DROP TABLE t".into();
        }
        assert!(b.request(&again).await.is_err(), "{kind}");
        let stored = a.get(request.id).await.unwrap().unwrap().0;
        assert_eq!(stored.command().unwrap().statement, "DELETE FROM t");
    }
    env.cleanup().await;
}

#[tokio::test]
async fn requesters_and_those_they_act_for_cannot_approve_and_n_distinct_approvers_are_needed() {
    let env = Env::new().await;
    for (kind, store) in &env.stores {
        let approvals = Approvals::open(store, &env.revocations).await.unwrap();
        // An agent acting for alice asked.
        let request = pending(identity("alice", &["agent-7"]), 2, Duration::minutes(5));
        approvals.request(&request).await.unwrap();
        let now = Utc::now();
        for (who, refusal) in [
            ("alice", Refusal::OnTheirBehalf),
            ("agent-7", Refusal::OwnRequest),
        ] {
            match approvals.change(request.id, &grant(who), now).await {
                Err(ApprovalError::Refused(r)) => assert_eq!(r, refusal, "{kind} {who}"),
                other => panic!("{kind}: {who} approving: {other:?}"),
            }
        }
        // An agent of alice's approving for her is alice approving.
        let via_agent = Change::Grant {
            by: Approver {
                subject: "agent-9".into(),
                username: "agent-9".into(),
                actors: vec!["alice".into()],
            },
            comment: None,
        };
        assert!(matches!(
            approvals.change(request.id, &via_agent, now).await,
            Err(ApprovalError::Refused(Refusal::OnTheirBehalf))
        ));
        // Two of two: bob's grant alone leaves it pending; bob again is
        // refused; carol's makes it granted.
        let one = approvals
            .change(request.id, &grant("bob"), now)
            .await
            .unwrap();
        assert_eq!(one.state, ApprovalState::Pending, "{kind}");
        assert!(matches!(
            approvals.change(request.id, &grant("bob"), now).await,
            Err(ApprovalError::Refused(Refusal::AlreadyGranted))
        ));
        // A denial needs a comment.
        let bare = Change::Deny {
            by: approver("dave"),
            comment: "  ".into(),
        };
        assert!(matches!(
            approvals.change(request.id, &bare, now).await,
            Err(ApprovalError::Refused(Refusal::CommentRequired))
        ));
        let two = approvals
            .change(request.id, &grant("carol"), now)
            .await
            .unwrap();
        assert_eq!(two.state, ApprovalState::Granted, "{kind}");
        let by: Vec<_> = two.grants.iter().map(|g| g.subject.as_str()).collect();
        assert_eq!(by, ["bob", "carol"]);
    }
    env.cleanup().await;
}

#[tokio::test]
async fn expiry_pending_after_reopening_and_followers_see_each_change() {
    let env = Env::new().await;
    for (kind, store) in &env.stores {
        let approvals = Approvals::open(store, &env.revocations).await.unwrap();
        let short = pending(identity("alice", &[]), 1, Duration::seconds(1));
        let long = pending(identity("alice", &[]), 1, Duration::minutes(5));
        approvals.request(&short).await.unwrap();
        approvals.request(&long).await.unwrap();
        let mut follow = approvals.follow(&long).await.unwrap();
        let first = follow.next().await.unwrap().unwrap();
        assert_eq!(first, long, "{kind}");

        // Not before its time; a grant after it is refused.
        assert!(matches!(
            approvals
                .change(short.id, &Change::Expire, Utc::now())
                .await,
            Err(ApprovalError::Refused(Refusal::NotExpired(_)))
        ));
        let later = Utc::now() + Duration::seconds(2);
        assert!(matches!(
            approvals.change(short.id, &grant("bob"), later).await,
            Err(ApprovalError::Refused(Refusal::Expired(_)))
        ));
        let expired = approvals
            .change(short.id, &Change::Expire, later)
            .await
            .unwrap();
        assert_eq!(expired.state, ApprovalState::Expired);

        // Opened again, as by a restarted control plane: the pending one
        // is still pending and can be granted.
        let reopened = Approvals::open(store, &env.revocations).await.unwrap();
        let all = reopened.all().await.unwrap();
        let states: Vec<_> = all
            .iter()
            .filter(|a| a.id == short.id || a.id == long.id)
            .map(|a| (a.id, a.state))
            .collect();
        assert_eq!(
            states,
            [
                (short.id, ApprovalState::Expired),
                (long.id, ApprovalState::Pending)
            ],
            "{kind}"
        );
        reopened
            .change(long.id, &grant("bob"), Utc::now())
            .await
            .unwrap();
        let next = tokio::time::timeout(std::time::Duration::from_secs(10), follow.next())
            .await
            .expect("the follower sees the grant")
            .unwrap()
            .unwrap();
        assert_eq!(next.state, ApprovalState::Granted, "{kind}");
    }
    env.cleanup().await;
}

#[tokio::test]
async fn access_requests_share_the_approvals_and_their_followers_see_grants_and_revocations() {
    use gatehouse_events::approval::AccessRequest;
    use gatehouse_policystore::approvals::KnownTarget;
    let env = Env::new().await;
    let (key, _) = gatehouse_policystore::SigningKey::generate();
    for (kind, store) in &env.stores {
        let approvals = Approvals::open(store, &env.revocations)
            .await
            .unwrap()
            .signed(Some(key.clone()), Default::default());
        // A target is known once a worker announces it.
        assert!(approvals.target("app").await.unwrap().is_none(), "{kind}");
        let mut known = KnownTarget {
            target: pending(identity("x", &[]), 1, Duration::minutes(1)).target,
            worker_id: "w1".into(),
            announced_at: Utc::now(),
        };
        approvals.announce(&known).await.unwrap();
        known.worker_id = "w2".into();
        approvals.announce(&known).await.unwrap();
        assert_eq!(
            approvals.target("app").await.unwrap().as_ref(),
            Some(&known),
            "{kind}"
        );
        assert_eq!(approvals.targets().await.unwrap(), vec![known], "{kind}");

        let command = pending(identity("alice", &[]), 1, Duration::minutes(5));
        approvals.request(&command).await.unwrap();
        let mut access = pending(identity("alice", &[]), 1, Duration::minutes(5));
        access.request = Requested::Access {
            access: AccessRequest::new(Some("write"), 600, "incident 42").unwrap(),
        };
        approvals.request(&access).await.unwrap();
        let mut follow = approvals.follow_access().await.unwrap();
        let first = follow.next().await.unwrap().unwrap();
        assert_eq!((&first.approval, first.verified), (&access, true), "{kind}");

        // One inbox: both are listed and found by id.
        let ids: Vec<_> = approvals
            .all()
            .await
            .unwrap()
            .iter()
            .map(|a| a.id)
            .collect();
        assert!(
            ids.contains(&command.id) && ids.contains(&access.id),
            "{kind}"
        );
        assert_eq!(approvals.get(access.id).await.unwrap().unwrap().0, access);

        let granted = approvals
            .change(access.id, &grant("bob"), Utc::now())
            .await
            .unwrap();
        assert!(granted.access_in_force(Utc::now()), "{kind}");
        let revoke = Change::Revoke {
            by: approver("carol"),
            reason: Some("incident over".into()),
        };
        assert!(matches!(
            approvals.change(command.id, &revoke, Utc::now()).await,
            Err(ApprovalError::Refused(Refusal::NotAccess))
        ));
        approvals
            .change(access.id, &revoke, Utc::now())
            .await
            .unwrap();
        // The access follower sees the grant and the revocation, and never
        // the command's approval.
        for want in [ApprovalState::Granted, ApprovalState::Revoked] {
            let next = tokio::time::timeout(std::time::Duration::from_secs(10), follow.next())
                .await
                .expect("the follower sees the change")
                .unwrap()
                .unwrap();
            assert_eq!(
                (next.approval.id, next.approval.state, next.verified),
                (access.id, want, true),
                "{kind}"
            );
        }
    }
    env.cleanup().await;
}

/// Whoever can publish on the approvals stream but holds no signing key
/// grants no access: not with a record of their own (unsigned, or signed by
/// another key), not by publishing the control plane's old grant again
/// after its revocation. Such records count for no follower, and the
/// control plane neither lists nor changes them.
#[tokio::test]
async fn access_counts_only_as_the_control_plane_wrote_it() {
    use gatehouse_eventlog::StreamSettings;
    use gatehouse_events::approval::AccessRequest;
    use gatehouse_policystore::{SIGNATURE_HEADER, SigningKey};
    let env = Env::new().await;
    let (key, _) = SigningKey::generate();
    let (other, _) = SigningKey::generate();
    let stream_name = stream_for(&env.revocations);
    for (kind, store) in &env.stores {
        let cp = Approvals::open(store, &env.revocations)
            .await
            .unwrap()
            .signed(Some(key.clone()), Default::default());
        let worker = Approvals::open(store, &env.revocations)
            .await
            .unwrap()
            .signed(
                None,
                gatehouse_policystore::TrustedKeys::new(vec![key.public_key()]),
            );
        let raw = store
            .open(StreamSettings {
                name: stream_name.clone(),
                description: None,
                subjects: format!("gatehouse.{stream_name}.>"),
                per_subject: 32,
                deny_delete: true,
            })
            .await
            .unwrap();
        let subject =
            |a: &Approval| format!("gatehouse.{stream_name}.approval.access.{}", a.id.simple());
        let ask = |reason: &str| {
            let mut a = pending(identity("mallory", &[]), 1, Duration::minutes(5));
            a.request = Requested::Access {
                access: AccessRequest::new(None, 600, reason).unwrap(),
            };
            a
        };
        let mut follow = worker.follow_access().await.unwrap();
        let mut next = async || {
            tokio::time::timeout(std::time::Duration::from_secs(10), follow.next())
                .await
                .expect("the follower sees it")
                .unwrap()
                .unwrap()
        };

        // Forged: a granted record of mallory's own, unsigned and signed by
        // another key.
        let mut forged = ask("forged").apply(&grant("bob"), Utc::now()).unwrap();
        let body = serde_json::to_vec(&forged).unwrap();
        raw.publish(&subject(&forged), &[], body.clone().into(), None, None)
            .await
            .unwrap();
        let seen = next().await;
        assert_eq!(
            (seen.approval.id, seen.verified),
            (forged.id, false),
            "{kind}"
        );
        forged.id = uuid::Uuid::new_v4();
        let body = serde_json::to_vec(&forged).unwrap();
        let signature = other.sign(&body);
        raw.publish(
            &subject(&forged),
            &[(SIGNATURE_HEADER, signature.as_str())],
            body.into(),
            None,
            None,
        )
        .await
        .unwrap();
        let seen = next().await;
        assert_eq!(
            (seen.approval.id, seen.verified),
            (forged.id, false),
            "{kind}"
        );
        assert!(cp.get(forged.id).await.unwrap().is_none(), "{kind}");
        assert!(
            cp.all().await.unwrap().iter().all(|a| a.id != forged.id),
            "{kind}"
        );
        assert!(matches!(
            cp.change(forged.id, &Change::Expire, Utc::now()).await,
            Err(ApprovalError::NotFound(_))
        ));

        // The control plane's own grant counts; published again after its
        // revocation, it does not.
        let real = ask("real");
        cp.request(&real).await.unwrap();
        assert!(next().await.verified, "{kind}");
        cp.change(real.id, &grant("bob"), Utc::now()).await.unwrap();
        let granted = next().await;
        assert!(granted.verified && granted.approval.access_in_force(Utc::now()));
        let (_, granted_at) = cp.get(real.id).await.unwrap().unwrap();
        let old = raw.get(granted_at).await.unwrap().unwrap();
        cp.change(
            real.id,
            &Change::Revoke {
                by: approver("carol"),
                reason: None,
            },
            Utc::now(),
        )
        .await
        .unwrap();
        assert_eq!(
            next().await.approval.state,
            ApprovalState::Revoked,
            "{kind}"
        );
        raw.publish(
            &old.subject,
            &[(SIGNATURE_HEADER, old.header(SIGNATURE_HEADER).unwrap())],
            old.payload.clone(),
            None,
            None,
        )
        .await
        .unwrap();
        let replayed = next().await;
        assert_eq!(replayed.approval.state, ApprovalState::Granted, "{kind}");
        assert!(!replayed.verified, "an old grant published again: {kind}");
    }
    env.cleanup().await;
}
