#!/usr/bin/env bash
# The sending budget in the relays' own configurations (Workspace's 2,000 a day with the rate left
# high and as a 24 h period with a burst, SES's 14 recipients a second with 50 and with 1 recipient
# a message, 100/s with 10,000 a day; one replica and three): the share of the binding limit used
# and the busiest window against its limit.
#
# Windows of a day cannot be measured on the real binary in a benchmark's time, so this runs the
# budget itself (the schedule, the pool and the ledger, src/budget/sim.rs) on tokio's paused
# clock, with 8 workers a replica, 50 ms sends and replicas' clocks 0 and ±10 minutes off. The
# end-to-end counterparts on the real binary, in seconds-long windows, are in tests/budget.rs.
#
# Usage: bench/relays.sh   (prints a Markdown table; about a minute in release mode)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
cargo test --release --locked --quiet --lib relays_table -- --nocapture 2>/dev/null | grep '^|'
