//! Cancel requests. The worker hands clients its own cancel keys; a cancel
//! request that reaches a worker which does not hold the session (behind a
//! load balancer) is forwarded to all workers over NATS, and the holder acts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;

use crate::Target;

struct Entry {
    secret: i32,
    target: Arc<Target>,
    backend_pid: i32,
    backend_secret: i32,
}

#[derive(Default)]
pub(crate) struct CancelRegistry {
    sessions: Mutex<HashMap<i32, Entry>>,
}

impl CancelRegistry {
    /// Registers a session's backend key and returns the key for the client.
    pub(crate) fn register(
        &self,
        target: Arc<Target>,
        backend_pid: i32,
        backend_secret: i32,
    ) -> (i32, i32) {
        let mut map = self.sessions.lock().expect("poisoned");
        let secret = rand::random::<i32>();
        loop {
            let pid = rand::random::<i32>() & 0x7fff_ffff;
            if pid != 0 && !map.contains_key(&pid) {
                map.insert(
                    pid,
                    Entry {
                        secret,
                        target,
                        backend_pid,
                        backend_secret,
                    },
                );
                return (pid, secret);
            }
        }
    }

    pub(crate) fn remove(&self, pid: i32) {
        self.sessions.lock().expect("poisoned").remove(&pid);
    }

    /// Cancels the session's running command if this worker holds it.
    pub(crate) async fn cancel_local(&self, pid: i32, secret: i32) -> bool {
        let found = {
            let map = self.sessions.lock().expect("poisoned");
            map.get(&pid)
                .filter(|e| e.secret == secret)
                .map(|e| (e.target.clone(), e.backend_pid, e.backend_secret))
        };
        let Some((target, bpid, bsecret)) = found else {
            return false;
        };
        if let Err(e) =
            crate::backend::cancel(&target.config, target.tls.as_ref(), bpid, bsecret).await
        {
            tracing::warn!(target = %target.name, error = %e, "cancel request to target failed");
        }
        true
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
