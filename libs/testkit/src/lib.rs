//! Helpers for integration tests only: a private `nats-server` that a test
//! may stop and restart without touching the machine's shared one, polling
//! until a condition holds, and a watchdog that ends a test binary whose
//! test hangs. Never a dependency of product code.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

/// Polls `check` every 100 ms for up to 15 s; panics naming `what` if it
/// never holds.
pub async fn eventually<F: AsyncFn() -> bool>(what: &str, check: F) {
    for _ in 0..150 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

/// A nats-server of the test's own: a free port, JetStream storage in a
/// temporary folder, stopped by its own PID only.
pub struct PrivateNats {
    pub port: u16,
    dir: PathBuf,
    /// A configuration file the server runs with, instead of flags.
    config: Option<PathBuf>,
    child: Option<tokio::process::Child>,
}

impl PrivateNats {
    pub async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir =
            std::env::temp_dir().join(format!("gatehouse-nats-{}", uuid::Uuid::new_v4().simple()));
        let mut nats = Self {
            port,
            dir,
            config: None,
            child: None,
        };
        nats.up().await;
        nats
    }

    /// A server run with the configuration `make(port, store_dir)` returns
    /// (e.g. one with TLS and users); the test gives it the free port and a
    /// storage folder of its own, which also holds the file.
    pub async fn start_with_config(make: impl FnOnce(u16, &std::path::Path) -> String) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir =
            std::env::temp_dir().join(format!("gatehouse-nats-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("nats-server.conf");
        std::fs::write(&config, make(port, &dir)).unwrap();
        let mut nats = Self {
            port,
            dir,
            config: Some(config),
            child: None,
        };
        nats.up().await;
        nats
    }

    /// The folder the server keeps its storage (and configuration) in.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts (or restarts) the server on the same port and storage.
    pub async fn up(&mut self) {
        let binary = [
            "nats-server",
            "/usr/sbin/nats-server",
            "/usr/local/bin/nats-server",
        ]
        .into_iter()
        .find(|b| {
            std::process::Command::new(b)
                .arg("--version")
                .output()
                .is_ok()
        })
        .expect("nats-server must be installed: deploy/scripts/test.sh installs it");
        let mut command = tokio::process::Command::new(binary);
        match &self.config {
            Some(config) => command.arg("-c").arg(config),
            None => command
                .args([
                    "-a",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-js",
                    "-sd",
                ])
                .arg(&self.dir),
        };
        let child = command
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("nats-server starts");
        self.child = Some(child);
        let addr = ("127.0.0.1", self.port);
        eventually("nats-server to listen", async || {
            tokio::net::TcpStream::connect(addr).await.is_ok()
        })
        .await;
    }

    /// Stops the server (by its PID) and waits until it is gone.
    pub async fn down(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.unwrap();
        }
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Ends the whole test process if it is still alive `limit` after it was
/// armed: a test that hangs (a client waiting forever on a reply that never
/// comes) then fails with its name instead of stalling the run. Disarmed
/// when dropped.
pub struct Watchdog {
    _disarm: std::sync::mpsc::Sender<()>,
}

/// Longest any one integration test may run before its watchdog fires.
pub const TEST_LIMIT: Duration = Duration::from_secs(180);

impl Watchdog {
    /// Armed for [`TEST_LIMIT`]; what every test harness uses.
    pub fn for_test() -> Self {
        Self::arm(TEST_LIMIT)
    }

    fn arm(limit: Duration) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let test = std::thread::current()
            .name()
            .unwrap_or("a test")
            .to_string();
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                use std::io::Write;
                // Straight to the process's stderr: the test harness
                // captures only the print macros.
                let _ = writeln!(
                    std::io::stderr(),
                    "watchdog: {test} still running after {limit:?}; ending the test process"
                );
                std::process::exit(101);
            }
        });
        Self { _disarm: tx }
    }
}
