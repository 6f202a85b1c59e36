#!/usr/bin/env bash
# A real Postfix (Debian's package) as a test relay: a private instance on loopback ports, with its own
# config and queue dirs under the run dir, that delivers nothing anywhere (every message goes to the
# discard transport). tests/postfix.rs runs the mailsender binary against it; scripts/test.sh runs that.
#
# Usage: scripts/postfix.sh install | up | down | status
#
# Three smtpd services share the instance; anvil counts per service and client address, so the one the
# rate-limit test hammers does not slow the others:
#   POSTFIX_PORT          STARTTLS offered (a certificate of our own, scripts/gen-test-cert.sh),
#                         smtpd_recipient_limit = 100, no anvil rate limits
#   POSTFIX_LIMITED_PORT  the same, plus anvil's message and connection rate limits, loopback not exempted
#   POSTFIX_TLS_PORT      the same as POSTFIX_PORT, but STARTTLS required (smtpd_tls_security_level = encrypt)
# Environment (all optional): MAILSENDER_CACHE, MAILSENDER_RUN (as scripts/stack.sh), POSTFIX_PORT=29025,
# POSTFIX_LIMITED_PORT=29026, POSTFIX_TLS_PORT=29027. `up` writes the ports and limits to
# $MAILSENDER_RUN/postfix/postfix.env.
#
# Never the system instance: the package is installed with debconf's "No configuration", so no main.cf
# exists in /etc/postfix and nothing listens on port 25.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

CACHE=${MAILSENDER_CACHE:-$HOME/.cache/mailsender}
RUN=${MAILSENDER_RUN:-$CACHE/run}
PORT=${POSTFIX_PORT:-29025}
LIMITED_PORT=${POSTFIX_LIMITED_PORT:-29026}
TLS_PORT=${POSTFIX_TLS_PORT:-29027}
# The instance lives where the postfix user can reach it: daemons that dropped root open some files by
# absolute path, and $HOME is often 0700. The run dir gets a symlink to it.
BASE=${POSTFIX_BASE:-/var/tmp/mailsender-postfix/$(printf '%s' "$RUN" | md5sum | cut -c1-12)}
CONF=$BASE/etc
QUEUE=$BASE/queue
DATA=$BASE/data
ENV_FILE=$RUN/postfix/postfix.env

# anvil's limits on the limited service: 20 messages (MAIL FROM) and 30 connections per 10 s per client.
RATE_TIME_UNIT=10s
MESSAGE_RATE_LIMIT=20
CONNECTION_RATE_LIMIT=30
RECIPIENT_LIMIT=100

log() { printf '[postfix] %s\n' "$*" >&2; }
die() { printf '[postfix] ERROR: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [[ $(id -u) -eq 0 ]]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else die "need root (or sudo) to run: $*"
    fi
}

installed() { [[ -x /usr/sbin/postfix && -x /usr/lib/postfix/sbin/smtpd ]] && getent passwd postfix >/dev/null; }

cmd_install() {
    if installed; then
        log "installed: $(/usr/sbin/postconf -d -h mail_version 2>/dev/null || echo '?')"
        return 0
    fi
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found: install Debian's postfix package by hand"
    # "No configuration": the package configures and starts no system instance (no port 25).
    echo "postfix postfix/main_mailer_type select No configuration" | as_root debconf-set-selections
    log "apt-get update"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 update -qq
    log "apt-get install -y postfix"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq \
        --no-install-recommends postfix
    installed || die "apt-get finished but /usr/sbin/postfix or the postfix user is missing"
    log "installed: $(/usr/sbin/postconf -d -h mail_version)"
}

write_config() {
    local certs=$BASE/certs
    bash "$REPO/scripts/gen-test-cert.sh" "$certs"
    mkdir -p "$CONF" "$QUEUE" "$DATA"
    chown postfix "$DATA"
    # Only loopback, only the discard transport: nothing leaves the machine, whatever the recipient.
    cat >"$CONF/main.cf" <<EOF
compatibility_level = 3.6
queue_directory = $QUEUE
data_directory = $DATA
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.mailsender.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
transport_maps = static:discard:
default_transport = discard:
relay_transport = discard:
local_transport = discard:
alias_maps =
alias_database =
biff = no
maillog_file = $BASE/maillog
maillog_file_prefixes = $BASE
smtpd_banner = \$myhostname ESMTP
smtpd_recipient_limit = $RECIPIENT_LIMIT
# anvil applies its limits to loopback too (the default exempts \$mynetworks).
smtpd_client_event_limit_exceptions =
anvil_rate_time_unit = $RATE_TIME_UNIT
smtpd_tls_security_level = may
smtpd_tls_cert_file = $certs/cert.pem
smtpd_tls_key_file = $certs/key.pem
smtpd_tls_session_cache_database =
EOF
    # One service without anvil's rate limits, one with them (anvil counts per service and client), one
    # that takes mail only over TLS.
    cat >"$CONF/master.cf" <<EOF
127.0.0.1:$PORT inet n - n - - smtpd
127.0.0.1:$TLS_PORT inet n - n - - smtpd
  -o smtpd_tls_security_level=encrypt
127.0.0.1:$LIMITED_PORT inet n - n - - smtpd
  -o smtpd_client_message_rate_limit=$MESSAGE_RATE_LIMIT
  -o smtpd_client_connection_rate_limit=$CONNECTION_RATE_LIMIT
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
EOF
}

running() { /usr/sbin/postfix -c "$CONF" status >/dev/null 2>&1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

cmd_up() {
    installed || die "Postfix is not installed; run: $0 install"
    [[ $(id -u) -eq 0 ]] || die "the private Postfix instance is started as root (its master drops to the postfix user)"
    mkdir -p "$RUN/postfix"
    ln -sfn "$BASE" "$RUN/postfix/instance"
    if running; then
        log "already running ($CONF); reloading its configuration"
        write_config
        /usr/sbin/postfix -c "$CONF" reload >/dev/null 2>&1
    else
        write_config
        /usr/sbin/postfix -c "$CONF" set-permissions >/dev/null 2>&1 || true
        /usr/sbin/postfix -c "$CONF" check || die "postfix check failed for $CONF"
        /usr/sbin/postfix -c "$CONF" start || { tail -n 30 "$BASE/maillog" >&2 || true; die "postfix start failed"; }
    fi
    local port waited=0
    for port in "$PORT" "$LIMITED_PORT" "$TLS_PORT"; do
        until port_open "$port"; do
            ((waited++ < 100)) || { tail -n 30 "$BASE/maillog" >&2 || true; die "nothing listens on 127.0.0.1:$port"; }
            sleep 0.1
        done
    done
    {
        echo "POSTFIX_PORT=$PORT"
        echo "POSTFIX_LIMITED_PORT=$LIMITED_PORT"
        echo "POSTFIX_TLS_PORT=$TLS_PORT"
        echo "POSTFIX_CA=$BASE/certs/ca.pem"
        echo "POSTFIX_MAILLOG=$BASE/maillog"
        echo "POSTFIX_RECIPIENT_LIMIT=$RECIPIENT_LIMIT"
        echo "POSTFIX_MESSAGE_RATE_LIMIT=$MESSAGE_RATE_LIMIT"
        echo "POSTFIX_CONNECTION_RATE_LIMIT=$CONNECTION_RATE_LIMIT"
        echo "POSTFIX_RATE_TIME_UNIT=$RATE_TIME_UNIT"
    } >"$ENV_FILE"
    log "$(/usr/sbin/postconf -c "$CONF" -h mail_version) up on 127.0.0.1:$PORT, :$LIMITED_PORT (rate limited) and :$TLS_PORT (TLS required); environment in $ENV_FILE"
}

cmd_down() {
    if [[ -f $CONF/main.cf ]] && running; then /usr/sbin/postfix -c "$CONF" stop >/dev/null 2>&1 || true; fi
    rm -f "$ENV_FILE"
}

cmd_status() {
    if [[ -f $CONF/main.cf ]] && running; then echo "postfix running ($CONF)"; else echo "postfix stopped"; fi
}

case ${1:-} in
    install) cmd_install ;;
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
