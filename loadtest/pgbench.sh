#!/usr/bin/env bash
# Benchmark (not a test): pgbench -S straight to PostgreSQL over TLS versus
# through a Gatehouse worker (`gatehouse dev`, release build), in interleaved
# rounds on this machine. See loadtest/README.md.
#
#   loadtest/pgbench.sh
#   ROUNDS=3 DURATION=5 loadtest/pgbench.sh
#
# Env: ROUNDS (5), DURATION seconds per run (10), CLIENTS (16), THREADS (2),
#      MODE simple|extended|prepared (simple; pgbench -M), SCALE (10).
set -euo pipefail

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-16}
THREADS=${THREADS:-2}
MODE=${MODE:-simple}
SCALE=${SCALE:-10}

for v in ROUNDS DURATION CLIENTS THREADS SCALE; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "ERROR: $v must be a positive integer, got '${!v}'" >&2; exit 2; }
done
case $MODE in simple | extended | prepared) ;; *)
    echo "ERROR: MODE must be simple, extended or prepared, got '$MODE'" >&2
    exit 2
    ;;
esac

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=../deploy/scripts/services.sh
. deploy/scripts/services.sh

show() { printf '+ %s\n' "$*"; }

gh_log "checking PostgreSQL, NATS and the pg clients"
gh_ensure_pg_clients
gh_ensure_postgres
gh_ensure_nats
gh_missing_exit

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

BENCH_DB="gh_bench_$$"
AUDIT_DB="gh_bench_audit_$$"
DATA_DIR=$(mktemp -d -t gh-bench.XXXXXX)
LOG="$DATA_DIR/gatehouse.log"
GH_PID=""
PG_PORT=$(free_port)
HTTP_PORT=$(free_port)
while [ "$HTTP_PORT" = "$PG_PORT" ]; do HTTP_PORT=$(free_port); done

admin() { gh_psql require -Atqc "$1"; }

cleanup() {
    local rc=$?
    set +e
    if [ -n "$GH_PID" ] && kill -0 "$GH_PID" 2>/dev/null; then
        kill "$GH_PID" 2>/dev/null
        for _ in $(seq 1 50); do kill -0 "$GH_PID" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$GH_PID" 2>/dev/null
        wait "$GH_PID" 2>/dev/null
    fi
    if [ "$rc" -ne 0 ] && [ -f "$LOG" ]; then
        echo "--- last lines of the gatehouse log ($LOG) ---" >&2
        tail -n 30 "$LOG" >&2
    fi
    admin "DROP DATABASE IF EXISTS $BENCH_DB WITH (FORCE)" >/dev/null 2>&1
    admin "DROP DATABASE IF EXISTS $AUDIT_DB WITH (FORCE)" >/dev/null 2>&1
    rm -rf "$DATA_DIR"
    echo "cleaned up: stopped gatehouse, dropped $BENCH_DB and $AUDIT_DB, removed $DATA_DIR" >&2
    echo "(the events of this run stay in the JetStream stream GATEHOUSE_EVENTS on 127.0.0.1:4222)" >&2
}
trap cleanup EXIT
trap 'exit 130' INT TERM

DIRECT="host=127.0.0.1 port=$GH_PG_PORT user=postgres dbname=$BENCH_DB sslmode=require"
GATEWAY="host=127.0.0.1 port=$PG_PORT user=bench dbname=bench sslmode=require"

gh_log "creating $BENCH_DB and loading it (pgbench -i -s $SCALE)"
show "psql \"$(gh_pg_conninfo require)\" -c 'CREATE DATABASE $BENCH_DB'"
admin "CREATE DATABASE $BENCH_DB"
show "pgbench -i -s $SCALE -q \"$DIRECT\""
env -u PGPASSWORD PGPASSFILE=/nonexistent/.pgpass pgbench -i -s "$SCALE" -q "$DIRECT" 2>&1 | tail -n 2

gh_log "starting gatehouse dev"
GH_CMD=("$BIN" dev --data-dir "$DATA_DIR"
    --pg-listen "127.0.0.1:$PG_PORT" --http-listen "127.0.0.1:$HTTP_PORT"
    --audit-db "postgres://postgres@127.0.0.1:5432/$AUDIT_DB"
    --target "bench=postgres://postgres@127.0.0.1:5432/$BENCH_DB?sslmode=require")
show "${GH_CMD[*]} >$LOG 2>&1 &"
RUST_LOG=${RUST_LOG:-warn} "${GH_CMD[@]}" >"$LOG" 2>&1 </dev/null &
GH_PID=$!
for _ in $(seq 1 300); do
    kill -0 "$GH_PID" 2>/dev/null || gh_die "gatehouse dev exited early"
    gh_tcp_open 127.0.0.1 "$PG_PORT" && grep -q 'Gatehouse is running' "$LOG" && break
    sleep 0.2
done
gh_tcp_open 127.0.0.1 "$PG_PORT" || gh_die "gatehouse dev did not listen on 127.0.0.1:$PG_PORT within 60 s"
gh_note "gatehouse dev (pid $GH_PID) listens on 127.0.0.1:$PG_PORT, http 127.0.0.1:$HTTP_PORT"

show "$BIN" token --data-dir "$DATA_DIR" --sub bench --ttl 2h
TOKEN=$("$BIN" token --data-dir "$DATA_DIR" --sub bench --ttl 2h)

# Fails early, with the server's words, if the gateway refuses the token.
show "PGPASSWORD=<token> psql \"$GATEWAY\" -c 'select 1'"
PGPASSWORD=$TOKEN PGPASSFILE=/nonexistent/.pgpass psql -X -w -Atqc 'select 1' "$GATEWAY" >/dev/null ||
    gh_die "cannot query through the gateway"

PGB=(pgbench -S -c "$CLIENTS" -j "$THREADS" -T "$DURATION" -n -M "$MODE")
gh_log "rounds: $ROUNDS x (direct, gateway), ${DURATION}s each, $CLIENTS clients, $THREADS threads, -M $MODE"
gh_note "direct:  ${PGB[*]} \"$DIRECT\""
gh_note "gateway: PGPASSWORD=<token> ${PGB[*]} \"$GATEWAY\""
gh_note "(odd rounds run direct first, even rounds gateway first)"

# Runs one pgbench and prints its TPS (without initial connection time).
run_pgbench() { # label conninfo [password]
    local out="$DATA_DIR/pgbench-$1.out" tps
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

DIRECT_TPS=()
GATEWAY_TPS=()
RATIOS=()
for r in $(seq 1 "$ROUNDS"); do
    if [ $((r % 2)) -eq 1 ]; then
        d=$(run_pgbench direct "$DIRECT")
        g=$(run_pgbench gateway "$GATEWAY" "$TOKEN")
    else
        g=$(run_pgbench gateway "$GATEWAY" "$TOKEN")
        d=$(run_pgbench direct "$DIRECT")
    fi
    ratio=$(awk -v g="$g" -v d="$d" 'BEGIN { printf "%.3f", g / d }')
    DIRECT_TPS+=("$d")
    GATEWAY_TPS+=("$g")
    RATIOS+=("$ratio")
    printf 'round %d/%d: direct_tls_tps=%.0f gateway_tps=%.0f ratio=%s\n' "$r" "$ROUNDS" "$d" "$g" "$ratio"
done

median() {
    printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END {
        if (NR % 2) m = v[(NR + 1) / 2]; else m = (v[NR / 2] + v[NR / 2 + 1]) / 2
        printf "%s", m }'
}

kill -0 "$GH_PID" 2>/dev/null || gh_die "gatehouse dev is no longer running"
echo
printf 'direct_tls_median_tps=%.0f gateway_median_tps=%.0f ratio_median=%.2f (rounds=%d duration=%ss clients=%d mode=%s)\n' \
    "$(median "${DIRECT_TPS[@]}")" "$(median "${GATEWAY_TPS[@]}")" "$(median "${RATIOS[@]}")" \
    "$ROUNDS" "$DURATION" "$CLIENTS" "$MODE"
