//! The embedded event log (one SQLite file): events are durable and in
//! order when `record` returns, concurrent sessions share commits, readers
//! follow the log from any position, and the log survives reopening.

use std::collections::HashSet;
use std::path::PathBuf;

use gatehouse_eventlog::{EmbeddedLog, PublishError, Publisher, embedded::MAX_EVENT_BYTES};
use gatehouse_events::{CommandReceived, Event, Payload, Protocol, Subjects, decode};

fn command(statement: String) -> Event {
    Event::new(
        "test-worker",
        Payload::CommandReceived(CommandReceived {
            protocol: Protocol::Simple,
            statement,
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

/// A fresh directory for one test's log, removed when dropped.
struct Dir(PathBuf);

impl Dir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "gatehouse-embedded-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn log(&self) -> PathBuf {
        self.0.join("events.db")
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn all(log: &EmbeddedLog) -> Vec<gatehouse_eventlog::StoredEvent> {
    log.read(0, usize::MAX).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sessions_share_commits_and_every_event_is_stored_once_in_order() {
    let dir = Dir::new();
    let log = EmbeddedLog::open(&dir.log()).await.unwrap();
    let publisher = Publisher::embedded(log.clone(), Subjects::new("gatehouse.events"));

    // 64 "sessions" record 20 commands each, one after another, as a worker
    // does: the next only after the previous is acknowledged.
    let mut tasks = Vec::new();
    for s in 0..64 {
        let publisher = publisher.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..20 {
                publisher
                    .record(vec![command(format!("select {s}, {i}"))])
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }

    let stored = all(&log).await;
    assert_eq!(stored.len(), 64 * 20);
    let seqs: Vec<u64> = stored.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=64 * 20).collect::<Vec<u64>>());
    assert_eq!(log.last_seq(), 64 * 20);
    let mut ids = HashSet::new();
    let mut next = vec![0; 64];
    for e in &stored {
        assert_eq!(e.subject, "gatehouse.events.command_received");
        let event = decode(&e.body).unwrap().pop().unwrap();
        assert!(ids.insert(event.id), "stored twice: {}", event.id);
        let Payload::CommandReceived(c) = event.payload else {
            panic!("not a command: {event:?}")
        };
        // Each session's commands in the order it recorded them.
        let (s, i) = c.statement["select ".len()..].split_once(", ").unwrap();
        let (s, i): (usize, usize) = (s.parse().unwrap(), i.parse().unwrap());
        assert_eq!(i, next[s], "session {s} out of order");
        next[s] += 1;
    }
    // Sessions waiting together were committed (and fsync'd) together.
    assert!(
        log.commits() < 64 * 20 / 2,
        "{} commits for {} events",
        log.commits(),
        64 * 20
    );
}

#[tokio::test]
async fn events_survive_reopening_and_sequences_go_on() {
    let dir = Dir::new();
    let first: Vec<Event> = (0..3).map(|i| command(format!("select {i}"))).collect();
    {
        let log = EmbeddedLog::open(&dir.log()).await.unwrap();
        let publisher = Publisher::embedded(log.clone(), Subjects::new("p"));
        publisher.record(first.clone()).await.unwrap();
    }
    let log = EmbeddedLog::open(&dir.log()).await.unwrap();
    assert_eq!(log.last_seq(), 3);
    let publisher = Publisher::embedded(log.clone(), Subjects::new("p"));
    let later = command("select 'later'".into());
    publisher.record(vec![later.clone()]).await.unwrap();

    // Only its owner may read it (statements, masked responses).
    #[cfg(unix)]
    for file in ["events.db", "events.db-wal"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.0.join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }
    let stored = all(&log).await;
    let ids: Vec<_> = stored
        .iter()
        .map(|e| decode(&e.body).unwrap()[0].id)
        .collect();
    let expected: Vec<_> = first.iter().chain([&later]).map(|e| e.id).collect();
    assert_eq!(ids, expected);
    assert_eq!(stored.last().unwrap().seq, 4);
    // The body is the event's CloudEvents JSON, as on JetStream.
    assert_eq!(stored[0].body, first[0].to_cloudevent());
}

#[tokio::test]
async fn an_event_recorded_again_is_stored_once() {
    let dir = Dir::new();
    let log = EmbeddedLog::open(&dir.log()).await.unwrap();
    let publisher = Publisher::embedded(log.clone(), Subjects::new("p"));
    let e = command("select 1".into());
    publisher.record(vec![e.clone()]).await.unwrap();
    publisher
        .record(vec![e.clone(), command("select 2".into())])
        .await
        .unwrap();
    let stored = all(&log).await;
    assert_eq!(stored.len(), 2);
    assert_eq!(decode(&stored[0].body).unwrap()[0].id, e.id);
}

#[tokio::test]
async fn readers_follow_from_their_position() {
    let dir = Dir::new();
    let log = EmbeddedLog::open(&dir.log()).await.unwrap();
    let publisher = Publisher::embedded(log.clone(), Subjects::new("p"));
    let mut appended = log.appended();
    for i in 0..5 {
        publisher
            .record(vec![command(format!("select {i}"))])
            .await
            .unwrap();
    }
    // Told of the change, a reader at position 2 gets 3, 4 and 5.
    assert!(appended.has_changed().unwrap());
    assert_eq!(*appended.borrow_and_update(), 5);
    let rest = log.read(2, 100).await.unwrap();
    assert_eq!(rest.iter().map(|e| e.seq).collect::<Vec<_>>(), [3, 4, 5]);
    let some = log.read(0, 2).await.unwrap();
    assert_eq!(some.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2]);
    assert!(log.read(5, 100).await.unwrap().is_empty());

    // A reader that waits wakes up for the next commit.
    let waiter = tokio::spawn(async move {
        appended.changed().await.unwrap();
        *appended.borrow()
    });
    publisher
        .record(vec![command("select 'next'".into())])
        .await
        .unwrap();
    assert_eq!(waiter.await.unwrap(), 6);
}

#[tokio::test]
async fn an_event_too_large_fails_alone() {
    let dir = Dir::new();
    let log = EmbeddedLog::open(&dir.log()).await.unwrap();
    let publisher = Publisher::embedded(log.clone(), Subjects::new("p"));
    let huge = command("x".repeat(MAX_EVENT_BYTES));
    let small = command("select 1".into());
    let (a, b) = tokio::join!(
        publisher.record(vec![small.clone(), huge]),
        publisher.record(vec![small.clone()]),
    );
    assert!(
        matches!(a, Err(PublishError::TooLarge { max, .. }) if max == MAX_EVENT_BYTES),
        "{a:?}"
    );
    b.unwrap();
    // Nothing of the refused request is stored.
    let stored = all(&log).await;
    assert_eq!(stored.len(), 1);
}

/// Set in the child process of [`acknowledged_events_survive_kill_9`]: the
/// log it records into.
const CHILD_LOG: &str = "GATEHOUSE_EMBEDDED_TEST_CHILD_LOG";

/// Run as a child process only: records events from 8 tasks until killed,
/// printing each event's id once its record is acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a child process of acknowledged_events_survive_kill_9"]
async fn child_records_until_killed() {
    let path = std::env::var_os(CHILD_LOG).expect("run by acknowledged_events_survive_kill_9");
    let log = EmbeddedLog::open(std::path::Path::new(&path))
        .await
        .unwrap();
    let publisher = Publisher::embedded(log, Subjects::new("p"));
    let mut tasks = Vec::new();
    for s in 0..8 {
        let publisher = publisher.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0.. {
                let e = command(format!("select {s}, {i}"));
                let id = e.id;
                publisher.record(vec![e]).await.unwrap();
                println!("acked {id}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[test]
fn acknowledged_events_survive_kill_9() {
    use std::io::BufRead;
    let dir = Dir::new();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_records_until_killed",
            "--ignored",
            "--nocapture",
        ])
        .env(CHILD_LOG, dir.log())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut acked = HashSet::new();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    while acked.len() < 2000 {
        let line = lines.next().expect("the child stopped early").unwrap();
        if let Some(id) = line.strip_prefix("acked ") {
            acked.insert(id.parse::<uuid::Uuid>().unwrap());
        }
    }
    // SIGKILL, in the middle of recording.
    child.kill().unwrap();
    child.wait().unwrap();
    // What it printed before dying was acknowledged too.
    for line in lines.map_while(Result::ok) {
        if let Some(id) = line.strip_prefix("acked ") {
            acked.insert(id.parse::<uuid::Uuid>().unwrap());
        }
    }

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let stored = runtime.block_on(async {
        let log = EmbeddedLog::open(&dir.log()).await.unwrap();
        all(&log).await
    });
    let ids: HashSet<uuid::Uuid> = stored
        .iter()
        .map(|e| decode(&e.body).unwrap()[0].id)
        .collect();
    let lost: Vec<_> = acked.difference(&ids).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged events lost: {lost:?}",
        lost.len()
    );
    assert!(stored.len() >= acked.len());
    let seqs: Vec<u64> = stored.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=stored.len() as u64).collect::<Vec<_>>());
}

#[tokio::test]
async fn an_export_moves_the_log_into_jetstream_once_and_goes_on_later() {
    use futures::StreamExt;
    let dir = Dir::new();
    let log = EmbeddedLog::open(&dir.log()).await.unwrap();
    let publisher = Publisher::embedded(log.clone(), Subjects::new("local.events"));
    let first: Vec<Event> = (0..10).map(|i| command(format!("select {i}"))).collect();
    publisher.record(first.clone()).await.unwrap();

    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let config = gatehouse_eventlog::EventLogConfig {
        stream: format!("EXPORTTEST_{suffix}"),
        subject_prefix: format!("exporttest.{suffix}"),
        ..Default::default()
    };
    let nats = async_nats::connect(&config.nats_url).await.unwrap();
    let done = gatehouse_eventlog::export::export(&log, &nats, &config)
        .await
        .unwrap();
    assert_eq!((done.events, done.through), (10, 10));
    // Nothing new: nothing sent again.
    let again = gatehouse_eventlog::export::export(&log, &nats, &config)
        .await
        .unwrap();
    assert_eq!((again.events, again.through), (0, 10));
    // Later events follow.
    let later = command("select 'later'".into());
    publisher.record(vec![later.clone()]).await.unwrap();
    let more = gatehouse_eventlog::export::export(&log, &nats, &config)
        .await
        .unwrap();
    assert_eq!((more.events, more.through), (1, 11));

    // The stream holds each event once, in order, under its type's subject
    // of the target prefix, body as recorded.
    let js = async_nats::jetstream::new(nats);
    let stream = js.get_stream(&config.stream).await.unwrap();
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut got = Vec::new();
    while got.len() < 11 {
        let m = tokio::time::timeout(std::time::Duration::from_secs(5), messages.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(
            m.subject.as_str(),
            format!("exporttest.{suffix}.command_received")
        );
        got.push(decode(&m.payload).unwrap().remove(0));
    }
    let expected: Vec<_> = first.iter().chain([&later]).map(|e| e.id).collect();
    assert_eq!(got.iter().map(|e| e.id).collect::<Vec<_>>(), expected);
    assert_eq!(stream.clone().info().await.unwrap().state.messages, 11);
    js.delete_stream(&config.stream).await.unwrap();
}
