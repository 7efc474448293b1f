//! Cancel requests. A client gets its target backend's real process id
//! (what `pg_backend_pid()` and notifications say) with a secret the
//! worker chose at random, so that a key is unique across targets and
//! workers. A cancel request is routed by the whole key: the worker holding
//! the session sends it to the target with the target's own secret; one
//! that reaches a worker which does not hold the session (behind a load
//! balancer) is forwarded to all workers over NATS, and the holder acts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;

use crate::Target;

/// A client's cancel key: the backend's process id and the worker's secret.
pub(crate) type Key = (i32, i32);

struct Entry {
    target: Arc<Target>,
    /// The target's own secret for the backend.
    backend_secret: i32,
}

#[derive(Default)]
pub(crate) struct CancelRegistry {
    sessions: Mutex<HashMap<Key, Entry>>,
}

impl CancelRegistry {
    /// Registers a session's backend key and returns the key for the
    /// client: the backend's process id, and a random secret no other
    /// session of this worker has with that process id.
    pub(crate) fn register(
        &self,
        target: Arc<Target>,
        backend_pid: i32,
        backend_secret: i32,
    ) -> Key {
        let mut map = self.sessions.lock().expect("poisoned");
        let key = loop {
            let key = (backend_pid, rand::random::<i32>());
            if !map.contains_key(&key) {
                break key;
            }
        };
        map.insert(
            key,
            Entry {
                target,
                backend_secret,
            },
        );
        key
    }

    /// Forgets `key` (a session's, once it has ended).
    pub(crate) fn remove(&self, key: Key) {
        self.sessions.lock().expect("poisoned").remove(&key);
    }

    /// Cancels the session's running command if this worker holds it.
    pub(crate) async fn cancel_local(&self, pid: i32, secret: i32) -> bool {
        let found = {
            let map = self.sessions.lock().expect("poisoned");
            map.get(&(pid, secret))
                .map(|e| (e.target.clone(), e.backend_secret))
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

pub(crate) fn encode(pid: i32, secret: i32) -> Vec<u8> {
    let mut v = pid.to_be_bytes().to_vec();
    v.extend_from_slice(&secret.to_be_bytes());
    v
}

/// Serves cancel requests forwarded by other workers.
pub(crate) async fn serve_forwarded(
    registry: Arc<CancelRegistry>,
    mut sub: async_nats::Subscriber,
) {
    while let Some(msg) = sub.next().await {
        let Ok(bytes) = <[u8; 8]>::try_from(msg.payload.as_ref()) else {
            continue;
        };
        let pid = i32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let secret = i32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
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
    fn the_backend_pid_is_kept_and_each_session_removes_its_own_key() {
        let registry = CancelRegistry::default();
        // Two targets whose backends happen to have one process id.
        let key_a = registry.register(target("a"), 4242, 7);
        let key_b = registry.register(target("b"), 4242, 7);
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
