//! The publisher against the machine's real NATS (127.0.0.1:4222): many
//! concurrent sessions' events are stored exactly once, grouped into fewer
//! messages than events; with the server gone, recording fails at once.

use std::collections::HashSet;

use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use gatehouse_eventlog::{EventLogConfig, PublishError, Publisher, ensure_stream};
use gatehouse_events::{CommandReceived, Event, Payload, Protocol, decode};
use gatehouse_testkit::PrivateNats;

fn command(i: usize) -> Event {
    Event::new(
        "test-worker",
        Payload::CommandReceived(CommandReceived {
            protocol: Protocol::Simple,
            statement: format!("select {i}"),
            statement_name: None,
            portal: None,
            params: Vec::new(),
            executes: Vec::new(),
            decision: None,
            redactions: Vec::new(),
            approval: None,
        }),
    )
}

fn config(url: &str) -> EventLogConfig {
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    EventLogConfig {
        nats_url: url.into(),
        stream: format!("PUBTEST_{suffix}"),
        subject_prefix: format!("pubtest.{suffix}"),
        publish_timeout_ms: 2000,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_events_are_stored_once_in_fewer_messages() {
    let nats = async_nats::connect("nats://127.0.0.1:4222").await.unwrap();
    let js = jetstream::new(nats.clone());
    let config = config("nats://127.0.0.1:4222");
    let stream = ensure_stream(&js, &config).await.unwrap();
    let publisher = Publisher::start(nats.clone(), &config);

    // 64 "sessions" record 20 commands each, one after another, as a worker
    // does: the next only after the previous is acknowledged.
    let mut tasks = Vec::new();
    let mut expected = HashSet::new();
    for s in 0..64 {
        let events: Vec<Event> = (0..20).map(|i| command(s * 100 + i)).collect();
        expected.extend(events.iter().map(|e| e.id));
        let publisher = publisher.clone();
        tasks.push(tokio::spawn(async move {
            for e in events {
                publisher.record(vec![e]).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }

    let consumer = stream
        .create_consumer(pull::Config::default())
        .await
        .unwrap();
    let info = js
        .get_stream(&config.stream)
        .await
        .unwrap()
        .cached_info()
        .clone();
    let messages = info.state.messages as usize;
    let mut seen = HashSet::new();
    let mut batch = consumer
        .fetch()
        .max_messages(10_000)
        .messages()
        .await
        .unwrap();
    while seen.len() < expected.len() {
        let msg = batch.next().await.expect("all events arrive").unwrap();
        for e in decode(&msg.payload).unwrap() {
            assert!(seen.insert(e.id), "event {} stored twice", e.id);
        }
    }
    assert_eq!(seen, expected);
    assert!(
        messages < expected.len(),
        "{messages} messages for {} events: no grouping happened",
        expected.len()
    );
    js.delete_stream(&config.stream).await.unwrap();
}

fn command_text(text: String) -> Event {
    let mut e = command(0);
    if let Payload::CommandReceived(c) = &mut e.payload {
        c.statement = text;
    }
    e
}

/// Messages are cut by the encoded size of their events (JSON escaping
/// grows a control character six-fold), never past the server's
/// `max_payload`; an event no message can carry fails its own request and
/// no other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_events_never_sink_other_sessions_events() {
    let nats = async_nats::connect("nats://127.0.0.1:4222").await.unwrap();
    let js = jetstream::new(nats.clone());
    let config = config("nats://127.0.0.1:4222");
    let stream = ensure_stream(&js, &config).await.unwrap();
    let publisher = Publisher::start(nats.clone(), &config);
    let max = nats.max_payload();

    let start = std::sync::Arc::new(tokio::sync::Barrier::new(40));
    let mut tasks = Vec::new();
    for s in 0..40usize {
        let publisher = publisher.clone();
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            let mut stored = Vec::new();
            start.wait().await;
            for i in 0..4 {
                let e = match s {
                    // 150 kB of control characters: some 900 kB encoded.
                    0..=5 => command_text("\u{1}".repeat(150_000)),
                    6 if i == 2 => command_text("\u{1}".repeat(max / 3)),
                    _ => command(s * 100 + i),
                };
                let id = e.id;
                match publisher.record(vec![e]).await {
                    Ok(()) => stored.push(id),
                    Err(PublishError::TooLarge { size, max: limit }) => {
                        assert_eq!((s, i), (6, 2), "only the oversized event fails");
                        assert!(size > limit && limit < max, "{size} {limit} {max}");
                    }
                    Err(e) => panic!("session {s}, command {i}: {e}"),
                }
            }
            stored
        }));
    }
    let mut expected = HashSet::new();
    for t in tasks {
        expected.extend(t.await.unwrap());
    }
    assert_eq!(expected.len(), 40 * 4 - 1);

    let consumer = stream
        .create_consumer(pull::Config::default())
        .await
        .unwrap();
    let mut seen = HashSet::new();
    let mut batch = consumer
        .fetch()
        .max_messages(10_000)
        .messages()
        .await
        .unwrap();
    while seen.len() < expected.len() {
        let msg = batch.next().await.expect("all events arrive").unwrap();
        assert!(msg.payload.len() <= max, "{} bytes", msg.payload.len());
        for e in decode(&msg.payload).unwrap() {
            assert!(seen.insert(e.id), "event {} stored twice", e.id);
        }
    }
    assert_eq!(seen, expected);
    js.delete_stream(&config.stream).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recording_fails_at_once_while_disconnected() {
    let mut server = PrivateNats::start().await;
    let nats = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(nats.clone());
    let config = config(&server.url());
    ensure_stream(&js, &config).await.unwrap();
    let publisher = Publisher::start(nats.clone(), &config);
    publisher.record(vec![command(1)]).await.unwrap();

    server.down().await;
    gatehouse_testkit::eventually("the client to notice", async || {
        nats.connection_state() != async_nats::connection::State::Connected
    })
    .await;
    let started = std::time::Instant::now();
    let err = publisher.record(vec![command(2)]).await.unwrap_err();
    assert!(matches!(err, PublishError::Disconnected), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_millis(500));
}

/// A TCP relay to a NATS server that can stop passing bytes on, both ways,
/// while the connection stays open: the client still counts as connected,
/// and no ack comes back.
struct FreezingRelay {
    port: u16,
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FreezingRelay {
    async fn start(upstream: String) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        async fn pipe(
            mut from: tokio::net::tcp::OwnedReadHalf,
            mut to: tokio::net::tcp::OwnedWriteHalf,
            frozen: std::sync::Arc<AtomicBool>,
        ) {
            let mut buf = vec![0; 64 * 1024];
            loop {
                let n = match from.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                while frozen.load(Ordering::SeqCst) {
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let frozen = std::sync::Arc::new(AtomicBool::new(false));
        let f = frozen.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = tokio::net::TcpStream::connect(&upstream).await.unwrap();
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pipe(cr, sw, f.clone()));
                tokio::spawn(pipe(sr, cw, f.clone()));
            }
        });
        Self { port, frozen }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn freeze(&self, on: bool) {
        self.frozen.store(on, std::sync::atomic::Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recording_times_out_when_no_ack_comes_and_recovers() {
    let server = PrivateNats::start().await;
    let relay = FreezingRelay::start(server.url().trim_start_matches("nats://").to_string()).await;
    let nats = async_nats::connect(relay.url()).await.unwrap();
    let js = jetstream::new(nats.clone());
    let config = EventLogConfig {
        publish_timeout_ms: 500,
        max_in_flight: 2,
        ..config(&relay.url())
    };
    ensure_stream(&js, &config).await.unwrap();
    let publisher = Publisher::start(nats.clone(), &config);
    publisher.record(vec![command(1)]).await.unwrap();

    // More sessions than batches in flight: the last ones wait for room,
    // then for their own ack, and every one of them times out.
    relay.freeze(true);
    let started = std::time::Instant::now();
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let publisher = publisher.clone();
            tokio::spawn(async move { publisher.record(vec![command(10 + i)]).await })
        })
        .collect();
    for t in tasks {
        let err = t.await.unwrap().unwrap_err();
        assert!(matches!(err, PublishError::Timeout(_)), "{err}");
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= std::time::Duration::from_millis(450),
        "timed out after {elapsed:?}, before the publish timeout"
    );
    assert!(
        elapsed < std::time::Duration::from_secs(5),
        "{elapsed:?}: batches waiting for room were not answered"
    );
    assert_eq!(
        nats.connection_state(),
        async_nats::connection::State::Connected
    );

    relay.freeze(false);
    gatehouse_testkit::eventually("recording to work again", async || {
        publisher.record(vec![command(100)]).await.is_ok()
    })
    .await;
}
