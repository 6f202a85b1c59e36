#!/usr/bin/env bash
# Explores the sending budget's simulation (src/budget/sim.rs) beyond the 24 property cases CI
# runs: five classes of drawn configurations over several seeds, each case asserted as CI's are
# (every window's cap, and 95 % of the binding limit: budget::sim::REQUIRED). The explorations
# the README's budget section and bench/results.md quote; one command, so that a change to the
# budget is compared with the figures before it rather than with memory.
#
# Usage:
#   scripts/explore-budget.sh [--min-seconds N] [--out DIR]
#     --min-seconds N  run every case at least N seconds (SIM_MIN_SECONDS): tells what is lost
#                      while the replicas start from what is lost once running
#     --out DIR        where each class and seed's output goes (default: a new temporary directory)
#
# Classes (cases x seeds):
#   default     SIM_EXPLORE=300, seeds 21 7 11 3 5                  (1,500 cases)
#   burst1      SIM_BURST1=1 SIM_EXPLORE=300, the same seeds        (1,500 cases)
#   recipients  SIM_BURST1=1 SIM_RECIPIENTS=1 SIM_EXPLORE=200,
#               seeds 21 7 11 3 5 13 17 19                          (1,600 cases)
#   recipients-burst  SIM_RECIPIENTS=1 SIM_EXPLORE=200: budgets in recipients with bursts
#               drawn up to the whole period, seeds 21 7 11 3 5 (1,000 cases; added at the
#               twenty-fifth stop: no class drew a burst in recipients before)
#   high        SIM_HIGH=1 SIM_BURST1=1 SIM_EXPLORE=100: rates of 10,000 to 100,000 a second
#               left out of the way, the default burst, seeds 21 7 11 3 5 (500 cases)
#
# SIM_STALLS=every_ms:ms in the environment makes the first write to the simulated ledger in each
# span of every_ms answer ms late, as a loaded MongoDB's now and then do (bench/results.md,
# "twenty-third stop": with SIM_STALLS=1000:300, 219 of the 5,100 cases were below 95 %, 408 before
# that stop's fixes; 217 since the twenty-fourth stop's; 262 of 6,100 since the twenty-fifth's,
# whose judge no longer passes what it could not fail).
#
# Prints, per class and seed, the cases below 95 % and the worst; then every case below 95 %.
# Exits 1 if a case is below 95 % or over a cap (a failed run), else 0. Takes about a minute of
# two CPUs after the release build of the library's tests (62 s on 2026-12-07; the build, after
# a change to the library, a few minutes more).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MIN_SECONDS=""
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --min-seconds) MIN_SECONDS="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
OUT="${OUT:-$(mktemp -d -t mailsender-explore.XXXXXX)}"
mkdir -p "$OUT"

cd "$ROOT"
echo "building the library's tests (release)..." >&2
BIN="$(cargo test --locked --release --lib --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("reason") == "compiler-artifact" and msg.get("executable") and msg["target"]["kind"] == ["lib"]:
        print(msg["executable"])
')"
if [ -z "$BIN" ]; then
  echo "the library's test binary was not built: run cargo test --release --lib --no-run to see why" >&2
  exit 2
fi

# One line per run: class, seed, the environment it adds.
runs() {
  for seed in 21 7 11 3 5; do echo "default $seed SIM_EXPLORE=300"; done
  for seed in 21 7 11 3 5; do echo "burst1 $seed SIM_BURST1=1 SIM_EXPLORE=300"; done
  for seed in 21 7 11 3 5 13 17 19; do echo "recipients $seed SIM_BURST1=1 SIM_RECIPIENTS=1 SIM_EXPLORE=200"; done
  for seed in 21 7 11 3 5; do echo "recipients-burst $seed SIM_RECIPIENTS=1 SIM_EXPLORE=200"; done
  for seed in 21 7 11 3 5; do echo "high $seed SIM_HIGH=1 SIM_BURST1=1 SIM_EXPLORE=100"; done
}

export BIN OUT MIN_SECONDS
# shellcheck disable=SC2016 # expanded by the inner shell
runs | xargs -P "$(nproc)" -L 1 bash -c '
  class=$0 seed=$1; shift
  extra=()
  [ -n "$MIN_SECONDS" ] && extra+=("SIM_MIN_SECONDS=$MIN_SECONDS")
  env "$@" "${extra[@]}" SIM_SEED="$seed" "$BIN" any_configuration --nocapture --test-threads 1 \
    > "$OUT/$class-s$seed.txt" 2>&1 || true
'

# A case prints its share first: "  92.5 % (required 95 %) <settings> | <deployment> ...", on
# the test's own line for the first one ("test ... ... 97.1 % ...").
cases() { grep -hE '[0-9.]+ % \(required' "$@" | sed -E 's/^test [^ ]+ \.\.\. *//; s/^ *//'; }
# The cases below 95 % of their binding limit, from the counts each line ends with ("used U of B"),
# not from the share printed first: that is rounded to a tenth, and 1,376 of 1,449 (94.96 %) read
# 95.0 and went uncounted.
below_95() { awk '{ used = $(NF - 2); of = $NF; if (of > 0 && used < 0.95 * of) print }'; }

status=0
printf '%-11s %5s %6s %6s  %s\n' class seed cases below worst
for file in "$OUT"/*-s*.txt; do
  name="$(basename "$file" .txt)"
  class="${name%-s*}" seed="${name##*-s}"
  total="$(cases "$file" | wc -l)"
  below="$(cases "$file" | below_95 | wc -l)"
  worst="$(cases "$file" | sort -n | awk 'NR == 1 { print substr($0, 1, 90) }')"
  printf '%-11s %5s %6s %6s  %s\n' "$class" "$seed" "$total" "$below" "$worst"
  if [ "$below" -gt 0 ]; then status=1; fi
  if grep -q "test result: FAILED" "$file" && [ "$below" -eq 0 ]; then
    echo "  $file: the run failed otherwise (a cap?), see its end" >&2
    status=1
  fi
done
echo
echo "below 95 %:"
cases "$OUT"/*-s*.txt | below_95 | sort -n || true
echo "(each class and seed's output: $OUT)"
exit "$status"
