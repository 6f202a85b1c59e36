#!/usr/bin/env bash
# Local stack for mailsender: real servers on loopback, no Docker.
#   tansu (Kafka protocol, sqlite storage), nx-27017 (MongoDB wire protocol), maildev (SMTP + web UI).
# See /work/shared/guides/local-stack.md for why these servers and these flags.
#
# Usage: scripts/stack.sh install | up [--no-maildev] | down | status | env
#
# Environment (all optional):
#   MAILSENDER_CACHE  cache dir for installed servers   (default: $HOME/.cache/mailsender)
#   MAILSENDER_RUN    run dir: data, logs, pid files     (default: $MAILSENDER_CACHE/run)
#   KAFKA_PORT=19092  MONGO_PORT=27117  SMTP_PORT=1025  MAILDEV_WEB_PORT=1080
set -euo pipefail

CACHE=${MAILSENDER_CACHE:-$HOME/.cache/mailsender}
RUN=${MAILSENDER_RUN:-$CACHE/run}
KAFKA_PORT=${KAFKA_PORT:-19092}
MONGO_PORT=${MONGO_PORT:-27117}
SMTP_PORT=${SMTP_PORT:-1025}
MAILDEV_WEB_PORT=${MAILDEV_WEB_PORT:-1080}

TANSU_VERSION=0.6.0
# Only the sqlite engine (libsql): dynostore (object stores) and the rest are not used by the local stack.
TANSU_FEATURES=libsql
# A profile that compiles much faster than cargo's release: the broker is the long pole of a first run.
# Measured on 2 cores, clean: opt-level 3 (cargo's release, with dynostore) 29 min; opt-level 1, libsql only,
# 11 min 30 s; opt-level 0, libsql only, 4 min 35 s. bench/run.sh reports the broker's CPU per letter
# beside the service's, so a benchmark shows when this broker, not the service, sets figure 1.
TANSU_PROFILE=opt0
TANSU_PROFILE_ENV=(CARGO_PROFILE_RELEASE_OPT_LEVEL=0 CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_LTO=off
    CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 CARGO_PROFILE_RELEASE_INCREMENTAL=false)
TANSU_ROOT=$CACHE/tansu
TANSU_BIN=$TANSU_ROOT/bin/tansu
TANSU_LOG=$CACHE/tansu-install.log

VENV=$CACHE/venv
# Pinned to the versions checked here; the marker file records this list, so changing it re-runs pip install.
PY_PACKAGES=${MAILSENDER_PY_PACKAGES:-"nx-27017==0.8.1 aiosmtpd==1.4.6 confluent-kafka==2.16.1 pymongo==4.20.0 dkimpy==1.1.8 PyNaCl==1.6.2"}
VENV_MARKER=$VENV/.mailsender-packages

NPM_PREFIX=$CACHE/npm
MAILDEV_SPEC=maildev@2
MAILDEV_BIN=$NPM_PREFIX/node_modules/.bin/maildev

PIDS=$RUN/pids
STACK_ENV=$RUN/stack.env
START_TIMEOUT=30

log() { printf '[stack] %s\n' "$*" >&2; }
die() { printf '[stack] ERROR: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------------------------
# install
# ---------------------------------------------------------------------------------------------------------------

as_root() {
    if [[ $(id -u) -eq 0 ]]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else die "need root (or sudo) to run: $*"
    fi
}

APT_UPDATED=0
apt_install() { # apt_install PKG... (only the missing ones are passed by callers)
    [[ $# -gt 0 ]] || return 0
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install these packages by hand: $*"
    if [[ $APT_UPDATED -eq 0 ]]; then
        log "apt-get update"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 update -qq
        APT_UPDATED=1
    fi
    log "apt-get install -y $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "$@"
}

find_cargo() {
    if command -v cargo >/dev/null 2>&1; then command -v cargo
    elif [[ -x $HOME/.cargo/bin/cargo ]]; then echo "$HOME/.cargo/bin/cargo"
    else die "cargo not found (install Rust via rustup first)"
    fi
}

# Installed = binary present and cargo's install record names this version (written only after a successful install).
# The build marker records version, features and profile: changing any of them rebuilds the broker.
TANSU_MARKER=$TANSU_ROOT/.mailsender-build
TANSU_BUILD="$TANSU_VERSION $TANSU_FEATURES $TANSU_PROFILE"
tansu_ok() {
    [[ -x $TANSU_BIN ]] || return 1
    [[ -f $TANSU_MARKER && "$(cat "$TANSU_MARKER")" == "$TANSU_BUILD" ]] || return 1
    grep -q "\"tansu $TANSU_VERSION " "$TANSU_ROOT/.crates.toml" 2>/dev/null \
        || "$TANSU_BIN" --version 2>/dev/null | grep -q "$TANSU_VERSION"
}

# Another `cargo install tansu` (e.g. started by hand or by a parallel run) already building into our root?
tansu_install_running() { pgrep -f "^[^ ]*cargo install tansu .*--root $TANSU_ROOT( |\$)" >/dev/null 2>&1; }

install_tansu() {
    if tansu_ok; then log "tansu $TANSU_VERSION: present ($TANSU_BIN)"; return 0; fi
    mkdir -p "$CACHE"
    # Serialize installs started by this script; also wait for a foreign one building into the same root.
    exec 9>"$CACHE/.tansu-install.lock"
    flock 9
    if tansu_install_running; then
        log "tansu: a 'cargo install tansu' into $TANSU_ROOT is already running; waiting for it (log: $TANSU_LOG)"
        local waited=0
        while tansu_install_running; do
            sleep 10; waited=$((waited + 10))
            if ((waited % 60 == 0)); then log "tansu: still building (${waited}s): $(tail -n1 "$TANSU_LOG" 2>/dev/null | tr -d '\r')"; fi
        done
    fi
    if tansu_ok; then log "tansu $TANSU_VERSION: present ($TANSU_BIN)"; flock -u 9; return 0; fi
    local cargo; cargo=$(find_cargo)
    log "tansu: cargo install tansu $TANSU_VERSION, $TANSU_FEATURES, $TANSU_PROFILE (about 5 min on 2 cores; log: $TANSU_LOG)"
    # Its own target directory: a CARGO_TARGET_DIR set for the service's build would otherwise make the two
    # builds wait for each other's lock; removed after a successful install (about 1 GiB).
    local target=$CACHE/tansu-target
    if ! env "${TANSU_PROFILE_ENV[@]}" CARGO_TARGET_DIR="$target" "$cargo" install --force tansu --version "$TANSU_VERSION" --features "$TANSU_FEATURES" \
            --root "$TANSU_ROOT" --locked >>"$TANSU_LOG" 2>&1; then
        log "tansu: install with --locked failed; retrying without --locked"
        env "${TANSU_PROFILE_ENV[@]}" CARGO_TARGET_DIR="$target" "$cargo" install --force tansu --version "$TANSU_VERSION" --features "$TANSU_FEATURES" \
            --root "$TANSU_ROOT" >>"$TANSU_LOG" 2>&1 || { tail -n 30 "$TANSU_LOG" >&2; die "tansu install failed; see $TANSU_LOG"; }
    fi
    printf '%s' "$TANSU_BUILD" >"$TANSU_MARKER"
    rm -rf "$target"
    tansu_ok || die "cargo install finished but $TANSU_BIN / $TANSU_ROOT/.crates.toml do not show tansu $TANSU_VERSION"
    flock -u 9
    log "tansu $TANSU_VERSION: installed"
}

install_venv() {
    if [[ -x $VENV/bin/python ]] && [[ -f $VENV_MARKER ]] && [[ "$(cat "$VENV_MARKER")" == "$PY_PACKAGES" ]]; then
        log "python venv: present ($VENV)"; return 0
    fi
    command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv
    python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
        || die "python3 >= 3.10 is required (nx-27017 needs it); found $(python3 --version 2>&1)"
    if [[ ! -x $VENV/bin/python ]]; then
        log "python venv: creating $VENV"
        mkdir -p "$CACHE"
        if ! python3 -m venv "$VENV" 2>/dev/null; then
            rm -rf "$VENV"
            apt_install python3-venv
            python3 -m venv "$VENV"
        fi
    fi
    log "python venv: pip install $PY_PACKAGES"
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q $PY_PACKAGES
    printf '%s' "$PY_PACKAGES" >"$VENV_MARKER"
    log "python venv: ready"
}

install_maildev() {
    if [[ -x $MAILDEV_BIN ]]; then log "maildev: present ($MAILDEV_BIN)"; return 0; fi
    if ! command -v npm >/dev/null 2>&1; then
        local missing=(); command -v node >/dev/null 2>&1 || missing+=(nodejs); missing+=(npm)
        apt_install "${missing[@]}"
    fi
    log "maildev: npm install --prefix $NPM_PREFIX $MAILDEV_SPEC"
    mkdir -p "$NPM_PREFIX"
    npm install --no-audit --no-fund --prefix "$NPM_PREFIX" "$MAILDEV_SPEC" >>"$CACHE/npm.log" 2>&1 \
        || { tail -n 30 "$CACHE/npm.log" >&2; die "npm install $MAILDEV_SPEC failed; see $CACHE/npm.log"; }
    [[ -x $MAILDEV_BIN ]] || die "npm install finished but $MAILDEV_BIN is missing"
    log "maildev: installed"
}

cmd_install() {
    local missing=()
    command -v setsid >/dev/null 2>&1 || missing+=(util-linux)
    command -v pgrep >/dev/null 2>&1 || missing+=(procps)
    command -v flock >/dev/null 2>&1 || missing+=(util-linux)
    command -v openssl >/dev/null 2>&1 || missing+=(openssl)
    [[ ${#missing[@]} -eq 0 ]] || apt_install $(printf '%s\n' "${missing[@]}" | sort -u)
    install_venv
    install_maildev
    install_tansu
    log "install: done (cache: $CACHE)"
}

# ---------------------------------------------------------------------------------------------------------------
# process helpers
# ---------------------------------------------------------------------------------------------------------------

# Process pattern that /proc/PID/cmdline must contain, so a recycled pid is never mistaken for our server.
proc_pattern() {
    case $1 in
        tansu) echo "tansu" ;; nx) echo "nx-27017" ;; maildev) echo "maildev" ;;
    esac
}

pid_of() { # prints the pid of a running server started by us, or fails
    local name=$1 f=$PIDS/$1.pid pid
    [[ -f $f ]] || return 1
    pid=$(cat "$f" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    live "$pid" || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$(proc_pattern "$name")" || return 1
    echo "$pid"
}

# A killed server is re-parented to pid 1, which may reap it only seconds later: count zombies as dead.
live() { kill -0 "$1" 2>/dev/null && [[ $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) != Z ]]; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# launch NAME CWD LOG CMD... : start CMD detached (own session, stdin from /dev/null), record its pid.
launch() {
    local name=$1 cwd=$2 logf=$3; shift 3
    rm -f "$PIDS/$name.pid"
    setsid -f bash -c 'cd "$1" || exit 97; echo $$ >"$2"; shift 2; exec "$@"' \
        "launch-$name" "$cwd" "$PIDS/$name.pid" "$@" </dev/null >>"$logf" 2>&1
    local i
    for ((i = 0; i < 50; i++)); do [[ -s $PIDS/$name.pid ]] && return 0; sleep 0.1; done
    die "$name: launcher did not write $PIDS/$name.pid; see $logf"
}

# wait_port NAME PORT LOGS PID : wait until PORT accepts connections while process PID lives.
# Liveness, not pid_of: the launcher writes its pid and then execs the server, and while the kernel
# runs that exec /proc/PID/cmdline reads empty, so a name check made then finds "no server" (CI
# once failed on it). The pid was written by this script moments ago, so it cannot have been recycled.
wait_port() {
    local name=$1 port=$2 logs=$3 pid=$4 deadline=$((SECONDS + START_TIMEOUT))
    while ! port_open "$port"; do
        if ! live "$pid"; then
            show_logs ${logs}
            die "$name exited before listening on 127.0.0.1:$port; see $logs"
        fi
        if ((SECONDS >= deadline)); then
            show_logs ${logs}
            die "$name did not accept connections on 127.0.0.1:$port within ${START_TIMEOUT}s; see $logs"
        fi
        sleep 0.1
    done
}

# The end of each log, or that it is empty: a server killed before its first line leaves none.
show_logs() {
    local f
    for f in "$@"; do
        if [[ -s $f ]]; then
            printf '[stack] the end of %s:\n' "$f" >&2
            tail -n 20 "$f" >&2
        else
            printf '[stack] %s is empty or missing\n' "$f" >&2
        fi
    done
}

# ensure_server NAME PORT LOGS CWD LOG -- CMD... ; prints the port the server listens on.
ensure_server() {
    local name=$1 port=$2 logs=$3 cwd=$4 logf=$5; shift 6
    local pid running_port
    if pid=$(pid_of "$name"); then
        running_port=$(cat "$PIDS/$name.port" 2>/dev/null || echo "$port")
        if [[ $running_port != "$port" ]]; then
            log "$name: already running (pid $pid) on port $running_port, not $port; keeping it (run 'down' first to change ports)"
        fi
        wait_port "$name" "$running_port" "$logs" "$pid"
        log "$name: already running (pid $pid, 127.0.0.1:$running_port)"
        echo "$running_port"; return 0
    fi
    rm -f "$PIDS/$name.pid" "$PIDS/$name.port"
    if port_open "$port"; then
        die "$name: port 127.0.0.1:$port is already in use by a process this script did not start (pid file $PIDS/$name.pid missing or stale); stop it or choose another port"
    fi
    launch "$name" "$cwd" "$logf" "$@"
    echo "$port" >"$PIDS/$name.port"
    wait_port "$name" "$port" "$logs" "$(cat "$PIDS/$name.pid")"
    log "$name: started (pid $(cat "$PIDS/$name.pid"), 127.0.0.1:$port, logs: $logs)"
    echo "$port"
}

stop_server() {
    local name=$1 pid pgid i
    if ! pid=$(pid_of "$name"); then
        if [[ -f $PIDS/$name.pid ]]; then log "$name: not running (removing stale pid file)"; else log "$name: not running"; fi
        rm -f "$PIDS/$name.pid" "$PIDS/$name.port"
        return 0
    fi
    pgid=$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ' || true)
    local target=$pid
    [[ $pgid == "$pid" ]] && target=-$pid # setsid made it a group leader: signal its whole group
    kill -TERM -- "$target" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do live "$pid" || break; sleep 0.1; done
    if live "$pid"; then
        log "$name: still alive 10s after SIGTERM; sending SIGKILL"
        kill -KILL -- "$target" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do live "$pid" || break; sleep 0.1; done
    fi
    rm -f "$PIDS/$name.pid" "$PIDS/$name.port"
    log "$name: stopped (pid $pid)"
}

# ---------------------------------------------------------------------------------------------------------------
# up / down / status / env
# ---------------------------------------------------------------------------------------------------------------

cmd_up() {
    local with_maildev=1 arg
    for arg in "$@"; do
        case $arg in
            --no-maildev) with_maildev=0 ;;
            *) die "up: unknown option $arg" ;;
        esac
    done
    [[ -x $TANSU_BIN ]] || die "tansu is not installed ($TANSU_BIN); run: $0 install"
    [[ -x $VENV/bin/nx-27017 ]] || die "nx-27017 is not installed ($VENV); run: $0 install"
    if [[ $with_maildev -eq 1 ]]; then [[ -x $MAILDEV_BIN ]] || die "maildev is not installed ($MAILDEV_BIN); run: $0 install"; fi
    mkdir -p "$RUN" "$PIDS"

    local kport mport sport="" wport=""
    kport=$(ensure_server tansu "$KAFKA_PORT" "$RUN/tansu.log" "$RUN" "$RUN/tansu.log" -- \
        "$TANSU_BIN" broker --storage-engine sqlite://tansu.db \
        --listener-url "tcp://127.0.0.1:$KAFKA_PORT" --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT")

    # nx-27017 writes (and on SIGTERM removes) its own --pid-file; a stale one from a crash would block the start.
    # --data-dir gives each logical database its own file: with a single --db file every database shares the same
    # collections, so tests (and anyone using MONGODB_BASE_NAME) would see each other's letters.
    pid_of nx >/dev/null || rm -f "$RUN/nx.pid"
    mkdir -p "$RUN/nx-data"
    mport=$(ensure_server nx "$MONGO_PORT" "$RUN/nx.log $RUN/nx.console.log" "$RUN" "$RUN/nx.console.log" -- \
        "$VENV/bin/nx-27017" --data-dir "$RUN/nx-data" -p "$MONGO_PORT" --pid-file "$RUN/nx.pid" --log-file "$RUN/nx.log")

    if [[ $with_maildev -eq 1 ]]; then
        mkdir -p "$RUN/maildev"
        local was_running=0
        pid_of maildev >/dev/null && was_running=1
        sport=$(ensure_server maildev "$SMTP_PORT" "$RUN/maildev.log" "$RUN" "$RUN/maildev.log" -- \
            "$MAILDEV_BIN" --ip 127.0.0.1 --smtp "$SMTP_PORT" --web "$MAILDEV_WEB_PORT" --mail-directory "$RUN/maildev")
        if [[ $was_running -eq 0 || ! -s $PIDS/maildev.webport ]]; then echo "$MAILDEV_WEB_PORT" >"$PIDS/maildev.webport"; fi
        wport=$(cat "$PIDS/maildev.webport")
        # The web UI comes up separately from SMTP.
        wait_port maildev "$wport" "$RUN/maildev.log" "$(cat "$PIDS/maildev.pid")"
    elif pid_of maildev >/dev/null; then
        # Not asked for, but still running from an earlier `up`: keep advertising it.
        sport=$(cat "$PIDS/maildev.port")
        wport=$(cat "$PIDS/maildev.webport" 2>/dev/null || echo "$MAILDEV_WEB_PORT")
    fi

    local tmp="$STACK_ENV.tmp.$$"
    {
        echo "KAFKA_BROKERS=127.0.0.1:$kport"
        echo "MONGO_LOCAL=mongodb://127.0.0.1:$mport/?directConnection=true"
        if [[ -n $sport ]]; then
            echo "SMTP_HOST=127.0.0.1"
            echo "SMTP_PORT=$sport"
            echo "MAILDEV_URL=http://127.0.0.1:$wport/"
        fi
    } >"$tmp"
    if [[ -f $STACK_ENV ]] && cmp -s "$tmp" "$STACK_ENV"; then rm -f "$tmp"; else mv -f "$tmp" "$STACK_ENV"; fi
    log "stack is up; environment in $STACK_ENV:"
    cat "$STACK_ENV"
}

cmd_down() {
    local name
    for name in maildev nx tansu; do stop_server "$name"; done
    rm -f "$PIDS/maildev.webport"
}

cmd_status() {
    local name pid port state
    for name in tansu nx maildev; do
        if pid=$(pid_of "$name"); then
            port=$(cat "$PIDS/$name.port" 2>/dev/null || echo '?')
            if port_open "$port"; then state=listening; else state="NOT listening"; fi
            printf '%-8s running  pid %-7s 127.0.0.1:%s (%s)\n' "$name" "$pid" "$port" "$state"
        else
            printf '%-8s stopped\n' "$name"
        fi
    done
    if [[ -f $STACK_ENV ]]; then echo "env file: $STACK_ENV"; fi
}

cmd_env() { echo "$STACK_ENV"; }

usage() {
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
}

main() {
    local cmd=${1:-}; [[ $# -gt 0 ]] && shift
    case $cmd in
        install) cmd_install "$@" ;;
        up) cmd_up "$@" ;;
        down) cmd_down "$@" ;;
        status) cmd_status "$@" ;;
        env) cmd_env "$@" ;;
        -h | --help | help) usage ;;
        *) usage >&2; exit 2 ;;
    esac
}

main "$@"
