#!/usr/bin/env bash
# The Gatehouse test command:   deploy/scripts/test.sh   (from the repo root)
#
# 1. Makes sure what the build and tests need is there: a C compiler and
#    libclang (for PostgreSQL's parser, pg_query), PostgreSQL on 127.0.0.1:5432
#    (user postgres, no password, SSL on), psql and pgbench, NATS with
#    JetStream on 127.0.0.1:4222, and a nats-server binary on PATH (some tests
#    start private servers). Services already answering are left alone; as
#    root on Debian, what is missing is installed (apt-get) and started.
# 2. Runs the gates: cargo fmt --check, cargo clippy -D warnings, no aws-lc-sys
#    in the dependency tree (ring only), then cargo test --workspace, then
#    the dev-stack suites (cli/tests) again on the embedded event log.
#
# GATEHOUSE_SKIP_LINT=1 skips fmt and clippy for a quick local run (CI never
# sets it).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
# shellcheck source=services.sh
. deploy/scripts/services.sh

step() { printf '\n==== %s\n' "$*"; }

step "services and tools"
command -v cargo >/dev/null 2>&1 ||
    gh_missing "cargo (Rust toolchain): https://rustup.rs, then rustup component add rustfmt clippy"
if ! command -v cc >/dev/null 2>&1; then
    if gh_can_install; then
        gh_apt_install gcc libc6-dev
    else
        gh_missing "a C compiler (cc) for crates that build C (ring): sudo apt-get install gcc libc6-dev"
    fi
fi
# pg_query (PostgreSQL's parser, used by the SQL classifier) runs bindgen at
# build time, which needs libclang.
if [ -z "${LIBCLANG_PATH:-}" ] && ! ldconfig -p 2>/dev/null | grep -Eq 'libclang(-[0-9.]+)?\.so'; then
    if gh_can_install; then
        gh_apt_install libclang-dev
    else
        gh_missing "libclang, to build PostgreSQL's parser (pg_query): sudo apt-get install libclang-dev (or set LIBCLANG_PATH)"
    fi
fi
if [ "${GATEHOUSE_SKIP_LINT:-0}" != 1 ] && command -v cargo >/dev/null 2>&1; then
    cargo fmt --version >/dev/null 2>&1 || gh_missing "rustfmt: rustup component add rustfmt"
    cargo clippy --version >/dev/null 2>&1 || gh_missing "clippy: rustup component add clippy"
fi
gh_ensure_pg_clients
gh_ensure_postgres
gh_ensure_nats_binary
gh_ensure_nats
gh_missing_exit
gh_note "psql:        $(command -v psql) ($(psql --version | head -n1))"
gh_note "pgbench:     $(command -v pgbench)"
gh_note "nats-server: $(command -v nats-server) ($(nats-server --version 2>&1 | head -n1))"
gh_note "cargo:       $(cargo --version)"

if [ "${GATEHOUSE_SKIP_LINT:-0}" = 1 ]; then
    step "fmt and clippy: SKIPPED (GATEHOUSE_SKIP_LINT=1)"
else
    step "cargo fmt --all -- --check"
    cargo fmt --all -- --check

    step "cargo clippy --workspace --all-targets -- -D warnings"
    cargo clippy --workspace --all-targets -- -D warnings
fi

step "cargo tree -i aws-lc-sys --workspace (must find nothing: ring only)"
set +e
tree_out=$(cargo tree -i aws-lc-sys --workspace 2>&1)
tree_rc=$?
set -e
if [ "$tree_rc" -eq 0 ] && printf '%s\n' "$tree_out" | grep -q 'aws-lc-sys v'; then
    printf '%s\n' "$tree_out"
    gh_die "aws-lc-sys is in the dependency tree (above); Gatehouse uses ring only (see shared/DEPENDENCIES.md)"
elif [ "$tree_rc" -ne 0 ] && ! printf '%s\n' "$tree_out" | grep -q 'did not match any packages'; then
    printf '%s\n' "$tree_out"
    gh_die "cargo tree failed"
fi
gh_note "none (ring only)"

step "cargo test --workspace"
# cargo prints one "test result" line per test binary, the last of which is
# often an empty doc-test run; add them up into one closing line.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
if [ "$status" -eq 0 ]; then
    # The dev-stack suites again, on the embedded event log and SQLite
    # audit store (no NATS, no audit database), so that neither
    # implementation of the ports drifts.
    step "GATEHOUSE_TEST_EVENT_LOG=embedded cargo test -p gatehouse (the dev-stack suites on the embedded stores)"
    set +e
    GATEHOUSE_TEST_EVENT_LOG=embedded cargo test -p gatehouse 2>&1 | tee -a "$log"
    status=${PIPESTATUS[0]}
    set -e
fi
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     END { printf "\ntests: %d passed, %d failed\n", p, f }' "$log"
if [ "$status" -ne 0 ]; then
    # Some failures of the shared services are told to their clients only
    # as a fixed sentence (JetStream: "error creating store for stream");
    # their cause is in the server's own log, or in the disk.
    step "after the failure: free disk and the shared services' recent warnings"
    df -h . "${TMPDIR:-/tmp}" 2>&1 || true
    for f in /var/log/nats-server.log /var/log/postgresql/postgresql-*-main.log; do
        [ -r "$f" ] || continue
        printf '%s (warnings and errors, last 20):\n' "$f"
        grep -E '\[(ERR|WRN)\]|ERROR|FATAL|PANIC' "$f" | tail -20 || true
    done
fi
exit "$status"
