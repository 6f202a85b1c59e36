#!/usr/bin/env python3
"""SMTP sink for mailsender tests (aiosmtpd): records what it receives and behaves like a strict relay
(Postfix, SES, Gmail) rather than a permissive sink. Run it with the stack venv's python:

    $MAILSENDER_CACHE/venv/bin/python scripts/smtp_sink.py --host 127.0.0.1 --port 0 \\
        --port-file F --out FILE.jsonl [--control CONTROL.json] [--transcript WIRE.jsonl] \\
        [--tls-cert CERT.pem --tls-key KEY.pem --tls-mode none|starttls|implicit] \\
        [--auth [--auth-user U --auth-password P] [--auth-required]]

FLAGS
  --host H, --port N    listen address (default 127.0.0.1, port 0 = any free port)
  --port-file F         once listening, the real port is written there (atomically: temp file + rename)
  --out FILE            JSON lines, one per recorded message (appended, flushed at once); see RECORDS
  --control C           JSON control file; see CONTROL KEYS. Missing, empty or invalid file = defaults
  --transcript FILE     JSON lines, one per line on the wire (appended, flushed at once); see TRANSCRIPT
  --tls-mode M          none (default) | starttls (offers STARTTLS) | implicit (TLS from the first byte,
                        SMTPS); starttls/implicit need --tls-cert and --tls-key (PEM files)
  --auth                offer AUTH PLAIN and LOGIN, only over TLS (after STARTTLS, or implicit TLS), like
                        real relays. Any credentials are accepted unless --auth-user/--auth-password are
                        given. Replies: "235 2.7.0 Authentication successful";
                        "535 5.7.8 Authentication credentials invalid" (wrong credentials);
                        "538 5.7.11 Encryption required for requested authentication mechanism" (plain
                        text); "503 Already authenticated"; "504 5.5.4 Unrecognized authentication type".
                        Without --auth, AUTH is never advertised and gets "503 5.5.1 Error: authentication
                        not enabled".
  --auth-user U, --auth-password P
                        the only credentials accepted (either one implies --auth; a missing one = "")
  --auth-required       MAIL before a successful AUTH gets "530 5.7.0 Authentication required" (implies --auth)
  --auth-plaintext      also offer and accept AUTH without TLS, as a careless relay or a man in the middle that
                        stripped STARTTLS to harvest passwords would (implies --auth)
  --hostname NAME       name in the banner and the EHLO reply (default smtp-sink.localhost)
  --max-size N          max message octets, advertised as SIZE N (default 64 MiB; 0 = no limit, no SIZE)
  --idle-timeout S      default of control key idle_timeout_s (default 300)
  --backlog N           listen backlog (default 1024)
  --no-pipelining       do not advertise PIPELINING (pipelined input is still processed in order)
  -v, --verbose         log every SMTP command to stderr
  SIGTERM/SIGINT stop it cleanly (exit 0).

EHLO REPLY, in this order, minus the keywords of control key ehlo_drop:
  250-<hostname>, SIZE <max-size>, 8BITMIME, SMTPUTF8, STARTTLS (starttls mode, before TLS only),
  AUTH LOGIN PLAIN (--auth, over TLS only), PIPELINING (unless --no-pipelining), 250 HELP.
  The banner is "220 <hostname> smtp_sink".

CONTROL KEYS: the file is re-read whenever a key is needed: at connect, EHLO, MAIL, RCPT, the end of a body
(and after data_delay_s), and every 50 ms for idle_timeout_s (it is tiny; tests may rewrite it at any
moment, preferably by rename). A missing key = the default behaviour. "reply" = a full reply line such as
"550 5.1.1 no such user"; a reply starting with 2 is positive.
  greeting        reply   sent instead of the 220 banner; then the connection is closed
  mail_reply      reply   reply to MAIL FROM (2xx opens the transaction; otherwise refused); default "250 OK"
  rcpt_replies    {addr: reply}  reply to RCPT TO for those addresses (case-insensitive); 2xx accepts;
                          others get "250 OK"
  max_recipients  int     within one transaction, once that many recipients are accepted, every further
                          RCPT gets cap_reply and is not added. Refused RCPTs do not count (as in Postfix):
                          with no other refusals, RCPT number max_recipients+1 and later are refused.
  cap_reply       reply   default "452 4.5.3 Too many recipients" (e.g. "552 5.5.3 Too many recipients")
  data_reply      reply   final reply after the body instead of "250 OK"; the message is recorded only if 2xx
  data_delay_s    float   sleep before the final reply to the body (the reply is decided after it)
  data_start_delay_s float sleep before the 354 reply to DATA (a slow relay at the start of the data phase)
  throttle_reply  reply   default "454 4.7.0 Throttling failure: Maximum sending rate exceeded"
  throttle_until  float   unix time; a MAIL FROM received before it gets throttle_reply (no transaction)
  max_rate_per_s  int     SES-like rate cap: a MAIL FROM gets throttle_reply if accepting it would make more
                          than this many messages recorded (by all connections) within the last 1.0 s
  throttle_at     "mail" | "data"   where throttle_until and max_rate_per_s act (default "mail"). With
                          "data", MAIL is accepted and the final reply to the body is throttle_reply (the
                          message is NOT recorded) if the body ends before throttle_until or the rate cap
                          is hit; checked after data_delay_s, before data_reply.
  idle_timeout_s  float   a connection that has been waiting for client input (a command, an AUTH line or a
                          body line) that long gets "421 4.4.2 Idle timeout, closing connection" and is
                          closed. Checked every 50 ms against the current value, so a change applies to
                          open connections at once. Time spent in the server (data_delay_s, TLS handshake)
                          does not count. Default --idle-timeout; <= 0 disables.
  ehlo_drop       [str]   EHLO keywords left out of the EHLO reply (case-insensitive), e.g. ["STARTTLS"],
                          ["SMTPUTF8"], ["PIPELINING"], ["8BITMIME"], ["SIZE"], ["AUTH"]. Read at each EHLO;
                          the set of the session's last EHLO governs the session:
                            STARTTLS dropped: STARTTLS gets "502 5.5.1 Command not implemented"
                            AUTH dropped:     AUTH gets "502 5.5.1 Command not implemented"
                            8BITMIME dropped: MAIL with BODY=8BITMIME gets
                                              "555 5.5.4 Unsupported option: BODY=8BITMIME"
  When SMTPUTF8 was not advertised in the session (dropped by ehlo_drop, or HELO instead of EHLO): MAIL with
  the SMTPUTF8 parameter gets "555 5.5.4 SMTPUTF8 not supported"; MAIL or RCPT with a non-ASCII address
  gets "553 5.6.7 non-ASCII address without SMTPUTF8". Otherwise non-ASCII addresses are accepted.

SESSION RULES (fixed, Postfix-like)
  MAIL while a transaction is open (accepted MAIL, no final reply to a body, no RSET/EHLO/HELO/STARTTLS since):
      "503 5.5.1 Error: nested MAIL command"; the open transaction stays open.
  MAIL or RCPT or DATA before HELO/EHLO: "503 Error: send HELO first". RCPT without MAIL: "503 Error: need MAIL
  command". DATA without MAIL: "503 5.5.1 Error: need MAIL command". DATA with no accepted recipient:
  "554 5.5.1 Error: no valid recipients" and, as in Postfix, the transaction stays open until RSET (also
  when pipelined: MAIL, RCPTs, DATA in one write are answered in order). DATA: "354 End data with <CR><LF>.<CR><LF>".
  RSET: "250 OK" (ends the transaction). NOOP: "250 OK". QUIT: "221 Bye", then close.
  A body line longer than 1001 octets with CRLF: "500 Line too long (see RFC5321 4.5.3.1.6)"; a body over
  --max-size: "552 Error: Too much mail data"; neither is recorded. MAIL FROM:<> is refused (501, aiosmtpd).
  The transaction ends with the final reply to the body, whatever it is.

RECORDS (--out): one JSON object per recorded message (final reply 2xx):
  ts            unix float: when the final reply to the body was decided (after data_delay_s, if any)
  eod_ts        unix float: when the end of data (the final ".") was received, before data_delay_s
  mail_from     str; rcpt_tos [str]: accepted recipients, in order (invalid utf-8 bytes become U+FFFD)
  headers       [[name, value], ...] in order, values as on the wire (after "Name:" and its leading
                blanks), unfolded (CRLF before a blank removed)
  raw           the message as received (CRLF line ends, dot-unstuffed), utf-8 decoded with errors=replace
  raw_b64       base64 of the exact message octets as received, after dot-unstuffing (byte-exact raw)
  tls           bool: the message came over TLS (STARTTLS or implicit)
  mail_options  [str]: MAIL FROM parameters, upper-cased (e.g. ["BODY=8BITMIME", "SMTPUTF8", "SIZE=123"])
  rcpt_options  [[str]]: parallel to rcpt_tos, each recipient's RCPT TO parameters upper-cased (aiosmtpd
                refuses every RCPT parameter with 555, so in practice [[], ...])
  max_line      int: longest body line in octets, excluding CRLF, before dot-unstuffing
  conn          int: connection number (from 1, in order of acceptance, same numbers as the transcript)
  tx            int: transaction number within the connection (from 1; counts every accepted MAIL FROM,
                including transactions that ended without a recorded message)
  auth_user     str or null: the login of a successful AUTH on that connection
  Nothing is written to --out for connections themselves; use the transcript.

TRANSCRIPT (--transcript): one JSON object per line, flushed at once, in wire order (client lines when read,
so pipelined commands appear in the order received, each followed by its reply):
  {"ts": unix float, "conn": int, "dir": "c" | "s", "line": str, "tls": bool}
  dir "c" = received from the client, "s" = reply sent by the server (each line of a multi-line reply
  separately). line is without CRLF, utf-8 decoded with errors=replace. tls = the line went over TLS.
  A message body is ONE entry: {"dir": "c", "line": "<body>", "bytes": N, "max_line": M} where N = octets
  of the body before dot-unstuffing including CRLFs, excluding the final ".\\r\\n" (which is not logged), and M
  = its longest line in octets excluding CRLF, before dot-unstuffing; it is written when the final "." is
  read (before the final reply), or with "aborted": true if the connection ended inside the body. It is
  also written for bodies then refused (too long, data_reply, throttling).
  AUTH: "AUTH PLAIN <creds>" is logged as "AUTH PLAIN ***", and every client line sent in answer to a 334
  challenge as "***". The greeting/banner, 421 idle-timeout and every other reply are logged as "s".
"""
import argparse
import asyncio
import base64
import collections
import json
import logging
import os
import re
import resource
import signal
import ssl
import sys
import tempfile
import time
from email.parser import HeaderParser
from email.policy import compat32

from aiosmtpd.smtp import SMTP, AuthResult

log = logging.getLogger("smtp_sink")
_UNFOLD = re.compile(r"\r?\n(?=[ \t])")

DEFAULT_CAP_REPLY = "452 4.5.3 Too many recipients"
DEFAULT_THROTTLE_REPLY = "454 4.7.0 Throttling failure: Maximum sending rate exceeded"
IDLE_REPLY = "421 4.4.2 Idle timeout, closing connection"
NOT_IMPLEMENTED = "502 5.5.1 Command not implemented"
IDLE_TICK_S = 0.05


class Control:
    """Reads the control file fresh every time it is asked (it is tiny; tests may rewrite it at any moment)."""

    def __init__(self, path):
        self.path = path
        self._last_error = None

    def get(self):
        if not self.path:
            return {}
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return {}
        except OSError as e:
            self._warn(f"cannot read control file {self.path}: {e}")
            return {}
        if not data.strip():
            return {}  # being rewritten (truncated) right now, or empty: defaults
        try:
            ctl = json.loads(data)
        except ValueError as e:
            self._warn(f"control file {self.path} is not valid JSON ({e}); using defaults")
            return {}
        if not isinstance(ctl, dict):
            self._warn(f"control file {self.path} is not a JSON object; using defaults")
            return {}
        self._last_error = None
        return ctl

    def _warn(self, msg):
        if msg != self._last_error:
            log.warning("%s", msg)
            self._last_error = msg


def is_positive(reply):
    return str(reply).lstrip().startswith("2")


def num(value, kind=float):
    """A control value as a number, or None when missing or not a number."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return kind(value)
    except (TypeError, ValueError):
        return None


def clean(s):
    """Addresses arrive utf-8 decoded with surrogateescape; make them encodable (invalid bytes -> U+FFFD)."""
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace") if s is not None else None


def parse_headers(raw):
    msg = HeaderParser(policy=compat32).parsestr(raw, headersonly=True)
    return [[name, _UNFOLD.sub("", value)] for name, value in msg.raw_items()]


def strip_eol(line):
    if line.endswith(b"\r\n"):
        return line[:-2]
    if line.endswith(b"\n"):
        return line[:-1]
    return line


class Recorder:
    def __init__(self, path):
        # Line-per-message append; one write() per line so concurrent readers see whole lines.
        self.f = open(path, "a", encoding="utf-8", buffering=1024 * 1024)
        self.count = 0
        self._recent = collections.deque()  # time.monotonic() of recent records, for max_rate_per_s

    def record(self, rec):
        self.f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.f.flush()
        self.count += 1
        self._recent.append(time.monotonic())

    def recent(self, window=1.0):
        """How many messages were recorded within the last `window` seconds."""
        cutoff = time.monotonic() - window
        while self._recent and self._recent[0] < cutoff:
            self._recent.popleft()
        return len(self._recent)

    def close(self):
        try:
            self.f.close()
        except Exception:
            pass


class Transcript:
    def __init__(self, path):
        self.f = open(path, "a", encoding="utf-8") if path else None

    def write(self, conn, direction, line, tls, **extra):
        if self.f is None:
            return
        rec = {"ts": time.time(), "conn": conn, "dir": direction, "line": line, "tls": tls}
        rec.update(extra)
        self.f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.f.flush()

    def close(self):
        if self.f is not None:
            try:
                self.f.close()
            except Exception:
                pass


class State:
    """What all connections share."""

    def __init__(self, args, control, recorder, transcript):
        self.args = args
        self.control = control
        self.recorder = recorder
        self.transcript = transcript
        self.conn_seq = 0
        self.conns = set()

    def idle_timeout(self):
        value = num(self.control.get().get("idle_timeout_s"))
        return self.args.idle_timeout if value is None else value


class Handler:
    def __init__(self, control, recorder, pipelining=True, auth=False, auth_plaintext=False):
        self.control = control
        self.recorder = recorder
        self.pipelining = pipelining
        self.auth = auth
        self.auth_plaintext = auth_plaintext

    def throttled(self, ctl, where):
        """throttle_reply if throttling applies at `where` ("mail" or "data") right now, else None."""
        at = "data" if str(ctl.get("throttle_at") or "mail").lower() == "data" else "mail"
        if at != where:
            return None
        reply = str(ctl.get("throttle_reply") or DEFAULT_THROTTLE_REPLY)
        until = num(ctl.get("throttle_until"))
        if until is not None and time.time() < until:
            return reply
        rate = num(ctl.get("max_rate_per_s"), int)
        if rate is not None and self.recorder.recent(1.0) + 1 > rate:
            return reply
        return None

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        # aiosmtpd handles pipelined commands (it reads them in order from its stream) but does
        # not say so; real MTAs do, and clients only pipeline when told.
        session.host_name = hostname
        drop = server.control.get().get("ehlo_drop") or []
        if isinstance(drop, str):
            drop = [drop]
        drop = {str(k).strip().upper() for k in drop} if isinstance(drop, list) else set()
        first, keywords = responses[0][4:], [r[4:] for r in responses[1:]]
        out = []
        for kw in keywords:
            if kw.upper().startswith("AUTH"):
                # aiosmtpd offers AUTH everywhere (auth_require_tls=False, see SinkSMTP.smtp_AUTH); we do not.
                if not (self.auth and (server.is_tls() or self.auth_plaintext)):
                    continue
            if kw == "HELP" and self.pipelining:
                out.append("PIPELINING")
            out.append(kw)
        out = [kw for kw in out if kw.split()[0].upper() not in drop]
        server.advertised = {kw.split()[0].upper() for kw in out}
        server.dropped = drop
        lines = [first] + out
        return [("250 " if i == len(lines) - 1 else "250-") + line for i, line in enumerate(lines)]

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        ctl = self.control.get()
        throttle = self.throttled(ctl, "mail")
        if throttle:
            return throttle
        reply = ctl.get("mail_reply")
        if reply and not is_positive(reply):
            return str(reply)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        server.tx_no += 1
        return str(reply) if reply else "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        ctl = self.control.get()
        cap = num(ctl.get("max_recipients"), int)
        if cap is not None and len(envelope.rcpt_tos) >= cap:
            return str(ctl.get("cap_reply") or DEFAULT_CAP_REPLY)
        replies = ctl.get("rcpt_replies") or {}
        reply = None
        if isinstance(replies, dict) and replies:
            wanted = address.lower()
            for addr, r in replies.items():
                if str(addr).lower() == wanted:
                    reply = str(r)
                    break
        if reply and not is_positive(reply):
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.append(list(rcpt_options))  # one list per recipient (see RECORDS)
        return reply or "250 OK"

    async def handle_DATA(self, server, session, envelope):
        eod_ts = time.time()  # the end of data, as a relay counts a message (before data_delay_s)
        ctl = self.control.get()
        delay = num(ctl.get("data_delay_s"))
        if delay:
            await asyncio.sleep(delay)
            ctl = self.control.get()  # the reply is decided after the delay
        throttle = self.throttled(ctl, "data")
        if throttle:
            return throttle
        reply = ctl.get("data_reply")
        if reply and not is_positive(reply):
            return str(reply)
        content = envelope.original_content or b""
        raw = content.decode("utf-8", errors="replace")
        auth_user = None
        if session.authenticated and session.auth_data is not None:
            login = getattr(session.auth_data, "login", None)
            if isinstance(login, bytes):
                auth_user = login.decode("utf-8", "replace")
        self.recorder.record({
            "ts": time.time(),
            "eod_ts": eod_ts,
            "mail_from": clean(envelope.mail_from),
            "rcpt_tos": [clean(r) for r in envelope.rcpt_tos],
            "headers": parse_headers(raw),
            "raw": raw,
            "tls": server.is_tls(),
            "mail_options": list(envelope.mail_options),
            "rcpt_options": [list(o) for o in envelope.rcpt_options],
            "max_line": getattr(envelope, "max_line", None),
            "raw_b64": base64.b64encode(content).decode("ascii"),
            "conn": server.conn_no,
            "tx": server.tx_no,
            "auth_user": auth_user,
        })
        return str(reply) if reply else "250 OK"


class _NoTimer:
    def cancel(self):
        pass


_NO_TIMER = _NoTimer()


class SinkSMTP(SMTP):
    def __init__(self, handler, state, **kw):
        super().__init__(handler, **kw)
        self.state = state
        self.control = state.control
        self.conn_no = None
        self.tx_no = 0
        self.advertised = set()  # EHLO keywords of the session's last EHLO (upper-case)
        self.dropped = set()  # ehlo_drop in force at the session's last EHLO
        self.waiting = False  # waiting for client input (for the idle timeout)
        self.last_activity = self.loop.time()
        self._closing = False
        self._in_auth = False
        self._partial = b""
        self._raw_readuntil = None
        self._raw_read = None

    # --- connection bookkeeping, wire tap, idle timeout -------------------------------------------------

    def connection_made(self, transport):
        if self.conn_no is None:
            self.state.conn_seq += 1
            self.conn_no = self.state.conn_seq
            self.state.conns.add(self)
        # A new session (also after STARTTLS, RFC 3207 4.2): nothing advertised yet.
        self.advertised = set()
        self.dropped = set()
        super().connection_made(transport)

    def connection_lost(self, error):
        self.state.conns.discard(self)
        super().connection_lost(error)

    def _cb_client_connected(self, reader, writer):
        super()._cb_client_connected(reader, writer)
        # aiosmtpd reads commands with reader.readuntil() (and AUTH answers with readline(), which calls
        # readuntil()); tap them to log each line as it is read. The body is read in smtp_DATA below.
        self._raw_readuntil = reader.readuntil
        self._raw_read = reader.read
        reader.readuntil = self._tap_readuntil
        reader.read = self._tap_read

    def _reset_timeout(self, duration=None):
        # aiosmtpd's own timer is replaced by State's idle ticker (see idle_ticker()).
        self._timeout_handle = _NO_TIMER
        self.last_activity = self.loop.time()

    async def _waiting_for(self, read):
        """Awaits a read from the client; meanwhile the connection counts as waiting (idle timeout)."""
        self.waiting = True
        self.last_activity = self.loop.time()
        try:
            return await read
        finally:
            self.waiting = False
            self.last_activity = self.loop.time()

    async def _tap_readuntil(self, separator=b"\n"):
        line = await self._waiting_for(self._raw_readuntil(separator))
        if self._partial:
            line, self._partial = self._partial + line, b""
        self._log_client(strip_eol(line))
        return line

    async def _tap_read(self, n=-1):
        # Only used by aiosmtpd to drain an over-long command line: keep (the start of) it for the log.
        data = await self._waiting_for(self._raw_read(n))
        if len(self._partial) < 65536:
            self._partial += data
        return data

    def is_tls(self):
        t = self.transport
        return bool(t is not None and t.get_extra_info("ssl_object") is not None)

    def _log(self, direction, line, **extra):
        self.state.transcript.write(self.conn_no, direction, line, self.is_tls(), **extra)

    def _log_client(self, line):
        if self._in_auth:
            line = b"***"
        elif line[:5].upper() == b"AUTH ":
            parts = line.split(None, 2)
            if len(parts) > 2:
                line = parts[0] + b" " + parts[1] + b" ***"
        self._log("c", line.decode("utf-8", "replace"))

    async def push(self, status):
        text = status if isinstance(status, str) else status.decode("utf-8", "replace")
        self._log("s", text)
        await super().push(status)

    def idle_close(self):
        if self._closing or self.transport is None:
            return
        self._closing = True
        log.info("connection %d idle, closing", self.conn_no)
        self._log("s", IDLE_REPLY)
        try:
            self.transport.write(IDLE_REPLY.encode() + b"\r\n")
        except Exception:
            pass
        self.transport.close()

    # --- commands ---------------------------------------------------------------------------------------

    async def _handle_client(self):
        greeting = self.control.get().get("greeting")
        if greeting:
            try:
                await self.push(str(greeting))
            finally:
                if self.transport is not None:
                    self.transport.close()
            return
        await super()._handle_client()

    async def smtp_HELO(self, hostname):
        self.advertised = set()
        self.dropped = set()
        await super().smtp_HELO(hostname)

    async def _need_auth(self):
        if self.state.args.auth_required and not self.session.authenticated:
            await self.push("530 5.7.0 Authentication required")
            return True
        return False

    def _open(self):
        """A transaction is open (an accepted MAIL FROM and no end since)."""
        return self.envelope is not None and self.envelope.mail_from is not None

    async def smtp_MAIL(self, arg):
        if await self.check_helo_needed():
            return
        if await self._need_auth():
            return
        if self._open():
            await self.push("503 5.5.1 Error: nested MAIL command")
            return
        rest = self._strip_command_keyword("FROM:", arg) if arg else None
        if rest is not None:
            _, params = self._getaddr(rest)
            params = (params or "").upper().split()
            if "SMTPUTF8" not in self.advertised:
                if any(p == "SMTPUTF8" or p.startswith("SMTPUTF8=") for p in params):
                    await self.push("555 5.5.4 SMTPUTF8 not supported")
                    return
                if not rest.isascii():
                    await self.push("553 5.6.7 non-ASCII address without SMTPUTF8")
                    return
            if "8BITMIME" in self.dropped and "BODY=8BITMIME" in params:
                await self.push("555 5.5.4 Unsupported option: BODY=8BITMIME")
                return
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg):
        if self.session.host_name and self._open() and arg and "SMTPUTF8" not in self.advertised:
            rest = self._strip_command_keyword("TO:", arg)
            if rest is not None and not rest.isascii():
                await self.push("553 5.6.7 non-ASCII address without SMTPUTF8")
                return
        await super().smtp_RCPT(arg)

    async def smtp_STARTTLS(self, arg):
        if "STARTTLS" in self.dropped:
            await self.push(NOT_IMPLEMENTED)
            return
        await super().smtp_STARTTLS(arg)

    async def smtp_AUTH(self, arg):
        if "AUTH" in self.dropped:
            await self.push(NOT_IMPLEMENTED)
            return
        if not self.state.args.auth:
            await self.push("503 5.5.1 Error: authentication not enabled")
            return
        if (self.session.host_name and self.session.extended_smtp and not self.is_tls()
                and not self.state.args.auth_plaintext):
            await self.push("538 5.7.11 Encryption required for requested authentication mechanism")
            return
        self._in_auth = True
        try:
            await super().smtp_AUTH(arg)
        finally:
            self._in_auth = False

    async def smtp_DATA(self, arg):
        # aiosmtpd's DATA, with Postfix's replies for a missing transaction, the line statistics and the
        # body's transcript entry.
        if await self.check_helo_needed():
            return
        if await self._need_auth():
            return
        if not self._open():
            await self.push("503 5.5.1 Error: need MAIL command")
            return
        if not self.envelope.rcpt_tos:
            # Like Postfix: the refusal does not end the transaction, so a client that goes on with
            # MAIL without RSET gets "503 nested MAIL command".
            await self.push("554 5.5.1 Error: no valid recipients")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        start_delay = num(self.control.get().get("data_start_delay_s"))
        if start_delay:
            await asyncio.sleep(start_delay)
        await self.push("354 End data with <CR><LF>.<CR><LF>")

        data = []
        num_bytes = 0
        max_line = 0
        limit = self.data_size_limit
        fragments = []
        too_long = too_much = False
        ended = False
        self.waiting = True
        try:
            while self.transport is not None:
                try:
                    line = await self._raw_readuntil(b"\r\n")
                except asyncio.LimitOverrunError as e:
                    # Longer than the stream limit (line_length_limit): note it, drain it.
                    too_long = too_long or not too_much
                    data.clear()
                    line = await self._raw_read(e.consumed)
                self.last_activity = self.loop.time()
                if not fragments and line == b".\r\n":
                    ended = True
                    break
                num_bytes += len(line)
                if not (too_long or too_much) and limit and num_bytes > limit:
                    too_much = True
                    data.clear()
                fragments.append(line)
                if line.endswith(b"\r\n"):
                    whole = b"".join(fragments) if len(fragments) > 1 else line
                    fragments.clear()
                    max_line = max(max_line, len(whole) - 2)
                    if not (too_long or too_much):
                        if len(whole) > self.line_length_limit:
                            too_long = True
                            data.clear()
                        else:
                            data.append(whole)
        except asyncio.CancelledError:
            self._log("c", "<body>", bytes=num_bytes, max_line=max_line, aborted=True)
            self._writer.close()
            raise
        finally:
            self.waiting = False
        if not ended:
            self._log("c", "<body>", bytes=num_bytes, max_line=max_line, aborted=True)
            return
        self._log("c", "<body>", bytes=num_bytes, max_line=max_line)

        if too_long or too_much:
            await self.push("500 Line too long (see RFC5321 4.5.3.1.6)" if too_long
                            else "552 Error: Too much mail data")
            self._set_post_data_state()
            return

        content = b"".join(d[1:] if d.startswith(b".") else d for d in data)
        data.clear()
        self.envelope.content = content
        self.envelope.original_content = content
        self.envelope.max_line = max_line
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push("250 OK" if status is None or not isinstance(status, str) else status)


def write_port_file(path, port):
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".port.", dir=d)
    with os.fdopen(fd, "w") as f:
        f.write(f"{port}\n")
    os.replace(tmp, path)


def raise_nofile_limit():
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))
    except (ValueError, OSError):
        pass


def make_authenticator(user, password):
    def authenticator(server, session, envelope, mechanism, auth_data):
        ok = True
        if user is not None or password is not None:
            login = getattr(auth_data, "login", None)
            secret = getattr(auth_data, "password", None)
            ok = login == (user or "").encode() and secret == (password or "").encode()
        return AuthResult(success=ok, handled=False, auth_data=auth_data)
    return authenticator


async def idle_ticker(state):
    """Closes connections that have waited for client input longer than idle_timeout_s."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(IDLE_TICK_S)
        if not state.conns:
            continue
        idle = state.idle_timeout()
        if idle is None or idle <= 0:
            continue
        now = loop.time()
        for conn in list(state.conns):
            if conn.waiting and now - conn.last_activity >= idle:
                conn.idle_close()


async def main_async(args):
    control = Control(args.control)
    recorder = Recorder(args.out)
    transcript = Transcript(args.transcript)
    state = State(args, control, recorder, transcript)
    handler = Handler(control, recorder, pipelining=not args.no_pipelining, auth=args.auth,
                      auth_plaintext=args.auth_plaintext)

    ssl_ctx = None
    if args.tls_mode != "none":
        if not (args.tls_cert and args.tls_key):
            raise SystemExit("--tls-mode starttls|implicit needs --tls-cert and --tls-key")
        ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_ctx.load_cert_chain(args.tls_cert, args.tls_key)

    loop = asyncio.get_running_loop()
    authenticator = make_authenticator(args.auth_user, args.auth_password)

    def factory():
        return SinkSMTP(
            handler,
            state,
            hostname=args.hostname,
            ident="smtp_sink",
            data_size_limit=args.max_size or None,
            enable_SMTPUTF8=True,
            decode_data=False,
            tls_context=ssl_ctx if args.tls_mode == "starttls" else None,
            require_starttls=False,
            timeout=args.idle_timeout if args.idle_timeout > 0 else 300.0,
            authenticator=authenticator,
            # The TLS requirement is enforced in SinkSMTP.smtp_AUTH (aiosmtpd's own check does not know
            # implicit TLS).
            auth_require_tls=False,
            loop=loop,
        )

    server = await loop.create_server(
        factory,
        host=args.host,
        port=args.port,
        ssl=ssl_ctx if args.tls_mode == "implicit" else None,
        backlog=args.backlog,
        reuse_address=True,
    )
    port = server.sockets[0].getsockname()[1]
    if args.port_file:
        write_port_file(args.port_file, port)
    log.info("listening on %s:%d (tls-mode %s), writing to %s", args.host, port, args.tls_mode, args.out)

    ticker = loop.create_task(idle_ticker(state))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping after %d messages", recorder.count)
    ticker.cancel()
    server.close()
    recorder.close()
    transcript.close()


class _DropDeprecation(logging.Filter):
    def filter(self, record):
        return "login_data is deprecated" not in record.getMessage()


def main():
    p = argparse.ArgumentParser(description="SMTP sink for tests (aiosmtpd); see module docstring.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = any free port (see --port-file)")
    p.add_argument("--port-file", help="file that receives the real port once listening")
    p.add_argument("--out", required=True, help="JSON-lines file, one line per accepted message (appended)")
    p.add_argument("--control", help="JSON control file, re-read on every command")
    p.add_argument("--transcript", help="JSON-lines file, one line per line on the wire (appended)")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--tls-mode", choices=["none", "starttls", "implicit"], default="none")
    p.add_argument("--auth", action="store_true", help="offer AUTH PLAIN/LOGIN over TLS (any credentials)")
    p.add_argument("--auth-user", help="the only accepted AUTH login (implies --auth)")
    p.add_argument("--auth-password", help="the only accepted AUTH password (implies --auth)")
    p.add_argument("--auth-required", action="store_true", help="refuse MAIL before a successful AUTH (530)")
    p.add_argument("--auth-plaintext", action="store_true",
                   help="also offer and accept AUTH without TLS, as a careless relay or a man in the middle "
                        "harvesting passwords does (implies --auth)")
    p.add_argument("--hostname", default="smtp-sink.localhost", help="name in the banner and EHLO reply")
    p.add_argument("--max-size", type=int, default=64 * 1024 * 1024, help="max message bytes (0 = no limit)")
    p.add_argument("--idle-timeout", type=float, default=300.0,
                   help="close connections idle this many s (default of control idle_timeout_s)")
    p.add_argument("--backlog", type=int, default=1024)
    p.add_argument("--no-pipelining", action="store_true", help="do not advertise PIPELINING (RFC 2920)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every SMTP command to stderr")
    args = p.parse_args()
    if args.auth_user is not None or args.auth_password is not None or args.auth_required or args.auth_plaintext:
        args.auth = True

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s smtp_sink %(levelname)s %(message)s")
    mail_log = logging.getLogger("mail.log")
    mail_log.setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    mail_log.addFilter(_DropDeprecation())
    raise_nofile_limit()
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
