#!/usr/bin/env python3
"""A large result through a Gatehouse worker: memory stays flat, time vs direct.

Starts its own nats-server (free port, temporary store) and `gatehouse dev`
(worker and control plane in one process, built-in defaults: responses
masked with every detector, and recorded) against the PostgreSQL on
127.0.0.1:5432. A table of 5,000,000 rows (`id`, a name, an e-mail
address on one row in ten) is read with one simple-protocol `SELECT`,
through the worker and directly over TLS, by a client that reads the
result as fast as it arrives and keeps none of it. For 50,000 and for
5,000,000 rows it prints the time of each path (median of ROUNDS runs),
the ratio, and the worker process's peak resident memory during the
gatehouse runs (VmRSS sampled every 20 ms), which must be about the same
for both sizes.

Usage: GATEHOUSE_BIN=target/release/gatehouse python3 loadtest/stream.py
Env: ROUNDS (3), ROWS (5000000). It stops only what it started.
"""
import os, shutil, signal, socket, ssl, statistics, struct, subprocess, sys, tempfile
import threading, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rss import free_port, login, mem, psql, wait_port  # noqa: E402

BIN = os.environ.get("GATEHOUSE_BIN", "target/release/gatehouse")
PG = "postgres://postgres@127.0.0.1:5432"
ROUNDS = int(os.environ.get("ROUNDS", "3"))
ROWS = int(os.environ.get("ROWS", "5000000"))
READY = b"Z\0\0\0\x05I"


def direct_login(db):
    """A TLS session straight to PostgreSQL (trust authentication)."""
    raw = socket.create_connection(("127.0.0.1", 5432))
    raw.sendall(struct.pack("!ii", 8, 80877103))
    if raw.recv(1) != b"S":
        sys.exit("PostgreSQL on 127.0.0.1:5432 does not offer TLS")
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    s = ctx.wrap_socket(raw)
    body = b"".join(x.encode() + b"\0" for x in ["user", "postgres", "database", db]) + b"\0"
    s.sendall(struct.pack("!ii", len(body) + 8, 196608) + body)
    got = b""
    while not got.endswith(READY):
        chunk = s.recv(65536)
        if not chunk:
            sys.exit(f"direct login failed: {got[:200]!r}")
        got += chunk
    return s


def run_query(s, sql):
    """Sends `sql`, reads the whole answer keeping only its tail; returns
    (seconds, bytes read, the command tag, whether an e-mail was masked
    in the first megabyte)."""
    q = sql.encode() + b"\0"
    t0 = time.perf_counter()
    s.sendall(b"Q" + struct.pack("!i", len(q) + 4) + q)
    total, tail, head = 0, b"", b""
    while True:
        chunk = s.recv(1 << 20)
        if not chunk:
            sys.exit(f"connection closed after {total} bytes: {tail[-200:]!r}")
        total += len(chunk)
        if len(head) < (1 << 20):
            head += chunk
        tail = (tail + chunk)[-256:]
        if tail.endswith(READY):
            break
    took = time.perf_counter() - t0
    at = tail.rfind(b"C")
    tag = tail[at + 5:].split(b"\0")[0].decode(errors="replace") if at >= 0 else "?"
    if b"E\0\0" in tail and b"SELECT" not in tail:
        sys.exit(f"the query failed: {tail!r}")
    return took, total, tag, b"[masked:email]" in head


class Sampler:
    """Peak VmRSS of a process, sampled every 20 ms while running."""

    def __init__(self, pid):
        self.pid, self.peak, self.stop = pid, 0, threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def loop(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, mem(self.pid).get("VmRSS", 0))
            time.sleep(0.02)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def main():
    work = tempfile.mkdtemp(prefix="gh-stream.")
    tag = f"{os.getpid()}"
    target_db, audit_db = f"gh_stream_target_{tag}", f"gh_stream_audit_{tag}"
    started = []
    try:
        nport = free_port()
        nats = subprocess.Popen(["nats-server", "-js", "-a", "127.0.0.1", "-p", str(nport),
                                 "-sd", f"{work}/nats"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        started.append(nats)
        wait_port(nport, nats, "nats-server")
        psql(f"CREATE DATABASE {target_db}")
        psql(f"CREATE DATABASE {audit_db}")
        print(f"loading {ROWS} rows into {target_db}", flush=True)
        subprocess.run(
            ["psql", "-X", "-q", "-h", "127.0.0.1", "-U", "postgres", "-d", target_db, "-c",
             "CREATE TABLE people AS SELECT i AS id, 'person number ' || i AS name, "
             "CASE WHEN i % 10 = 0 THEN 'user' || i || '@example.com' ELSE 'none' END AS email "
             f"FROM generate_series(1, {ROWS}) i"],
            check=True, stdout=subprocess.DEVNULL)
        pg_port, http_port = free_port(), free_port()
        dev = subprocess.Popen([BIN, "dev", "--data-dir", f"{work}/dev", "--nats",
                                f"nats://127.0.0.1:{nport}", "--audit-db",
                                f"{PG}/{audit_db}?sslmode=require", "--target",
                                f"app={PG}/{target_db}?sslmode=require",
                                "--pg-listen", f"127.0.0.1:{pg_port}", "--http-listen",
                                f"127.0.0.1:{http_port}"],
                               stdout=open(f"{work}/dev.log", "w"), stderr=subprocess.STDOUT,
                               env={**os.environ, "RUST_LOG": "warn"})
        started.append(dev)
        wait_port(pg_port, dev, "gatehouse dev")
        token = subprocess.run([BIN, "token", "--data-dir", f"{work}/dev", "--sub", "rss"],
                               check=True, capture_output=True, text=True).stdout.strip()
        time.sleep(1)
        print(f"worker idle: {mem(dev.pid)['VmRSS']} MiB", flush=True)
        for rows in sorted({min(50_000, ROWS), ROWS}):
            sql = f"SELECT id, name, email FROM people WHERE id <= {rows}"
            direct, gated, peaks = [], [], []
            for _ in range(ROUNDS):
                s = direct_login(target_db)
                took, size, ctag, _ = run_query(s, sql)
                s.close()
                direct.append(took)
                s = login(pg_port, token)
                with Sampler(dev.pid) as sampler:
                    took, gsize, gtag, masked = run_query(s, sql)
                s.close()
                gated.append(took)
                peaks.append(sampler.peak)
                if gtag != ctag or not masked:
                    sys.exit(f"through the worker: {gtag!r} (masked: {masked}); direct: {ctag!r}")
            d, g = statistics.median(direct), statistics.median(gated)
            print(f"{rows:>9} rows: direct {d:.3f} s ({size >> 20} MiB), gatehouse {g:.3f} s "
                  f"({gsize >> 20} MiB, masked) = {g / d:.2f}x direct; worker peak RSS "
                  f"{max(peaks)} MiB (runs: {', '.join(map(str, peaks))})", flush=True)
    finally:
        for p in reversed(started):
            p.send_signal(signal.SIGINT)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        for db in (target_db, audit_db):
            subprocess.run(["psql", "-X", "-q", "-h", "127.0.0.1", "-U", "postgres", "-c",
                            f"DROP DATABASE IF EXISTS {db} WITH (FORCE)"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
