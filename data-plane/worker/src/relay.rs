//! The pump of an open session: one task that moves bytes between the
//! client, the target and the session machine ([`crate::machine`]), and
//! hands events to the publisher. Everything the session decides is in the
//! machine; this file only reads, writes and waits.
//!
//! Both directions are served by one `select!` loop: reads from either side
//! are fed to the machine, whatever it has for either side is written as
//! soon as the socket takes it (so a peer that is slow to read never blocks
//! the other direction), and each side's reads pause while its output
//! backs up, which bounds memory.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;

use bytes::{Buf, BytesMut};
use gatehouse_events::CloseReason;
use gatehouse_pgwire as pg;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::Shared;
use crate::conn::send;
use crate::machine::{Machine, RecordError};
use crate::session::{self, Opened};
use gatehouse_eventlog::PublishError;
use gatehouse_events::approval::{Approval, ApprovalState, Change};
use gatehouse_policystore::approvals::{ApprovalError, Approvals};

/// Output for one side beyond which reading the other side pauses.
const BACKLOG: usize = 256 * 1024;
/// How long a session is quiet before its response events are recorded
/// on their own rather than with its next command's.
const QUIET: std::time::Duration = std::time::Duration::from_millis(50);
/// Client input buffered beyond what the machine took (it waits on a
/// barrier) before reading the client pauses.
const CLIENT_AHEAD: usize = 256 * 1024;

type Recording = Pin<Box<dyn Future<Output = Result<(), RecordError>> + Send>>;

pub(crate) async fn run(shared: Arc<Shared>, mut client: crate::conn::Conn, opened: Opened) {
    let Opened {
        ctx,
        backend,
        target,
        client_leftover,
        policy,
        parsing,
        mask,
    } = opened;
    let (key, cancel_requests) =
        shared
            .cancels
            .register(target.clone(), backend.process_id, backend.secret_key);

    let mut hello = BytesMut::new();
    pg::authentication_ok(&mut hello);
    for (k, v) in &backend.parameters {
        let shown = crate::machine::shown_to_client(k.as_bytes(), &ctx.identity.username);
        pg::parameter_status(&mut hello, k, shown.map_or(v.as_str(), |(_, s)| s));
    }
    pg::backend_key_data(&mut hello, key.0, key.1);
    pg::ready_for_query(&mut hello, backend.status);
    let (reason, responses) = if send(&mut client, &hello).await.is_err() {
        (CloseReason::ClientDisconnected, Vec::new())
    } else {
        let token_deadline = shared.config.session_deadline(
            ctx.expires_at + ctx.leeway_secs,
            chrono::Utc::now().timestamp(),
        );
        let machine = Machine::new(
            ctx.clone(),
            policy,
            parsing,
            backend.status,
            crate::machine::Limits::of(&shared.config),
            token_deadline,
            mask,
        );
        pump(
            &shared,
            &ctx,
            machine,
            Sides {
                client,
                target: backend.conn,
                cbuf: client_leftover,
                tbuf: backend.leftover,
            },
            cancel_requests,
        )
        .await
    };
    shared.cancels.remove(key);
    session::close(&shared, &ctx, reason, responses).await;
}

/// Both connections of a session, with what was read from each beyond
/// the login.
struct Sides {
    client: crate::conn::Conn,
    target: crate::conn::Conn,
    cbuf: BytesMut,
    tbuf: BytesMut,
}

async fn pump(
    shared: &Shared,
    ctx: &session::SessionCtx,
    mut machine: Machine,
    sides: Sides,
    mut cancel_requests: tokio::sync::watch::Receiver<u64>,
) -> (CloseReason, Vec<gatehouse_events::Event>) {
    let Sides {
        client,
        target,
        mut cbuf,
        mut tbuf,
    } = sides;
    let (mut crd, mut cwr) = tokio::io::split(client);
    let (mut trd, mut twr) = tokio::io::split(target);
    let max_message = shared.config.max_message_bytes;
    let mut closing = shared.closing.clone();
    // One waiter for the whole session, not one registered and dropped per
    // turn of the loop.
    let mut closing = std::pin::pin!(async move { closing.wait_for(|c| *c).await.is_ok() });
    let mut shutting_down = false;
    let mut recording: Option<Recording> = None;
    let mut responding: Option<Recording> = None;
    // The parked command's approval: being requested, or awaited, and the
    // session's wait on it.
    let mut approving: Option<Approving> = None;
    let mut waiter: Option<crate::approvals::Waiter> = None;
    // Revocations reach a command waiting for its approval at once.
    let mut policies = shared.policies.clone();
    let mut awaiting_decision = false;
    let mut client_open = true;
    let mut target_open = true;
    // Written but maybe still in the TLS layer's buffer.
    let mut client_unflushed = false;
    let mut target_unflushed = false;
    cbuf.reserve(16 * 1024);
    tbuf.reserve(64 * 1024);
    let reason = loop {
        if !tbuf.is_empty() {
            machine.target_input(&mut tbuf);
        }
        if recording.is_none() && machine.has_client_work(&cbuf) {
            let state = shared.policies.borrow().clone();
            machine.client_input(&mut cbuf, &state, chrono::Utc::now().timestamp());
        }
        if recording.is_none()
            && let Some(events) = machine.take_events()
        {
            recording = Some(record(shared, events));
        }
        if let Some(approval) = machine.take_approval() {
            waiter = Some(shared.approvals.wait(approval.id));
            approving = Some(Box::pin(request_approval(
                shared.approvals.approvals.clone(),
                approval,
            )));
            awaiting_decision = false;
        }
        // Response events go with the next command's; a part's worth is
        // recorded on its own at once, beside the commands.
        if responding.is_none()
            && machine.responses_due()
            && let Some(events) = machine.flush_responses()
        {
            responding = Some(record(shared, events));
        }
        if let Some(reason) = machine.ended() {
            break reason;
        }
        if !client_open {
            machine.to_client.clear();
        }
        // While a command waits for its approval the client is still read
        // (into the buffer, up to a limit), so that its leaving is seen.
        let read_client = client_open
            && (machine.accepts_client() || machine.awaited_approval().is_some())
            && recording.is_none()
            && machine.to_target.len() < BACKLOG
            && (cbuf.len() < CLIENT_AHEAD || frame_incomplete(&cbuf, max_message));
        let read_target =
            target_open && machine.to_client.len() < BACKLOG && machine.accepts_target();
        tokio::select! {
            r = write_and_flush(&mut cwr, &machine.to_client), if client_open && (client_unflushed || !machine.to_client.is_empty()) => match r {
                Ok(w) => {
                    machine.to_client.advance(w.written);
                    ctx.bytes_to_client.fetch_add(w.written as u64, Ordering::Relaxed);
                    client_unflushed = !w.flushed;
                }
                Err(_) if machine.client_terminated() => client_open = false,
                Err(_) => break CloseReason::ClientDisconnected,
            },
            r = write_and_flush(&mut twr, &machine.to_target), if target_open && (target_unflushed || !machine.to_target.is_empty()) => match r {
                Ok(w) => {
                    machine.to_target.advance(w.written);
                    target_unflushed = !w.flushed;
                }
                Err(_) => break CloseReason::TargetDisconnected,
            },
            r = async { recording.as_mut().expect("guarded").await }, if recording.is_some() => {
                recording = None;
                machine.recorded(r);
            }
            r = trd.read_buf(&mut tbuf), if read_target => match r {
                Ok(n) if n > 0 => {}
                _ => {
                    target_open = false;
                    machine.target_input(&mut tbuf);
                    machine.target_closed();
                }
            },
            r = crd.read_buf(&mut cbuf), if read_client => match r {
                Ok(n) if n > 0 => {
                    ctx.bytes_from_client.fetch_add(n as u64, Ordering::Relaxed);
                }
                _ => {
                    client_open = false;
                    if !machine.client_terminated() {
                        break CloseReason::ClientDisconnected;
                    }
                }
            },
            step = async { approving.as_mut().expect("guarded").await }, if approving.is_some() => {
                approving = None;
                match step {
                    ApprovalStep::Requested(r) => {
                        let recorded = r.is_ok();
                        machine.approval_requested(r);
                        if recorded
                            && let Some(a) = machine.awaited_approval()
                            && let Some(w) = &waiter
                        {
                            // Cancel requests from now on withdraw it.
                            cancel_requests.borrow_and_update();
                            approving = Some(Box::pin(await_decision(
                                shared.approvals.approvals.clone(),
                                a.clone(),
                                w.rx.clone(),
                            )));
                            awaiting_decision = true;
                        }
                    }
                    ApprovalStep::Decided(a) => {
                        awaiting_decision = false;
                        waiter = None;
                        let state = shared.policies.borrow().clone();
                        machine.approval_decided(&a, &state, chrono::Utc::now().timestamp());
                    }
                }
            }
            r = policies.changed(), if awaiting_decision => {
                let state = policies.borrow_and_update().clone();
                if r.is_ok() && machine.revoked(&state) && let Some(a) = machine.awaited_approval() {
                    approving = Some(withdraw(shared, a, "revoked"));
                    awaiting_decision = false;
                }
            }
            r = cancel_requests.changed(), if awaiting_decision => {
                if r.is_ok() && let Some(a) = machine.awaited_approval() {
                    approving = Some(withdraw(shared, a, "client_cancelled"));
                }
                awaiting_decision = false;
            }
            r = async { responding.as_mut().expect("guarded").await }, if responding.is_some() => {
                responding = None;
                machine.responses_recorded(r);
            }
            // A quiet session records its response events on their own.
            _ = tokio::time::sleep(QUIET), if responding.is_none() && recording.is_none() && machine.responses_waiting() => {
                if let Some(events) = machine.flush_responses() {
                    responding = Some(record(shared, events));
                }
            }
            _ = &mut closing, if !shutting_down => {
                shutting_down = true;
                machine.shutdown();
            }
        }
    };
    // A command still waiting for its approval is withdrawn: it never runs.
    if let Some(a) = machine.awaited_approval() {
        let why = match reason {
            CloseReason::ClientDisconnected | CloseReason::ClientTerminated => {
                "client_disconnected"
            }
            CloseReason::WorkerShutdown => "worker_shutdown",
            _ => "session_ended",
        };
        end_approval(
            &shared.approvals.approvals,
            a,
            Change::Cancel { reason: why.into() },
        )
        .await;
    }
    // Whatever the machine still has for the client goes out (its last
    // word, a FATAL, among it), then both connections close.
    if client_open && !machine.to_client.is_empty() {
        let _ = send(&mut cwr, &machine.to_client).await;
    }
    let _ = cwr.shutdown().await;
    if target_open {
        let mut bye = BytesMut::new();
        pg::terminate(&mut bye);
        let _ = send(&mut twr, &bye).await;
        let _ = twr.shutdown().await;
    }
    (reason, machine.remaining_responses())
}

type Approving = Pin<Box<dyn Future<Output = ApprovalStep> + Send>>;

/// Where a parked command's approval got to.
enum ApprovalStep {
    /// The request was recorded, or not.
    Requested(Result<(), RecordError>),
    /// It ended (granted, denied, expired or withdrawn).
    Decided(Box<Approval>),
}

async fn request_approval(approvals: Approvals, approval: Approval) -> ApprovalStep {
    ApprovalStep::Requested(
        approvals
            .request(&approval)
            .await
            .map_err(|e| RecordError::Unavailable(e.to_string())),
    )
}

/// Waits for the approval to end: as the worker's follower of the
/// approvals stream reports it (`changes`), or, at its expiry, by expiring
/// it (a decision recorded first wins).
async fn await_decision(
    approvals: Approvals,
    approval: Approval,
    mut changes: tokio::sync::watch::Receiver<Option<Approval>>,
) -> ApprovalStep {
    let left = (approval.expires_at - chrono::Utc::now())
        .to_std()
        .unwrap_or_default();
    let expiry = tokio::time::sleep(left);
    tokio::pin!(expiry);
    let decided = tokio::select! {
        ended = changes.wait_for(|a| a.as_ref().is_some_and(|a| a.state.is_terminal())) => {
            ended.ok().and_then(|a| a.clone())
        }
        _ = &mut expiry => None,
    };
    if let Some(a) = decided {
        return ApprovalStep::Decided(Box::new(a));
    }
    // Expired, or the follower is gone (the worker is stopping): it
    // expires at its time.
    expiry.await;
    ApprovalStep::Decided(Box::new(
        end_approval(&approvals, &approval, Change::Expire).await,
    ))
}

/// Withdraws the awaited approval (`cancelled`, for `reason`), then
/// reports how it ended.
fn withdraw(shared: &Shared, approval: &Approval, reason: &str) -> Approving {
    let (approvals, approval) = (shared.approvals.approvals.clone(), approval.clone());
    let change = Change::Cancel {
        reason: reason.into(),
    };
    Box::pin(async move {
        ApprovalStep::Decided(Box::new(end_approval(&approvals, &approval, change).await))
    })
}

/// Ends a pending approval with `change` (expiry, withdrawal), and returns
/// how it ended: by `change`, or by the decision recorded first. If the
/// store cannot be reached, the change is applied to the worker's copy:
/// the command does not run either way.
async fn end_approval(approvals: &Approvals, approval: &Approval, change: Change) -> Approval {
    let now = chrono::Utc::now();
    let local = || {
        approval.apply(&change, now).unwrap_or_else(|_| {
            let mut a = approval.clone();
            a.state = ApprovalState::Cancelled;
            a
        })
    };
    match approvals.change(approval.id, &change, now).await {
        Ok(a) => a,
        Err(ApprovalError::Refused(_)) => match approvals.get(approval.id).await {
            Ok(Some((a, _))) if a.state.is_terminal() => a,
            _ => local(),
        },
        Err(e) => {
            tracing::warn!(approval = %approval.id, change = change.name(), error = %e, "cannot record the end of the approval; the command does not run");
            local()
        }
    }
}

/// Records events through the shared publisher.
fn record(shared: &Shared, events: Vec<gatehouse_events::Event>) -> Recording {
    let publisher = shared.publisher.clone();
    Box::pin(async move {
        publisher.record(events).await.map_err(|e| match e {
            PublishError::TooLarge { size, max } => RecordError::TooLarge { size, max },
            e => RecordError::Unavailable(e.to_string()),
        })
    })
}

/// Whether `buf` starts with a frame whose bytes have not all arrived: its
/// reading goes on (up to the largest message accepted) however much is
/// buffered, or a statement larger than [`CLIENT_AHEAD`] would never arrive.
fn frame_incomplete(buf: &[u8], max_message: usize) -> bool {
    matches!(pg::pending_frame_len(buf, max_message), Ok(Some(len)) if len > buf.len())
}

/// What one [`write_and_flush`] did.
struct Written {
    written: usize,
    flushed: bool,
}

/// Writes as much of `bytes` as the socket takes now, then flushes if all
/// of it went (over TLS the last records may wait in the TLS layer until
/// flushed, and a peer waiting for them would wait forever). Ready once
/// anything was written or flushed; all of it happens within one poll, so
/// dropping the future loses nothing (`select!` drops it when another
/// branch wins).
async fn write_and_flush<W: AsyncWrite + Unpin>(
    w: &mut W,
    bytes: &[u8],
) -> std::io::Result<Written> {
    std::future::poll_fn(|cx| {
        let mut written = 0;
        while written < bytes.len() {
            match Pin::new(&mut *w).poll_write(cx, &bytes[written..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending if written == 0 => return Poll::Pending,
                Poll::Pending => {
                    return Poll::Ready(Ok(Written {
                        written,
                        flushed: false,
                    }));
                }
            }
        }
        match Pin::new(&mut *w).poll_flush(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(Written {
                written,
                flushed: true,
            })),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending if written == 0 => Poll::Pending,
            Poll::Pending => Poll::Ready(Ok(Written {
                written,
                flushed: false,
            })),
        }
    })
    .await
}
