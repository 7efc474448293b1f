//! How the sessions of a worker learn how their approvals end: one
//! follower of the approvals stream for the whole worker (changes recorded
//! after it started, no history), handing each change to the session
//! waiting on that approval. A waiting command costs its session a map
//! entry and a watch channel, not a subscription of its own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use gatehouse_events::approval::Approval;
use gatehouse_policystore::approvals::Approvals;
use tokio::sync::watch;
use uuid::Uuid;

type Waiting = Arc<Mutex<HashMap<Uuid, watch::Sender<Option<Approval>>>>>;

/// The approvals of this worker's sessions that are being waited on.
pub(crate) struct Waiters {
    pub approvals: Approvals,
    waiting: Waiting,
    follower: tokio::task::JoinHandle<()>,
}

impl Waiters {
    /// Starts following the approvals stream from its current end.
    pub async fn start(approvals: Approvals) -> Result<Self, String> {
        let from = approvals.position().await.map_err(|e| e.to_string())?;
        let waiting = Waiting::default();
        let follower = tokio::spawn(follow(approvals.clone(), waiting.clone(), from));
        Ok(Self {
            approvals,
            waiting,
            follower,
        })
    }

    /// Registers a wait on approval `id` (before it is requested, so that
    /// no change is missed); dropping the [`Waiter`] ends it.
    pub fn wait(&self, id: Uuid) -> Waiter {
        let (tx, rx) = watch::channel(None);
        self.waiting.lock().expect("poisoned").insert(id, tx);
        Waiter {
            id,
            rx,
            waiting: self.waiting.clone(),
        }
    }
}

impl Drop for Waiters {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

/// One session's wait on one approval: the last change seen.
pub(crate) struct Waiter {
    id: Uuid,
    pub rx: watch::Receiver<Option<Approval>>,
    waiting: Waiting,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.waiting.lock().expect("poisoned").remove(&self.id);
    }
}

/// Hands every change after sequence `from` to its waiter; follows again
/// from the last one seen if the stream fails.
async fn follow(approvals: Approvals, waiting: Waiting, mut from: u64) {
    loop {
        match approvals.follow_after(from).await {
            Ok(mut changes) => {
                while let Some(next) = changes.next().await {
                    match next {
                        Ok(c) => {
                            from = c.sequence;
                            if let Some(tx) = waiting.lock().expect("poisoned").get(&c.approval.id)
                            {
                                tx.send_replace(Some(c.approval));
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "an approval record was skipped");
                        }
                    }
                }
                tracing::warn!("the approvals stream ended; following it again");
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot follow the approvals stream; trying again")
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
