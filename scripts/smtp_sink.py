#!/usr/bin/env python3
"""SMTP sink for mailsender tests (aiosmtpd). Run it with the stack venv's python:

    $MAILSENDER_CACHE/venv/bin/python scripts/smtp_sink.py --host 127.0.0.1 --port 0 \\
        --port-file F --out FILE.jsonl [--control CONTROL.json] \\
        [--tls-cert CERT.pem --tls-key KEY.pem --tls-mode none|starttls|implicit]

* Listens on --host/--port (0 = any free port) and, once listening, writes the real port to --port-file
  (atomically: temp file + rename).
* Appends one JSON line per accepted message to --out (flushed at once):
    {"ts": unix float, "mail_from": str, "rcpt_tos": [str], "headers": [[name, value], ...],
     "raw": str, "tls": bool, "mail_options": [str]}
  headers: in order, values as on the wire (after "Name:" and its leading blanks), unfolded (CRLF before
  a blank removed). raw: the message as received (CRLF line ends, dot-unstuffed), utf-8 with errors=replace.
  ts: when the final reply to the message body was decided (after data_delay_s, if any).
* --control: JSON file, re-read at connect and at every MAIL/RCPT/DATA; missing file = defaults. Keys:
    rcpt_replies {addr: reply}  reply to RCPT TO for those addresses (case-insensitive); a 2xx reply accepts
    greeting     reply          sent instead of the 220 banner; then the connection is closed
    mail_reply   reply          reply to MAIL FROM (a 2xx reply accepts the sender)
    data_reply   reply          final reply after the body instead of 250; message recorded only if 2xx
    data_delay_s float          sleep before the final reply to the body
* --tls-mode starttls: offers STARTTLS; implicit: TLS from the first byte (SMTPS). 8BITMIME and SMTPUTF8 are
  always offered. SIGTERM/SIGINT stop it cleanly (exit 0).
"""
import argparse
import asyncio
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

from aiosmtpd.smtp import SMTP

log = logging.getLogger("smtp_sink")
_UNFOLD = re.compile(r"\r?\n(?=[ \t])")


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


def clean(s):
    """Addresses arrive utf-8 decoded with surrogateescape; make them encodable (invalid bytes -> U+FFFD)."""
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace") if s is not None else None


def parse_headers(raw):
    msg = HeaderParser(policy=compat32).parsestr(raw, headersonly=True)
    return [[name, _UNFOLD.sub("", value)] for name, value in msg.raw_items()]


class Recorder:
    def __init__(self, path):
        # Line-per-message append; one write() per line so concurrent readers see whole lines.
        self.f = open(path, "a", encoding="utf-8", buffering=1024 * 1024)
        self.count = 0

    def record(self, rec):
        self.f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.f.flush()
        self.count += 1

    def close(self):
        try:
            self.f.close()
        except Exception:
            pass


class Handler:
    def __init__(self, control, recorder, pipelining=True):
        self.control = control
        self.recorder = recorder
        self.pipelining = pipelining

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        # aiosmtpd handles pipelined commands (it reads them in order from its stream) but does
        # not say so; real MTAs do, and clients only pipeline when told.
        session.host_name = hostname
        if self.pipelining:
            responses.insert(len(responses) - 1, "250-PIPELINING")
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        reply = self.control.get().get("mail_reply")
        if reply and not is_positive(reply):
            return str(reply)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return str(reply) if reply else "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        replies = self.control.get().get("rcpt_replies") or {}
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
        envelope.rcpt_options.extend(rcpt_options)
        return reply or "250 OK"

    async def handle_DATA(self, server, session, envelope):
        ctl = self.control.get()
        delay = ctl.get("data_delay_s")
        if delay:
            await asyncio.sleep(float(delay))
            ctl = self.control.get()  # the reply is decided after the delay
        reply = ctl.get("data_reply")
        if reply and not is_positive(reply):
            return str(reply)
        content = envelope.original_content or b""
        raw = content.decode("utf-8", errors="replace")
        transport = server.transport
        tls = bool(transport is not None and transport.get_extra_info("ssl_object") is not None)
        self.recorder.record({
            "ts": time.time(),
            "mail_from": clean(envelope.mail_from),
            "rcpt_tos": [clean(r) for r in envelope.rcpt_tos],
            "headers": parse_headers(raw),
            "raw": raw,
            "tls": tls,
            "mail_options": list(envelope.mail_options),
        })
        return str(reply) if reply else "250 OK"


class SinkSMTP(SMTP):
    def __init__(self, handler, control, **kw):
        super().__init__(handler, **kw)
        self._control = control

    async def _handle_client(self):
        greeting = self._control.get().get("greeting")
        if greeting:
            try:
                await self.push(str(greeting))
            finally:
                if self.transport is not None:
                    self.transport.close()
            return
        await super()._handle_client()


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


async def main_async(args):
    control = Control(args.control)
    recorder = Recorder(args.out)
    handler = Handler(control, recorder, pipelining=not args.no_pipelining)

    ssl_ctx = None
    if args.tls_mode != "none":
        if not (args.tls_cert and args.tls_key):
            raise SystemExit("--tls-mode starttls|implicit needs --tls-cert and --tls-key")
        ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_ctx.load_cert_chain(args.tls_cert, args.tls_key)

    loop = asyncio.get_running_loop()

    def factory():
        return SinkSMTP(
            handler,
            control,
            hostname=args.hostname,
            ident="smtp_sink",
            data_size_limit=args.max_size or None,
            enable_SMTPUTF8=True,
            decode_data=False,
            tls_context=ssl_ctx if args.tls_mode == "starttls" else None,
            require_starttls=False,
            timeout=args.idle_timeout,
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

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping after %d messages", recorder.count)
    server.close()
    recorder.close()


def main():
    p = argparse.ArgumentParser(description="SMTP sink for tests (aiosmtpd); see module docstring.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = any free port (see --port-file)")
    p.add_argument("--port-file", help="file that receives the real port once listening")
    p.add_argument("--out", required=True, help="JSON-lines file, one line per accepted message (appended)")
    p.add_argument("--control", help="JSON control file, re-read on every command")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--tls-mode", choices=["none", "starttls", "implicit"], default="none")
    p.add_argument("--hostname", default="smtp-sink.localhost", help="name in the banner and EHLO reply")
    p.add_argument("--max-size", type=int, default=64 * 1024 * 1024, help="max message bytes (0 = no limit)")
    p.add_argument("--idle-timeout", type=float, default=300.0, help="close idle connections after this many s")
    p.add_argument("--backlog", type=int, default=1024)
    p.add_argument("--no-pipelining", action="store_true", help="do not advertise PIPELINING (RFC 2920)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every SMTP command to stderr")
    args = p.parse_args()

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s smtp_sink %(levelname)s %(message)s")
    logging.getLogger("mail.log").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    raise_nofile_limit()
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
