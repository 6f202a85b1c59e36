#!/usr/bin/env bash
# Sets up and starts the local stack (Kafka-protocol broker, MongoDB-wire server, maildev with its
# web page) and runs mailsender against it in the foreground. Ctrl-C or POST /halt stops the
# service; the stack keeps running (scripts/stack.sh down stops it).
#
# Any variable from the README's configuration table can be set on the command line, e.g.
#   SMTP_RATE_LIMIT_MAX_LETTERS=100 SMTP_RATE_LIMIT_PERIOD=1s scripts/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/stack.sh install
scripts/stack.sh up
stack_env=$(scripts/stack.sh env)
set -a
# shellcheck disable=SC1090
. "$stack_env"
set +a

# Local defaults: maildev speaks plain SMTP; everything else keeps the service's own defaults.
export SMTP_TLS=${SMTP_TLS:-none}
export SMTP_FROM=${SMTP_FROM:-"Mailsender <noreply@mailsender.local>"}
export HTTP_ADDR=${HTTP_ADDR:-127.0.0.1:8000}

cat <<TXT

  mailsender is starting on http://${HTTP_ADDR}
  received mail:  ${MAILDEV_URL:-http://127.0.0.1:1080/}
  try:            curl -X POST http://${HTTP_ADDR}/post -H 'content-type: application/json' -d @postman/sample-batch.json

TXT
cargo build --release --locked
exec target/release/mailsender
