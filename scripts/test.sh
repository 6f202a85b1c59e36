#!/usr/bin/env bash
# Sets up everything the tests need on a fresh machine (the local stack's servers, the checking
# tools) and runs every test: unit, end-to-end against real servers, fault injection, artefact checks.
#
#   scripts/test.sh            everything
#   scripts/test.sh -- FILTER  only the cargo tests matching FILTER (the stack is still started)
#
# The test stack runs on its own ports and run dir, so it never touches a stack started by scripts/run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${MAILSENDER_CACHE:-$HOME/.cache/mailsender}
export MAILSENDER_CACHE=$CACHE
export MAILSENDER_RUN=${MAILSENDER_TEST_RUN:-$CACHE/test-run}
export KAFKA_PORT=${TEST_KAFKA_PORT:-29192} MONGO_PORT=${TEST_MONGO_PORT:-28217}
filter=()
if [[ ${1:-} == "--" ]]; then shift; filter=("$@"); fi

step() { printf '\n== %s ==\n' "$*"; }
started=$(date +%s)

step "installing the local stack (cached after the first run), building the tests meanwhile"
# The two builds overlap: each has long single-threaded stretches (configure scripts, linking).
build_log=$(mktemp)
cargo test --locked --no-run >"$build_log" 2>&1 &
build_pid=$!
scripts/stack.sh install
if ! wait "$build_pid"; then cat "$build_log"; exit 1; fi
tail -n 3 "$build_log"

step "starting a fresh test stack"
scripts/stack.sh down >/dev/null 2>&1 || true
rm -rf "$MAILSENDER_RUN"
scripts/stack.sh up --no-maildev
trap 'scripts/stack.sh down >/dev/null 2>&1 || true' EXIT
set -a
# shellcheck disable=SC1091
. "$MAILSENDER_RUN/stack.env"
set +a

if [[ ${#filter[@]} -eq 0 ]]; then
    step "formatting and lints"
    if cargo fmt --version >/dev/null 2>&1; then cargo fmt --all -- --check; else echo "rustfmt not installed; skipped"; fi
    if cargo clippy --version >/dev/null 2>&1; then cargo clippy --locked --all-targets -- -D warnings; else echo "clippy not installed; skipped"; fi

    step "artefact checks (k8s, compose, Dockerfile, Postman collection)"
    scripts/check-artifacts.sh
    scripts/check-artifacts.sh install >/dev/null
fi

step "cargo tests (unit, end-to-end, fault injection)"
cargo test --locked -- "${filter[@]}"
echo "test.sh: finished in $(( $(date +%s) - started ))s"
