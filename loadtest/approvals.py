#!/usr/bin/env python3
"""What waiting for approvals costs a Gatehouse worker, and how soon a grant
reaches the target.

Starts its own nats-server (free port, temporary store) and `gatehouse dev`
(worker and control plane in one process, the built-in policies: an UPDATE
or DELETE without WHERE waits for one approver of group `approvers`)
against the PostgreSQL on 127.0.0.1:5432, then:

1. memory: opens WAITING sessions (default 80: each holds a connection to
   the target, and a stock PostgreSQL takes 100) and reads the process's
   resident memory (VmRSS, /proc) once each has run one allowed command;
   then each sends `DELETE FROM t`, which waits for its approval, and the
   memory is read again. It prints the cost per session and what waiting
   adds to it;
2. latency: GRANTS sessions (default 60), each its own user, each waiting
   on a `DELETE FROM t`; each approval is granted through the API in turn,
   and a statement trigger on the target stamps `clock_timestamp()` when
   the DELETE runs. grant-to-target = that stamp minus the moment the
   grant's HTTP response arrived (one machine, one clock). The baseline,
   measured in the same run through the same worker: an allowed DELETE
   (with a WHERE), from sending it to the same trigger's stamp.

Usage: GATEHOUSE_BIN=target/release/gatehouse python3 loadtest/approvals.py
(WAITING=80 GRANTS=60). It prints one line per measure, medians and
p99, and stops only what it started.
"""
import json, os, resource, shutil, signal, socket, ssl, struct, subprocess, sys, tempfile, time
import urllib.request

BIN = os.environ.get("GATEHOUSE_BIN", "target/release/gatehouse")
WAITING = int(os.environ.get("WAITING", "80"))
GRANTS = int(os.environ.get("GRANTS", "60"))
PG = "postgres://postgres@127.0.0.1:5432"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def psql(db, sql, capture=False):
    r = subprocess.run(["psql", "-X", "-q", "-A", "-t", "-h", "127.0.0.1", "-U", "postgres",
                        "-d", db, "-c", sql], check=True, capture_output=True, text=True)
    return r.stdout if capture else None


def wait_port(port, proc, what):
    for _ in range(600):
        if proc.poll() is not None:
            sys.exit(f"{what} exited")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"{what} did not listen on {port}")


def login(port, user, token, app=None, source="127.0.0.1"):
    raw = socket.create_connection(("127.0.0.1", port), source_address=(source, 0))
    raw.sendall(struct.pack("!ii", 8, 80877103))
    if raw.recv(1) != b"S":
        raise RuntimeError("refused before TLS")
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    s = ctx.wrap_socket(raw)
    params = ["user", user, "database", "app"] + (["application_name", app] if app else [])
    body = b"".join(x.encode() + b"\0" for x in params) + b"\0"
    s.sendall(struct.pack("!ii", len(body) + 8, 196608) + body)
    s.recv(64)  # AuthenticationCleartextPassword
    pw = token.encode() + b"\0"
    s.sendall(b"p" + struct.pack("!i", len(pw) + 4) + pw)
    read_until_ready(s)
    return s


def read_until_ready(s):
    got = b""
    while not got.endswith(b"Z\0\0\0\x05I") and not got.endswith(b"Z\0\0\0\x05T"):
        chunk = s.recv(65536)
        if not chunk:
            raise RuntimeError(f"closed: {got[:200]!r}")
        got += chunk
    return got


def query(s, sql):
    b = sql.encode() + b"\0"
    s.sendall(b"Q" + struct.pack("!i", len(b) + 4) + b)


def api(port, token, method, path, body=None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {token}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def token(work, sub, *extra):
    return subprocess.run([BIN, "token", "--data-dir", f"{work}/dev", "--sub", sub, *extra],
                          check=True, capture_output=True, text=True).stdout.strip()


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def pending(http_port, approver, n):
    for _ in range(600):
        got = api(http_port, approver, "GET", "/api/v1/approvals?state=pending")["approvals"]
        if len(got) >= n:
            return got
        time.sleep(0.05)
    sys.exit(f"{n} pending approvals expected")


def main():
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    work = tempfile.mkdtemp(prefix="gh-approvals.")
    tag = f"{os.getpid()}"
    target = f"gh_appr_target_{tag}"
    started = []
    try:
        nport = free_port()
        nats = subprocess.Popen(["nats-server", "-js", "-a", "127.0.0.1", "-p", str(nport),
                                 "-sd", f"{work}/nats"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        started.append(nats)
        wait_port(nport, nats, "nats-server")
        psql("postgres", f"CREATE DATABASE {target}")
        psql("postgres", f"CREATE DATABASE gh_appr_audit_{tag}")
        psql(target, """
            CREATE TABLE t (id int);
            CREATE TABLE hits (app text, at timestamptz);
            CREATE FUNCTION hit() RETURNS trigger LANGUAGE plpgsql AS $$
              BEGIN INSERT INTO hits VALUES (current_setting('application_name'), clock_timestamp());
              RETURN NULL; END $$;
            CREATE TRIGGER hit BEFORE DELETE ON t FOR EACH STATEMENT EXECUTE FUNCTION hit();""")
        pg_port, http_port = free_port(), free_port()
        dev = subprocess.Popen([BIN, "dev", "--data-dir", f"{work}/dev", "--nats",
                                f"nats://127.0.0.1:{nport}", "--audit-db",
                                f"{PG}/gh_appr_audit_{tag}?sslmode=require", "--target",
                                f"app={PG}/{target}?sslmode=require",
                                "--pg-listen", f"127.0.0.1:{pg_port}", "--http-listen",
                                f"127.0.0.1:{http_port}"],
                               stdout=open(f"{work}/dev.log", "w"), stderr=subprocess.STDOUT,
                               env={**os.environ, "RUST_LOG": "warn"})
        started.append(dev)
        wait_port(pg_port, dev, "gatehouse dev")
        wait_port(http_port, dev, "gatehouse dev API")
        approver = token(work, "approver", "--for", "api", "--group", "approvers")

        # 1. Memory of WAITING sessions, idle, then each waiting.
        user_token = token(work, "waiter")
        time.sleep(1)
        before = rss_kib(dev.pid)
        # From several loopback addresses: a worker takes 1,000 connections
        # from one address by default.
        sessions = [login(pg_port, "waiter", user_token, source=f"127.0.0.{2 + i // 500}")
                    for i in range(WAITING)]
        # Each runs one allowed command first: what any session that has
        # run a command holds (its classifier and decision caches, its
        # policy entities) is then in the baseline, not in the wait.
        for s in sessions:
            query(s, "DELETE FROM t WHERE id = 0")
        for s in sessions:
            read_until_ready(s)
        time.sleep(2)
        idle = rss_kib(dev.pid)
        # Waiting once the notice naming the approval arrives (read from
        # the session: no API listing runs in the process meanwhile).
        for s in sessions:
            query(s, "DELETE FROM t")
        for s in sessions:
            got = b""
            while b"waits for approval" not in got:
                chunk = s.recv(65536)
                if not chunk:
                    raise RuntimeError(f"closed: {got[:200]!r}")
                got += chunk
        time.sleep(2)
        waiting = rss_kib(dev.pid)
        print(f"{WAITING} sessions: before {before // 1024} MiB; logged in, one command run, "
              f"idle {idle // 1024} MiB ({(idle - before) / WAITING:.1f} KiB each); each "
              f"waiting for an approval {waiting // 1024} MiB (+{(waiting - idle) / WAITING:.1f}"
              f" KiB each; {(waiting - before) / WAITING:.1f} KiB per waiting session in all)")
        for s in sessions:
            s.close()
        sessions = None
        time.sleep(3)

        # 2. Grant-to-target latency, against an allowed DELETE's
        # send-to-target latency through the same worker.
        base = []
        s = login(pg_port, "baseline", token(work, "baseline"), app="baseline")
        for i in range(GRANTS):
            t0 = time.time()
            query(s, "DELETE FROM t WHERE id = 0")
            read_until_ready(s)
            at = float(psql(target, "SELECT extract(epoch FROM at) FROM hits "
                                    "WHERE app = 'baseline' ORDER BY at DESC LIMIT 1",
                            capture=True))
            base.append((at - t0) * 1000)
        s.close()
        waiters = {}
        for i in range(GRANTS):
            user = f"w{i}"
            s = login(pg_port, user, token(work, user), app=user)
            query(s, "DELETE FROM t")
            waiters[user] = s
        by_user = {a["requester"]["username"]: a["id"]
                   for a in pending(http_port, approver, GRANTS)}
        granted = {}
        for user, s in waiters.items():
            api(http_port, approver, "POST", f"/api/v1/approvals/{by_user[user]}/grant", {})
            granted[user] = time.time()
            read_until_ready(s)
        hits = dict(line.split("|") for line in psql(
            target, "SELECT app, extract(epoch FROM at) FROM hits WHERE app LIKE 'w%'",
            capture=True).split())
        lat = [(float(hits[u]) - granted[u]) * 1000 for u in waiters]
        print(f"grant response -> DELETE on the target, {GRANTS} approvals: median "
              f"{pct(lat, 50):.2f} ms, p99 {pct(lat, 99):.2f} ms, max {max(lat):.2f} ms")
        print(f"baseline, an allowed DELETE sent -> on the target, same worker: median "
              f"{pct(base, 50):.2f} ms, p99 {pct(base, 99):.2f} ms")
        for s in waiters.values():
            s.close()
    finally:
        for p in reversed(started):
            p.send_signal(signal.SIGINT)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        for db in (target, f"gh_appr_audit_{tag}"):
            subprocess.run(["psql", "-X", "-q", "-h", "127.0.0.1", "-U", "postgres", "-c",
                            f"DROP DATABASE IF EXISTS {db} WITH (FORCE)"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
