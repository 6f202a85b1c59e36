#!/usr/bin/env bash
# Regenerates the DSN fixtures of tests/fixtures/feedback/ with a real MTA: Debian's Postfix
# (scripts/postfix.sh install), in a private instance of its own on loopback (never the system one,
# never the shared test relay), that takes a message for three recipients and bounces it back to its
# signed return path, as a relay does after its 250:
#   nobody@hard.example   the remote MX answers 550 5.1.1 user unknown        -> dsn-postfix-hard.eml (failed)
#   later@slow.example    the remote MX answers 452 4.2.2 mailbox full; after a second Postfix warns
#                         -> dsn-postfix-delay.eml (delayed), and past maximal_queue_lifetime it gives up
#                         -> dsn-postfix-soft.eml (failed, 4.2.2)
#   fine@ok.example       accepted by the remote MX (no DSN)
# The "remote MX" is the test SMTP sink (scripts/smtp_sink.py) answering RCPT as its control file says; the
# DSNs go to the return path's domain (bounce.example.com), which a transport map routes to a second sink;
# the fixtures are that sink's byte-exact copies. Nothing leaves 127.0.0.1.
#
# Usage: scripts/feedback-fixtures.sh   (as root; needs MAILSENDER_CACHE's venv, as scripts/stack.sh makes)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
CACHE=${MAILSENDER_CACHE:-$HOME/.cache/mailsender}
PY=$CACHE/venv/bin/python
OUT=$REPO/tests/fixtures/feedback
BASE=/var/tmp/mailsender-feedback-fixtures
CONF=$BASE/etc
PORT=${FIXTURE_POSTFIX_PORT:-29125}
# The letter the fixtures' return path names; tests deliver the DSNs to their own letters' return paths.
RETURN_PATH='bounces+65a1b2c3d4e5f60718293a4b.0123456789abcdef0123@bounce.example.com'

log() { printf '[feedback-fixtures] %s\n' "$*" >&2; }
[[ $(id -u) -eq 0 ]] || { log "run as root (Postfix's master drops to the postfix user)"; exit 1; }
[[ -x /usr/sbin/postfix ]] || bash scripts/postfix.sh install

stop() {
    /usr/sbin/postfix -c "$CONF" stop >/dev/null 2>&1 || true
    [[ -n ${SINK_PID:-} ]] && kill "$SINK_PID" 2>/dev/null || true
    [[ -n ${MX_PID:-} ]] && kill "$MX_PID" 2>/dev/null || true
}
trap stop EXIT
/usr/sbin/postfix -c "$CONF" stop >/dev/null 2>&1 || true
rm -rf "$BASE"
mkdir -p "$CONF" "$BASE/queue" "$BASE/data"
chown postfix "$BASE/data"

"$PY" scripts/smtp_sink.py --host 127.0.0.1 --port 0 --port-file "$BASE/sink.port" --out "$BASE/sink.jsonl" \
    --hostname mx.bounce.example.com &
SINK_PID=$!
for _ in $(seq 100); do [[ -s $BASE/sink.port ]] && break; sleep 0.1; done
SINK_PORT=$(cat "$BASE/sink.port")
cat >"$BASE/mx.json" <<JSON
{"rcpt_replies": {
  "nobody@hard.example": "550 5.1.1 <nobody@hard.example>: Recipient address rejected: User unknown in virtual mailbox table",
  "later@slow.example": "452 4.2.2 <later@slow.example>: Recipient address rejected: Mailbox full"}}
JSON
"$PY" scripts/smtp_sink.py --host 127.0.0.1 --port 0 --port-file "$BASE/mx.port" --out "$BASE/mx.jsonl" \
    --control "$BASE/mx.json" --hostname mx.remote.example &
MX_PID=$!
for _ in $(seq 100); do [[ -s $BASE/mx.port ]] && break; sleep 0.1; done
MX_PORT=$(cat "$BASE/mx.port")

cat >"$CONF/main.cf" <<CF
compatibility_level = 3.6
queue_directory = $BASE/queue
data_directory = $BASE/data
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = relay.mailsender.test
mydomain = mailsender.test
myorigin = mailsender.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
# Accept every recipient (a relay's 250), then fail or defer it in the queue, as a relay's delivery would.
transport_maps = texthash:$CONF/transport
default_transport = discard:
alias_maps =
alias_database =
biff = no
smtp_tls_security_level = none
maillog_file = $BASE/maillog
# Fast queue: a delay warning after a second, a final bounce of the deferred recipient after ~12 s.
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
delay_warning_time = 1s
maximal_queue_lifetime = 12s
bounce_queue_lifetime = 12s
CF
cat >"$CONF/transport" <<CF
hard.example smtp:[127.0.0.1]:$MX_PORT
slow.example smtp:[127.0.0.1]:$MX_PORT
ok.example smtp:[127.0.0.1]:$MX_PORT
bounce.example.com smtp:[127.0.0.1]:$SINK_PORT
CF
cat >"$CONF/master.cf" <<CF
127.0.0.1:$PORT inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
CF
/usr/sbin/postfix -c "$CONF" set-permissions >/dev/null 2>&1 || true
/usr/sbin/postfix -c "$CONF" check
/usr/sbin/postfix -c "$CONF" start
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done

log "sending one message for three recipients through Postfix on :$PORT"
"$PY" - "$PORT" "$RETURN_PATH" <<'PY'
import smtplib, sys
port, return_path = int(sys.argv[1]), sys.argv[2]
message = (
    "From: Sender <sender@example.com>\r\n"
    "To: undisclosed-recipients:;\r\n"
    "Subject: Monthly news\r\n"
    "Message-ID: <65a1b2c3d4e5f60718293a4b@example.com>\r\n"
    "Date: Tue, 01 Dec 2026 18:00:00 +0000\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "\r\n"
    "Hello.\r\n"
)
with smtplib.SMTP("127.0.0.1", port) as smtp:
    refused = smtp.sendmail(return_path, ["nobody@hard.example", "later@slow.example", "fine@ok.example"], message)
    assert not refused, refused
PY

log "waiting for three DSNs (failed, delayed, then failed after the queue lifetime)"
for _ in $(seq 600); do
    [[ -f $BASE/sink.jsonl ]] && (( $(wc -l <"$BASE/sink.jsonl") >= 3 )) && break
    sleep 0.1
done
(( $(wc -l <"$BASE/sink.jsonl") >= 3 )) || { tail -n 30 "$BASE/maillog" >&2; log "fewer than three DSNs arrived"; exit 1; }

"$PY" - "$BASE/sink.jsonl" "$OUT" "$RETURN_PATH" <<'PY'
import base64, json, sys, pathlib
records, out, return_path = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
for line in open(records):
    record = json.loads(line)
    assert record["mail_from"] in ("", "<>"), "a DSN's envelope sender is null"
    assert record["rcpt_tos"] == [return_path], record["rcpt_tos"]
    raw = base64.b64decode(record["raw_b64"])
    text = raw.decode("utf-8", "replace")
    if "Action: delayed" in text:
        name = "dsn-postfix-delay.eml"
    elif "hard.example" in text.split("message/delivery-status", 1)[-1]:
        name = "dsn-postfix-hard.eml"
    else:
        name = "dsn-postfix-soft.eml"
    (out / name).write_bytes(raw)
    print(f"wrote {name} ({len(raw)} bytes)", file=sys.stderr)
PY
grep -E 'status=(bounced|deferred)' "$BASE/maillog" | sed 's/^/[postfix log] /' >&2 || true
