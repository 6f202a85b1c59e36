#!/usr/bin/env bash
# Sets up everything the tests need on a fresh machine (the local stack's servers, the checking
# tools, Debian's postfix package) and runs every test: unit, end-to-end against real servers, fault
# injection, artefact checks, and a stage against a real Postfix (scripts/postfix.sh) as the relay.
#
#   scripts/test.sh            everything
#   scripts/test.sh -- FILTER  only the cargo tests matching FILTER (the stack is still started)
#
# The test stack runs on its own ports and run dir, so it never touches a stack started by scripts/run.sh.
# The phases' times are printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${MAILSENDER_CACHE:-$HOME/.cache/mailsender}
export MAILSENDER_CACHE=$CACHE
export MAILSENDER_RUN=${MAILSENDER_TEST_RUN:-$CACHE/test-run}
export KAFKA_PORT=${TEST_KAFKA_PORT:-29192} MONGO_PORT=${TEST_MONGO_PORT:-28217}
filter=()
if [[ ${1:-} == "--" ]]; then shift; filter=("$@"); fi
mkdir -p "$CACHE"

step() { printf '\n== %s ==\n' "$*"; }
started=$SECONDS
phases=()
phase_done() { phases+=("$(printf '%-44s %4ds' "$1" "$2")"); }
print_phases() {
    printf '\ntest.sh phases:\n'
    for line in "${phases[@]}"; do printf '  %s\n' "$line"; done
    printf '  %-44s %4ds\n' "total" $((SECONDS - started))
}

step "installing the local stack and the checking tools (cached after the first run), building the tests meanwhile"
# The three overlap: each has long single-threaded stretches (configure scripts, downloads, linking).
build_log=$CACHE/test-build.log
build_started=$SECONDS
cargo test --locked --no-run >"$build_log" 2>&1 &
build_pid=$!
tools_pid=
if [[ ${#filter[@]} -eq 0 ]]; then
    scripts/check-artifacts.sh install >"$CACHE/tools-install.log" 2>&1 &
    tools_pid=$!
fi
install_started=$SECONDS
scripts/stack.sh install
phase_done "stack install" $((SECONDS - install_started))
# Debian's postfix package, for the Postfix stage; fails the run if it cannot be installed.
postfix_install_started=$SECONDS
scripts/postfix.sh install
phase_done "Postfix install" $((SECONDS - postfix_install_started))
if [[ -n $tools_pid ]] && ! wait "$tools_pid"; then cat "$CACHE/tools-install.log"; exit 1; fi
if ! wait "$build_pid"; then cat "$build_log"; exit 1; fi
phase_done "test build (overlapped with the install)" $((SECONDS - build_started))
tail -n 3 "$build_log"

step "starting a fresh test stack"
up_started=$SECONDS
scripts/stack.sh down >/dev/null 2>&1 || true
rm -rf "$MAILSENDER_RUN"
scripts/stack.sh up --no-maildev
trap 'scripts/stack.sh down >/dev/null 2>&1 || true' EXIT
set -a
# shellcheck disable=SC1091
. "$MAILSENDER_RUN/stack.env"
set +a
phase_done "stack start" $((SECONDS - up_started))

if [[ ${#filter[@]} -eq 0 ]]; then
    step "formatting and lints"
    lint_started=$SECONDS
    if cargo fmt --version >/dev/null 2>&1; then cargo fmt --all -- --check; else echo "rustfmt not installed; skipped"; fi
    if cargo clippy --version >/dev/null 2>&1; then cargo clippy --locked --all-targets -- -D warnings; else echo "clippy not installed; skipped"; fi
    phase_done "formatting and lints" $((SECONDS - lint_started))

    step "artefact checks (k8s, compose, Dockerfile, Postman collection, dashboard and alert rules)"
    checks_started=$SECONDS
    scripts/check-artifacts.sh
    phase_done "artefact checks" $((SECONDS - checks_started))
fi

step "cargo tests (unit, end-to-end, fault injection)"
tests_started=$SECONDS
# tests/postfix.rs (every test named postfix_*) runs in the next stage, against its own relay.
cargo test --locked -- --skip postfix_ "${filter[@]}"
phase_done "cargo tests" $((SECONDS - tests_started))

step "a real Postfix as the relay (tests/postfix.rs)"
postfix_started=$SECONDS
scripts/postfix.sh up
trap 'scripts/postfix.sh down >/dev/null 2>&1 || true; scripts/stack.sh down >/dev/null 2>&1 || true' EXIT
set -a
# shellcheck disable=SC1091
. "$MAILSENDER_RUN/postfix/postfix.env"
set +a
cargo test --locked --test postfix -- "${filter[@]}"
phase_done "Postfix stage" $((SECONDS - postfix_started))
print_phases
echo "test.sh: finished in $((SECONDS - started))s"
