#!/usr/bin/env python3
"""Bare SMTP client: the ceiling of an SMTP sink on this machine (figure 1's reference).

    smtp_blast.py --port P --count N --concurrency C --message-file RAW.eml --rcpt a@x --rcpt b@x

C connections, each opened once (TCP_NODELAY) and reused, send N messages in total, each as one
transaction, the same dialogue mailsender has with the sink: MAIL FROM, one RCPT TO per recipient, DATA, the
message (dot-stuffed) and its final dot. When the server advertises PIPELINING (RFC 2920), MAIL, the RCPTs and
DATA go in one write and their replies are read together (two round trips per message), unless --lockstep.
Prints one JSON line: {"sent": n, "seconds": s, "per_second": r, "cpu_seconds": client CPU}.
"""
import argparse
import asyncio
import json
import socket
import time


async def read_reply(reader):
    """Reads one (possibly multi-line) reply; returns its code."""
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed by the server")
        if len(line) < 4 or line[3:4] != b"-":
            return int(line[:3])


async def expect(reader, ok):
    code = await read_reply(reader)
    if code not in ok:
        raise RuntimeError(f"unexpected SMTP reply {code}")


async def worker(args, body, state):
    reader, writer = await asyncio.open_connection("127.0.0.1", args.port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    await expect(reader, (220,))
    writer.write(b"EHLO bench.localhost\r\n")
    ehlo = []
    while True:
        line = await reader.readline()
        ehlo.append(line[4:].strip().upper())
        if len(line) < 4 or line[3:4] != b"-":
            break
    pipelining = b"PIPELINING" in ehlo and not args.lockstep
    state["pipelining"] = pipelining
    mail = f"MAIL FROM:<{args.mail_from}>\r\n".encode()
    rcpts = [f"RCPT TO:<{r}>\r\n".encode() for r in args.rcpt]
    envelope = mail + b"".join(rcpts) + b"DATA\r\n"
    while state["left"] > 0:
        state["left"] -= 1
        if pipelining:
            writer.write(envelope)
            await expect(reader, (250,))
            for _ in rcpts:
                await expect(reader, (250, 251))
            await expect(reader, (354,))
        else:
            writer.write(mail)
            await expect(reader, (250,))
            for r in rcpts:
                writer.write(r)
                await expect(reader, (250, 251))
            writer.write(b"DATA\r\n")
            await expect(reader, (354,))
        writer.write(body)
        await expect(reader, (250,))
        state["sent"] += 1
    writer.write(b"QUIT\r\n")
    try:
        await read_reply(reader)
    except (ConnectionError, ValueError):
        pass
    writer.close()


def stuffed(raw: bytes) -> bytes:
    """CRLF line ends, dot-stuffing, and the final dot line."""
    text = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if not text.endswith(b"\r\n"):
        text += b"\r\n"
    lines = text.split(b"\r\n")
    lines = [b"." + line if line.startswith(b".") else line for line in lines]
    return b"\r\n".join(lines) + b".\r\n"


async def main_async(args):
    with open(args.message_file, "rb") as f:
        body = stuffed(f.read())
    state = {"left": args.count, "sent": 0, "pipelining": False}
    cpu0 = time.process_time()
    t0 = time.monotonic()
    await asyncio.gather(*(worker(args, body, state) for _ in range(args.concurrency)))
    secs = time.monotonic() - t0
    print(json.dumps({
        "sent": state["sent"], "seconds": round(secs, 4),
        "per_second": round(state["sent"] / secs, 1) if secs > 0 else None,
        "cpu_seconds": round(time.process_time() - cpu0, 3), "message_bytes": len(body),
        "pipelining": state["pipelining"],
    }), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--count", type=int, default=10000)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--message-file", required=True)
    p.add_argument("--mail-from", default="mailsender@localhost")
    p.add_argument("--rcpt", action="append", default=[])
    p.add_argument("--lockstep", action="store_true", help="never pipeline, even when the server offers it")
    args = p.parse_args()
    if not args.rcpt:
        args.rcpt = ["a@example.com", "b@example.com"]
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
