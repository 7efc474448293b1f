#!/usr/bin/env python3
"""Peak memory of a Gatehouse worker under two memory attacks.

Starts its own nats-server (free port, temporary store) and `gatehouse dev`
(worker and control plane in one process, built-in limits) against the
PostgreSQL on 127.0.0.1:5432, then measures the process's resident memory
(VmRSS, and the peak VmHWM) from /proc:

1. idle: after start-up and one login;
2. 10,000 connections that never start TLS, from ten loopback addresses
   (1,000 each, the default `max_connections_per_address`, one thread per
   address), each held until the worker's startup deadline (10 s) closes
   it. The line says how long opening them took: if longer than the
   deadline, fewer than 10,000 were open at once;
3. an authenticated client sending one 200 MB Query message (header, then
   the body as fast as the worker reads it).

Usage: GATEHOUSE_BIN=target/release/gatehouse python3 loadtest/rss.py
It prints one line per phase and stops only what it started.
"""
from concurrent.futures import ThreadPoolExecutor
import os, resource, shutil, signal, socket, ssl, struct, subprocess, sys, tempfile, time

BIN = os.environ.get("GATEHOUSE_BIN", "target/release/gatehouse")
PG = "postgres://postgres@127.0.0.1:5432"
IP_BIND_ADDRESS_NO_PORT = 24  # Linux


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def mem(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0]) // 1024
    return out


def psql(sql):
    subprocess.run(["psql", "-X", "-q", "-h", "127.0.0.1", "-U", "postgres", "-c", sql],
                   check=True, stdout=subprocess.DEVNULL)


def wait_port(port, proc, what):
    for _ in range(300):
        if proc.poll() is not None:
            sys.exit(f"{what} exited")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"{what} did not listen on {port}")


def login(port, token):
    raw = socket.create_connection(("127.0.0.1", port))
    raw.sendall(struct.pack("!ii", 8, 80877103))
    answer = raw.recv(1)
    if answer != b"S":
        raise RuntimeError(f"refused before TLS: {answer + raw.recv(4096)!r}")
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    s = ctx.wrap_socket(raw)
    body = b"".join(x.encode() + b"\0" for x in ["user", "rss", "database", "app"]) + b"\0"
    s.sendall(struct.pack("!ii", len(body) + 8, 196608) + body)
    s.recv(64)  # AuthenticationCleartextPassword
    pw = token.encode() + b"\0"
    s.sendall(b"p" + struct.pack("!i", len(pw) + 4) + pw)
    got = b""
    while not got.endswith(b"Z\0\0\0\x05I"):
        chunk = s.recv(65536)
        if not chunk:
            sys.exit(f"login failed: {got[:200]!r}")
        got += chunk
    return s


def main():
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    work = tempfile.mkdtemp(prefix="gh-rss.")
    tag = f"{os.getpid()}"
    started = []
    try:
        nport = free_port()
        nats = subprocess.Popen(["nats-server", "-js", "-a", "127.0.0.1", "-p", str(nport),
                                 "-sd", f"{work}/nats"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        started.append(nats)
        wait_port(nport, nats, "nats-server")
        psql(f"CREATE DATABASE gh_rss_target_{tag}")
        psql(f"CREATE DATABASE gh_rss_audit_{tag}")
        pg_port, http_port = free_port(), free_port()
        dev = subprocess.Popen([BIN, "dev", "--data-dir", f"{work}/dev", "--nats",
                                f"nats://127.0.0.1:{nport}", "--audit-db",
                                f"{PG}/gh_rss_audit_{tag}?sslmode=require", "--target",
                                f"app={PG}/gh_rss_target_{tag}?sslmode=require",
                                "--pg-listen", f"127.0.0.1:{pg_port}", "--http-listen",
                                f"127.0.0.1:{http_port}"],
                               stdout=open(f"{work}/dev.log", "w"), stderr=subprocess.STDOUT,
                               env={**os.environ, "RUST_LOG": "warn"})
        started.append(dev)
        wait_port(pg_port, dev, "gatehouse dev")
        token = subprocess.run([BIN, "token", "--data-dir", f"{work}/dev", "--sub", "rss"],
                               check=True, capture_output=True, text=True).stdout.strip()
        s = login(pg_port, token)
        s.close()
        time.sleep(1)
        print(f"idle: {mem(dev.pid)}")

        # 10,000 connections that never start TLS.
        t0 = time.time()

        def open_from(a):
            conns = []
            for _ in range(1000):
                c = socket.socket()
                # Leave the port to connect(): bind(port 0) searches the
                # whole port range for each of thousands of sockets.
                c.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                c.bind((f"127.0.0.{a}", 0))
                c.connect(("127.0.0.1", pg_port))
                conns.append(c)
            return conns

        # One thread per address: each connect() waits for its handshake,
        # so the listen backlog never overflows.
        with ThreadPoolExecutor(10) as pool:
            idle = [c for conns in pool.map(open_from, range(2, 12)) for c in conns]
        took = time.time() - t0
        time.sleep(0.5)
        print(f"10000 idle handshakes open (connected in {took:.1f}s): {mem(dev.pid)}")
        try:
            login(pg_port, token).close()
            print("a user logs in meanwhile: ok")
        except RuntimeError as e:
            print(f"a user logs in meanwhile: {e}")
        deadline = time.time() + 15
        closed = 0
        for c in idle:
            c.settimeout(max(0.01, deadline - time.time()))
            try:
                if c.recv(1) == b"":
                    closed += 1
            except OSError:
                pass
            c.close()
        print(f"closed by the worker's startup deadline within {time.time() - t0:.1f}s of "
              f"the first: {closed}/10000; {mem(dev.pid)}")

        # One 200 MB Query.
        s = login(pg_port, token)
        size = 200 * 1000 * 1000
        try:
            s.sendall(b"Q" + struct.pack("!i", size + 4))
            chunk = b"x" * (1 << 20)
            sent = 0
            while sent < size:
                s.sendall(chunk)
                sent += len(chunk)
        except OSError as e:
            print(f"200 MB Query: the worker closed the session after {sent >> 20} MiB sent ({e})")
        else:
            print("200 MB Query: sent whole")
        try:
            s.settimeout(5)
            reply = s.recv(4096)
            print(f"  the client read: {reply[:160]!r}")
        except OSError:
            pass
        s.close()
        time.sleep(0.5)
        print(f"after the 200 MB Query: {mem(dev.pid)}")
    finally:
        for p in reversed(started):
            p.send_signal(signal.SIGINT)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        for db in ("target", "audit"):
            subprocess.run(["psql", "-X", "-q", "-h", "127.0.0.1", "-U", "postgres", "-c",
                            f"DROP DATABASE IF EXISTS gh_rss_{db}_{tag} WITH (FORCE)"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
