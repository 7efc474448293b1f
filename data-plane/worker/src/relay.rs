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
    let key = shared
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
            client,
            backend.conn,
            client_leftover,
            backend.leftover,
        )
        .await
    };
    shared.cancels.remove(key);
    session::close(&shared, &ctx, reason, responses).await;
}

async fn pump(
    shared: &Shared,
    ctx: &session::SessionCtx,
    mut machine: Machine,
    client: crate::conn::Conn,
    target: crate::conn::Conn,
    mut cbuf: BytesMut,
    mut tbuf: BytesMut,
) -> (CloseReason, Vec<gatehouse_events::Event>) {
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
        let read_client = client_open
            && machine.accepts_client()
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
