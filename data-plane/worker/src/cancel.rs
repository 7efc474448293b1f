//! Cancel requests. A client gets its target backend's real process id
//! (what `pg_backend_pid()` and notifications say) with a secret the
//! worker chose at random, so that a key is unique across targets and
//! workers. A cancel request is routed by the whole key: the worker holding
//! the session sends it to the target with the target's own secret; one
//! that reaches a worker which does not hold the session (behind a load
//! balancer) is forwarded to all workers over NATS, and the holder acts.
//!
//! Forwarded requests are authenticated: each carries the time it was sent
//! and an HMAC-SHA256 over it, the key and the subject, with the key all
//! workers share (`worker.cancel_key_env`/`cancel_key_file`). A request
//! without a valid tag, or sent more than [`MAX_AGE_MS`] away from the
//! receiver's clock, is ignored, so whoever can publish on the subject
//! cannot cancel anyone's commands without the key. A worker without a
//! key neither forwards nor acts on forwarded requests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;

use crate::config::CancelKey;
use crate::{Shared, Target};

/// How far a forwarded request's time may be from the receiver's: a
/// captured request can be replayed only within this window (and then
/// only cancels what that session is running again).
pub(crate) const MAX_AGE_MS: i64 = 30_000;
const TAG_LEN: usize = 32;
const BODY_LEN: usize = 16;
const CONTEXT: &[u8] = b"gatehouse-cancel-v1";

/// A client's cancel key: the backend's process id and the worker's secret.
pub(crate) type Key = (i32, i32);

struct Entry {
    target: Arc<Target>,
    /// The target's own secret for the backend.
    backend_secret: i32,
    /// Counts the session's cancel requests: a command waiting for its
    /// approval (which the target is not running) is withdrawn by one.
    requests: tokio::sync::watch::Sender<u64>,
}

#[derive(Default)]
pub(crate) struct CancelRegistry {
    sessions: Mutex<HashMap<Key, Entry>>,
}

impl CancelRegistry {
    /// Registers a session's backend key and returns the key for the
    /// client: the backend's process id, and a random secret no other
    /// session of this worker has with that process id; with a receiver
    /// of the session's cancel requests (a count that grows by one each).
    pub(crate) fn register(
        &self,
        target: Arc<Target>,
        backend_pid: i32,
        backend_secret: i32,
    ) -> (Key, tokio::sync::watch::Receiver<u64>) {
        let mut map = self.sessions.lock().expect("poisoned");
        let key = loop {
            let key = (backend_pid, rand::random::<i32>());
            if !map.contains_key(&key) {
                break key;
            }
        };
        let (requests, received) = tokio::sync::watch::channel(0);
        map.insert(
            key,
            Entry {
                target,
                backend_secret,
                requests,
            },
        );
        (key, received)
    }

    /// Forgets `key` (a session's, once it has ended).
    pub(crate) fn remove(&self, key: Key) {
        self.sessions.lock().expect("poisoned").remove(&key);
    }

    /// Cancels the session's running command if this worker holds it.
    pub(crate) async fn cancel_local(&self, pid: i32, secret: i32) -> bool {
        let found = {
            let map = self.sessions.lock().expect("poisoned");
            map.get(&(pid, secret)).map(|e| {
                e.requests.send_modify(|n| *n += 1);
                (e.target.clone(), e.backend_secret)
            })
        };
        let Some((target, backend_secret)) = found else {
            return false;
        };
        if let Err(e) =
            crate::backend::cancel(&target.config, target.tls.as_ref(), pid, backend_secret).await
        {
            tracing::warn!(target = %target.name, error = %e, "cancel request to target failed");
        }
        true
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.sessions.lock().expect("poisoned").len()
    }
}

fn tag(key: &CancelKey, subject: &str, body: &[u8]) -> ring::hmac::Tag {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key.0);
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(CONTEXT);
    ctx.update(&[0]);
    ctx.update(subject.as_bytes());
    ctx.update(&[0]);
    ctx.update(body);
    ctx.sign()
}

/// A forwarded cancel request: the key, the time it is sent (unix ms) and
/// its tag.
pub(crate) fn encode(
    key: &CancelKey,
    subject: &str,
    pid: i32,
    secret: i32,
    now_ms: i64,
) -> Vec<u8> {
    let mut v = Vec::with_capacity(BODY_LEN + TAG_LEN);
    v.extend_from_slice(&pid.to_be_bytes());
    v.extend_from_slice(&secret.to_be_bytes());
    v.extend_from_slice(&now_ms.to_be_bytes());
    let tag = tag(key, subject, &v);
    v.extend_from_slice(tag.as_ref());
    v
}

/// The cancel key of an authentic, fresh request; `None` for anything else.
pub(crate) fn decode(
    key: &CancelKey,
    subject: &str,
    payload: &[u8],
    now_ms: i64,
) -> Option<(i32, i32)> {
    if payload.len() != BODY_LEN + TAG_LEN {
        return None;
    }
    let (body, tag) = payload.split_at(BODY_LEN);
    let verify_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key.0);
    let mut signed = Vec::with_capacity(CONTEXT.len() + subject.len() + 2 + BODY_LEN);
    signed.extend_from_slice(CONTEXT);
    signed.push(0);
    signed.extend_from_slice(subject.as_bytes());
    signed.push(0);
    signed.extend_from_slice(body);
    ring::hmac::verify(&verify_key, &signed, tag).ok()?;
    let sent = i64::from_be_bytes(body[8..16].try_into().ok()?);
    if (now_ms - sent).abs() > MAX_AGE_MS {
        return None;
    }
    let pid = i32::from_be_bytes(body[0..4].try_into().ok()?);
    let secret = i32::from_be_bytes(body[4..8].try_into().ok()?);
    Some((pid, secret))
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Forwards a cancel request for a session this worker does not hold to
/// the other workers, when they share a key.
pub(crate) async fn forward(shared: &Shared, pid: i32, secret: i32) {
    let Some(key) = &shared.config.cancel_key else {
        tracing::debug!("cancel request for a session not held here; no cancel key to forward it");
        return;
    };
    let subject = &shared.config.cancel_subject;
    let payload = encode(key, subject, pid, secret, now_ms());
    if let Err(e) = shared.log.signal(subject, payload.into()).await {
        tracing::warn!(error = %e, "cannot forward a cancel request");
    }
}

/// Serves cancel requests forwarded by other workers; without a key it
/// only drains the subscription.
pub(crate) async fn serve_forwarded(
    registry: Arc<CancelRegistry>,
    key: Option<CancelKey>,
    subject: String,
    mut sub: futures::stream::BoxStream<'static, bytes::Bytes>,
) {
    while let Some(payload) = sub.next().await {
        let Some(key) = &key else {
            continue;
        };
        let Some((pid, secret)) = decode(key, &subject, &payload, now_ms()) else {
            tracing::warn!("ignored a forwarded cancel request that is not authentic or too old");
            continue;
        };
        if registry.cancel_local(pid, secret).await {
            tracing::debug!("served a cancel request forwarded by another worker");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(name: &str) -> Arc<Target> {
        let config: crate::TargetConfig = serde_json::from_value(serde_json::json!({
            "host": format!("{name}.invalid"),
            "database": "d",
            "user": "u",
        }))
        .expect("a target");
        Arc::new(Target {
            name: name.into(),
            config,
            tls: None,
        })
    }

    #[test]
    fn forwarded_requests_need_the_key_the_subject_and_a_fresh_time() {
        let key = CancelKey(vec![7; 32]);
        let now = 1_700_000_000_000;
        let msg = encode(&key, "gh.cancel", 4242, -5, now);
        assert_eq!(
            decode(&key, "gh.cancel", &msg, now + 1_000),
            Some((4242, -5))
        );
        // Another key, another subject, an old or future request.
        assert_eq!(
            decode(&CancelKey(vec![8; 32]), "gh.cancel", &msg, now),
            None
        );
        assert_eq!(decode(&key, "gh.other", &msg, now), None);
        assert_eq!(decode(&key, "gh.cancel", &msg, now + MAX_AGE_MS + 1), None);
        assert_eq!(decode(&key, "gh.cancel", &msg, now - MAX_AGE_MS - 1), None);
        // Any byte changed, or the old unauthenticated 8-byte form.
        for i in 0..msg.len() {
            let mut forged = msg.clone();
            forged[i] ^= 1;
            assert_eq!(decode(&key, "gh.cancel", &forged, now), None, "byte {i}");
        }
        assert_eq!(decode(&key, "gh.cancel", &msg[..8], now), None);
    }

    #[test]
    fn the_backend_pid_is_kept_and_each_session_removes_its_own_key() {
        let registry = CancelRegistry::default();
        // Two targets whose backends happen to have one process id.
        let (key_a, _) = registry.register(target("a"), 4242, 7);
        let (key_b, _) = registry.register(target("b"), 4242, 7);
        assert_eq!(key_a.0, 4242, "the client gets the backend's own pid");
        assert_ne!(key_a, key_b, "the secrets keep the keys apart");
        registry.remove(key_a);
        let keys: Vec<Key> = registry.sessions.lock().unwrap().keys().copied().collect();
        assert_eq!(
            keys,
            [key_b],
            "the first session's end removed its key only"
        );
        registry.remove(key_b);
        assert_eq!(registry.len(), 0);
    }
}
