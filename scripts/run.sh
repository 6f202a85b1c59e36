#!/usr/bin/env bash
# Sets up and starts the local stack (Kafka-protocol broker, MongoDB-wire server, maildev with its
# web page) and runs mailsender against it in the foreground. Ctrl-C or POST /halt stops the
# service; the stack keeps running (scripts/stack.sh down stops it).
#
# The first run installs the stack's servers and builds the service at the same time: about 8.5
# minutes on 2 cores from an empty cache; later runs start in seconds. The phases' times are printed
# before the service starts.
#
# Any variable from the README's configuration table can be set on the command line, e.g.
#   SMTP_RATE_LIMIT_MAX_LETTERS=100 SMTP_RATE_LIMIT_PERIOD=1s scripts/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${MAILSENDER_CACHE:-$HOME/.cache/mailsender}
export MAILSENDER_CACHE=$CACHE
mkdir -p "$CACHE"
started=$SECONDS
phases=()
say() { printf '[run] %s\n' "$*" >&2; }
phase_done() { phases+=("$(printf '%-34s %4ds' "$1" "$2")"); }

# Waits for a background job, printing every 30 s what it is doing (the last line of its most
# recently written log) instead of staying silent.
wait_job() { # wait_job PID WHAT LOG...
    local pid=$1 what=$2 since=$SECONDS next=30 newest
    shift 2
    while kill -0 "$pid" 2>/dev/null; do
        sleep 1
        if ((SECONDS - since >= next)); then
            next=$((next + 30))
            newest=$(ls -t "$@" 2>/dev/null | head -n1)
            say "$what: $((SECONDS - since))s so far (log: ${newest:-$1}): $(tail -n1 "${newest:-$1}" 2>/dev/null | tr -d '\r' | cut -c1-90)"
        fi
    done
    wait "$pid"
}

# The service's build and the stack's install run side by side: both have long single-threaded
# stretches (configure scripts, linking), so together they finish sooner than one after the other.
build_log=$CACHE/service-build.log
say "building mailsender (cargo build --release; log: $build_log)"
build_started=$SECONDS
cargo build --release --locked >"$build_log" 2>&1 &
build_pid=$!

install_log=$CACHE/stack-install.log
say "installing the local stack if needed (tansu, nx-27017, maildev; log: $install_log)"
install_started=$SECONDS
scripts/stack.sh install >"$install_log" 2>&1 &
install_pid=$!
if ! wait_job "$install_pid" "stack install" "$install_log" "$CACHE/tansu-install.log" "$CACHE/npm.log"; then
    tail -n 30 "$install_log" >&2
    say "installing the stack failed; see $install_log"
    exit 1
fi
phase_done "stack install" $((SECONDS - install_started))

up_started=$SECONDS
scripts/stack.sh up >"$CACHE/stack-up.log" 2>&1 || { cat "$CACHE/stack-up.log" >&2; exit 1; }
phase_done "stack start" $((SECONDS - up_started))

if ! wait_job "$build_pid" "service build" "$build_log"; then
    tail -n 30 "$build_log" >&2
    say "building mailsender failed; see $build_log"
    exit 1
fi
phase_done "service build (overlapped)" $((SECONDS - build_started))

stack_env=$(scripts/stack.sh env)
set -a
# shellcheck disable=SC1090
. "$stack_env"
set +a

# Local defaults: maildev speaks plain SMTP; everything else keeps the service's own defaults.
export SMTP_TLS=${SMTP_TLS:-none}
export SMTP_FROM=${SMTP_FROM:-"Mailsender <noreply@mailsender.local>"}
export HTTP_ADDR=${HTTP_ADDR:-127.0.0.1:8000}

printf '\n  phases:\n' >&2
for line in "${phases[@]}"; do printf '    %s\n' "$line" >&2; done
printf '    %-34s %4ds\n' "total before start" $((SECONDS - started)) >&2
cat >&2 <<TXT

  mailsender is starting on http://${HTTP_ADDR}
  next:
    send the sample batch:  curl -X POST http://${HTTP_ADDR}/post -H 'content-type: application/json' -d @postman/sample-batch.json
    see the mail:           ${MAILDEV_URL:-http://127.0.0.1:1080/}
    stop the service:       Ctrl-C, or curl -X POST http://${HTTP_ADDR}/halt
    stop the stack:         scripts/stack.sh down

TXT
exec "${CARGO_TARGET_DIR:-target}/release/mailsender"
