#!/usr/bin/env bash
# mailsender benchmark: installs and starts a private local stack, builds the service in release mode,
# pushes letters through it and prints a table of figures (also written to bench/results.md).
#
# Usage: bench/run.sh [callgrind] [--quick] [--runs N] [--senders N] [--figures 1,2,...] [--keep-stack] [--verbose]
#   --quick        1 run per figure and smaller sizes (a few minutes); default: full mode, 3 runs, medians
#   --runs N       runs per figure (overrides the mode's default)
#   --senders N    SMTP_MAX_SENDERS, and the bare client's concurrency for the sink ceiling (default 8)
#   --figures L    only these figures (1..14; 1, 2 and 8 share their runs)
#   --out FILE     results file (default bench/results.md)
#   --keep-stack   leave the stack running afterwards (stop it with the same env and scripts/stack.sh down)
#   --binary PATH  measure this release binary instead of building one (an A/B against another commit's build:
#                  `git worktree add ../old REV && (cd ../old && cargo build --release)`, then --binary ../old/...)
#   --dkim rsa|ed25519  sign every message (a fresh RSA-2048 or Ed25519 key): figure 2a is then the CPU with DKIM
#   --delivery individual  SMTP_DELIVERY=individual: figure 1 counts letters of 2 copies each
#   --letters N, --backlog N, --rate-burst N, --service-env NAME=VALUE, --verbose: see bench/README.md
#   callgrind      instead of the figures: instructions per letter under valgrind's callgrind (bench/callgrind.py;
#                  installs Debian's valgrind if missing), with --runs N, --sizes SMALL,LARGE (500,2500), --dkim,
#                  --delivery, --service-env; the report is printed and, with --out FILE, appended to FILE.
#                  The letters are stored while sending is paused, then sent (--live: as they are stored, the
#                  method before 2026-12-03, whose runs spread by +-10 %); --keep-parts DIR keeps the profiles
#
# Environment: BENCH_RUN (run dir, default /tmp/bench-run), BENCH_KAFKA_PORT (29392), BENCH_MONGO_PORT (28417),
# MAILSENDER_CACHE (installed servers, as for scripts/stack.sh).
# A figure that cannot be measured shows "n/a (...)"; only a failed set-up makes this script fail.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=$ROOT/bench
CACHE=${MAILSENDER_CACHE:-$HOME/.cache/mailsender}
export MAILSENDER_RUN=${BENCH_RUN:-/tmp/bench-run}
export KAFKA_PORT=${BENCH_KAFKA_PORT:-29392}
export MONGO_PORT=${BENCH_MONGO_PORT:-28417}
PY=$CACHE/venv/bin/python

keep=0
dkim=
bin=
args=()
out=$BENCH/results.md
mode=figures
if [[ ${1:-} == callgrind ]]; then
    mode=callgrind
    out=
    shift
fi
while [[ $# -gt 0 ]]; do
    case $1 in
        --quick | --verbose | --live) args+=("$1") ;;
        --runs | --senders | --figures | --letters | --backlog | --service-env | --rate-burst | --rate-limit | --sizes | --keep-parts) args+=("$1" "$2"); shift ;;
        --out) out=$2; shift ;;
        --dkim) dkim=$2; shift ;;
        --delivery) args+=(--service-env "SMTP_DELIVERY=$2"); shift ;;
        --keep-stack) keep=1 ;;
        --binary) bin=$2; shift ;;
        -h | --help) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "run.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done

log() { printf '[bench] %s\n' "$*" >&2; }

if [[ -n $dkim ]]; then
    mkdir -p "$MAILSENDER_RUN"
    key=$MAILSENDER_RUN/dkim-$dkim.pem
    case $dkim in
        rsa) openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$key" 2>/dev/null ;;
        ed25519) openssl genpkey -algorithm ed25519 -out "$key" 2>/dev/null ;;
        *) echo "run.sh: --dkim takes rsa or ed25519" >&2; exit 2 ;;
    esac
    args+=(--service-env DKIM_SELECTOR=bench --service-env "DKIM_PRIVATE_KEY_FILE=$key")
    log "DKIM: signing with a fresh $dkim key ($key)"
fi

as_root() {
    if [[ $(id -u) -eq 0 ]]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else log "need root (or sudo) to run: $*"; exit 1
    fi
}

# Debian's valgrind, as scripts/postfix.sh installs postfix; the packages are kept in the cache dir, so a fresh
# machine with the cache does not download them again.
install_valgrind() {
    if command -v valgrind >/dev/null 2>&1 && command -v callgrind_control >/dev/null 2>&1; then
        return 0
    fi
    command -v apt-get >/dev/null 2>&1 || { log "apt-get not found: install Debian's valgrind package by hand"; exit 1; }
    mkdir -p "$CACHE/apt/partial"
    log "apt-get install -y valgrind (packages cached in $CACHE/apt)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 -o "Dir::Cache::archives=$CACHE/apt" \
        install -y -qq --no-install-recommends valgrind
    command -v callgrind_control >/dev/null 2>&1 || { log "valgrind installed, but callgrind_control is missing"; exit 1; }
}

[[ $mode == callgrind ]] && install_valgrind
"$ROOT/scripts/stack.sh" install

if [[ -n $bin ]]; then
    BIN=$(realpath "$bin")
else
    log "cargo build --release --locked"
    (cd "$ROOT" && cargo build --release --locked --quiet)
    BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/mailsender
fi
log "binary: $BIN"
[[ -x $BIN ]] || { log "no binary at $BIN"; exit 1; }

stop_stack() {
    if [[ $keep -eq 0 ]]; then
        "$ROOT/scripts/stack.sh" down || true
        # Only what this benchmark wrote: its databases and broker data.
        rm -rf "$MAILSENDER_RUN/nx-data" "$MAILSENDER_RUN/tansu.db"* "$MAILSENDER_RUN/work"
    fi
}
trap stop_stack EXIT
"$ROOT/scripts/stack.sh" up --no-maildev >/dev/null

log "load average before: $(cut -d' ' -f1-3 /proc/loadavg) ($(nproc) cores)"
if [[ $mode == callgrind ]]; then
    "$PY" "$BENCH/callgrind.py" --repo "$ROOT" --binary "$BIN" --stack-env "$MAILSENDER_RUN/stack.env" \
        --python "$PY" --work "$MAILSENDER_RUN/work" ${out:+--out "$out"} "${args[@]}"
    exit
fi
"$PY" "$BENCH/bench.py" --repo "$ROOT" --binary "$BIN" --stack-env "$MAILSENDER_RUN/stack.env" \
    --tansu "$CACHE/tansu/bin/tansu" --python "$PY" --work "$MAILSENDER_RUN/work" --out "$out" "${args[@]}"
