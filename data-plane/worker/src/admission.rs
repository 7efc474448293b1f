//! Who may hold a connection, and how many failed logins an address may
//! cost: the worker's admission limits, and the counters that show them.
//!
//! - **Connections**: at most `max_connections` open at once (handshakes
//!   and sessions alike), and at most `max_connections_per_address` from
//!   one source address. Over either, the connection is answered with
//!   `53300` and closed before any TLS work is spent on it.
//! - **Failed logins**: each source address has a bucket of
//!   `auth_failures_per_minute` failures that refills continuously. While
//!   it is empty, the address's login attempts are refused right after the
//!   startup message (`53300`, saying when to retry), before the token is
//!   verified or anything is recorded; only the first refusal of such a
//!   spell is recorded. One address flooding bad logins can neither fill
//!   the audit log nor use the identity provider's keys as a CPU sink.
//!
//! Everything here is counted in [`Counters`], which `/metrics` shows.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::WorkerConfig;
use crate::error::ClientError;

/// Counters of the worker's limits and sessions, read by `/metrics`.
#[derive(Default)]
pub(crate) struct Counters {
    pub connections_open: AtomicU64,
    pub connections_accepted: AtomicU64,
    pub refused_worker_full: AtomicU64,
    pub refused_address_full: AtomicU64,
    pub startup_timeouts: AtomicU64,
    pub auth_failures: AtomicU64,
    pub auth_rate_limited: AtomicU64,
    pub sessions_opened: AtomicU64,
    /// Commands refused at a session limit.
    pub message_too_large: AtomicU64,
    pub statement_too_long: AtomicU64,
    pub prepared_bytes_exceeded: AtomicU64,
}

impl Counters {
    /// The counters in Prometheus' text format.
    pub fn render(&self) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            for (labels, value) in samples {
                out.push_str(&format!("{name}{labels} {value}\n"));
            }
        };
        metric(
            "gatehouse_worker_connections_open",
            "gauge",
            "Client connections open, in their handshake or in a session.",
            &[("", get(&self.connections_open))],
        );
        metric(
            "gatehouse_worker_connections_accepted_total",
            "counter",
            "Client connections accepted within the connection limits.",
            &[("", get(&self.connections_accepted))],
        );
        metric(
            "gatehouse_worker_connections_refused_total",
            "counter",
            "Client connections refused at a limit.",
            &[
                (
                    "{limit=\"max_connections\"}",
                    get(&self.refused_worker_full),
                ),
                (
                    "{limit=\"max_connections_per_address\"}",
                    get(&self.refused_address_full),
                ),
                (
                    "{limit=\"startup_timeout_secs\"}",
                    get(&self.startup_timeouts),
                ),
                (
                    "{limit=\"auth_failures_per_minute\"}",
                    get(&self.auth_rate_limited),
                ),
            ],
        );
        metric(
            "gatehouse_worker_commands_refused_total",
            "counter",
            "Client messages refused at a session limit.",
            &[
                (
                    "{limit=\"max_message_bytes\"}",
                    get(&self.message_too_large),
                ),
                (
                    "{limit=\"max_statement_bytes\"}",
                    get(&self.statement_too_long),
                ),
                (
                    "{limit=\"max_session_prepared_bytes\"}",
                    get(&self.prepared_bytes_exceeded),
                ),
            ],
        );
        metric(
            "gatehouse_worker_auth_failures_total",
            "counter",
            "Login attempts refused (bad token, user mismatch, revoked, ...).",
            &[("", get(&self.auth_failures))],
        );
        metric(
            "gatehouse_worker_sessions_opened_total",
            "counter",
            "Sessions opened (authenticated and logged in to their target).",
            &[("", get(&self.sessions_opened))],
        );
        out
    }
}

/// The worker's admission limits and their state.
pub(crate) struct Admission {
    max_connections: usize,
    max_per_address: usize,
    failures_per_minute: u32,
    state: Mutex<State>,
    pub counters: Arc<Counters>,
}

#[derive(Default)]
struct State {
    open: usize,
    per_address: HashMap<IpAddr, usize>,
    failures: HashMap<IpAddr, Bucket>,
}

/// Failed logins an address may still cost, refilled continuously.
struct Bucket {
    tokens: f64,
    at: Instant,
    /// Whether the refusal that started the current spell was recorded.
    spell_recorded: bool,
}

/// One admitted connection; dropping it gives its place back.
pub(crate) struct Permit {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut state = self.admission.state.lock().expect("admission lock");
        state.open -= 1;
        if let Some(n) = state.per_address.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                state.per_address.remove(&self.ip);
            }
        }
        self.admission
            .counters
            .connections_open
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a login attempt from an address may do now.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum LoginGate {
    Open,
    /// Refused until a failure's worth has refilled; `record` for the first
    /// refusal of a spell.
    Closed {
        retry_after: Duration,
        record: bool,
    },
}

impl Admission {
    /// Most addresses whose failures are remembered; past it, the fullest
    /// buckets are forgotten first (they owe nothing).
    const MAX_TRACKED: usize = 100_000;

    pub fn new(config: &WorkerConfig) -> Arc<Self> {
        Arc::new(Self {
            max_connections: config.max_connections,
            max_per_address: config.max_connections_per_address,
            failures_per_minute: config.auth_failures_per_minute,
            state: Mutex::new(State::default()),
            counters: Arc::default(),
        })
    }

    /// A place for a new connection from `ip`, or the error it is answered
    /// with.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Permit, ClientError> {
        let mut state = self.state.lock().expect("admission lock");
        if state.open >= self.max_connections {
            self.counters
                .refused_worker_full
                .fetch_add(1, Ordering::Relaxed);
            return Err(ClientError::fatal(
                "53300",
                format!(
                    "this Gatehouse worker has reached its limit of {} connections \
                     (max_connections); try again later or another worker",
                    self.max_connections
                ),
            ));
        }
        let from_ip = state.per_address.get(&ip).copied().unwrap_or(0);
        if from_ip >= self.max_per_address {
            self.counters
                .refused_address_full
                .fetch_add(1, Ordering::Relaxed);
            return Err(ClientError::fatal(
                "53300",
                format!(
                    "too many connections from {ip}: this Gatehouse worker takes at most {} \
                     from one address (max_connections_per_address)",
                    self.max_per_address
                ),
            ));
        }
        state.open += 1;
        *state.per_address.entry(ip).or_default() += 1;
        drop(state);
        self.counters
            .connections_accepted
            .fetch_add(1, Ordering::Relaxed);
        self.counters
            .connections_open
            .fetch_add(1, Ordering::Relaxed);
        Ok(Permit {
            admission: self.clone(),
            ip,
        })
    }

    /// Whether a login attempt from `ip` may go on at `now`.
    pub fn login_gate(&self, ip: IpAddr, now: Instant) -> LoginGate {
        let mut state = self.state.lock().expect("admission lock");
        let rate = self.failures_per_minute;
        let Some(bucket) = state.failures.get_mut(&ip) else {
            return LoginGate::Open;
        };
        refill(bucket, rate, now);
        if bucket.tokens >= 1.0 {
            bucket.spell_recorded = false;
            return LoginGate::Open;
        }
        self.counters
            .auth_rate_limited
            .fetch_add(1, Ordering::Relaxed);
        let retry_after = Duration::from_secs_f64((1.0 - bucket.tokens) * 60.0 / f64::from(rate));
        let record = !bucket.spell_recorded;
        bucket.spell_recorded = true;
        LoginGate::Closed {
            retry_after,
            record,
        }
    }

    /// Counts a failed login from `ip` at `now`; whether it is to be
    /// recorded (it is while the address's budget lasts: attempts already
    /// past the gate when it closed are counted, not recorded).
    pub fn login_failed(&self, ip: IpAddr, now: Instant) -> bool {
        self.counters.auth_failures.fetch_add(1, Ordering::Relaxed);
        let rate = self.failures_per_minute;
        let mut state = self.state.lock().expect("admission lock");
        if state.failures.len() >= Self::MAX_TRACKED && !state.failures.contains_key(&ip) {
            state.failures.retain(|_, b| {
                refill(b, rate, now);
                b.tokens < f64::from(rate)
            });
        }
        let bucket = state.failures.entry(ip).or_insert(Bucket {
            tokens: f64::from(rate),
            at: now,
            spell_recorded: false,
        });
        refill(bucket, rate, now);
        let within = bucket.tokens >= 1.0;
        bucket.tokens = (bucket.tokens - 1.0).max(0.0);
        within
    }
}

fn refill(bucket: &mut Bucket, per_minute: u32, now: Instant) {
    let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
    let rate = f64::from(per_minute);
    bucket.tokens = (bucket.tokens + elapsed * rate / 60.0).min(rate);
    bucket.at = now;
}

/// `text` cut to at most `max` bytes at a character boundary, for
/// attacker-chosen strings recorded before authentication.
pub(crate) fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(max: usize, per_address: usize, failures: u32) -> Arc<Admission> {
        Admission::new(&WorkerConfig {
            max_connections: max,
            max_connections_per_address: per_address,
            auth_failures_per_minute: failures,
            ..WorkerConfig::default()
        })
    }

    #[test]
    fn connections_are_limited_per_worker_and_per_address() {
        let a = admission(3, 2, 10);
        let one: IpAddr = "10.0.0.1".parse().unwrap();
        let two: IpAddr = "10.0.0.2".parse().unwrap();
        let p1 = a.admit(one).unwrap();
        let _p2 = a.admit(one).unwrap();
        let e = a.admit(one).err().expect("third from one address");
        assert_eq!(e.sqlstate, "53300");
        assert!(e.message.contains("10.0.0.1"), "{}", e.message);
        let _p3 = a.admit(two).unwrap();
        let e = a.admit(two).err().expect("worker full");
        assert!(e.message.contains("max_connections"), "{}", e.message);
        drop(p1);
        let _p4 = a.admit(two).expect("a place was given back");
        assert_eq!(a.counters.refused_worker_full.load(Ordering::Relaxed), 1);
        assert_eq!(a.counters.refused_address_full.load(Ordering::Relaxed), 1);
        assert_eq!(a.counters.connections_open.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn failed_logins_close_the_gate_for_their_address_until_it_refills() {
        let a = admission(10, 10, 3);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(a.login_gate(ip, t0), LoginGate::Open);
            assert!(a.login_failed(ip, t0), "within the budget: recorded");
        }
        // An attempt that passed the gate before it closed fails late: it
        // is counted, not recorded.
        assert!(!a.login_failed(ip, t0));
        let LoginGate::Closed {
            retry_after,
            record,
        } = a.login_gate(ip, t0)
        else {
            panic!("the gate is open after three failures");
        };
        assert!(record, "the first refusal of a spell is recorded");
        assert_eq!(retry_after, Duration::from_secs(20));
        assert!(matches!(
            a.login_gate(ip, t0 + Duration::from_secs(1)),
            LoginGate::Closed { record: false, .. }
        ));
        assert_eq!(a.login_gate(other, t0), LoginGate::Open);
        // A third of a minute refills one failure's worth at 3 a minute.
        assert_eq!(
            a.login_gate(ip, t0 + Duration::from_secs(20)),
            LoginGate::Open
        );
        a.login_failed(ip, t0 + Duration::from_secs(20));
        assert!(matches!(
            a.login_gate(ip, t0 + Duration::from_secs(20)),
            LoginGate::Closed { record: true, .. }
        ));
        assert_eq!(a.counters.auth_failures.load(Ordering::Relaxed), 5);
        assert_eq!(a.counters.auth_rate_limited.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncate("abc", 63), "abc");
        assert_eq!(truncate(&"é".repeat(40), 63), "é".repeat(31));
        assert_eq!(truncate(&"x".repeat(100), 63).len(), 63);
    }
}
