#!/usr/bin/env python3
"""Counting TCP proxy for the mailsender benchmark (round trips per letter, figure 3).

    proxy.py --mode mongo|smtp|kafka --listen-port 0 --upstream HOST:PORT --port-file F --stats F

Forwards bytes unchanged in both directions and counts the requests the client sends:
  mongo  one count per wire-protocol message (OP_MSG and legacy opcodes), keyed by the command name
         (the first field of the OP_MSG body: insert, find, update, getMore, hello, ...)
  smtp   one count per command line (EHLO, MAIL, RCPT, DATA, RSET, NOOP, QUIT, ...) plus one "<EOD>" per
         message body ended by CRLF.CRLF: every one of these waits for a server reply (no PIPELINING)
  kafka  one count per request frame, keyed by "client.id/ApiName" (the client id is in every request header)
Round trips are counted apart from commands, as "turns": on each connection, every time the client sends after
the server has sent (or first), one turn begins. A pipelined SMTP client (MAIL, RCPTs and DATA in one write)
thus makes two turns per message whatever its command count; a lock-step one makes one turn per command.

On SIGUSR1 the counts are written to --stats (atomically) as
{"seq": n, "counts": {...}, "turns": n, "connections": n}; also on SIGTERM/SIGINT, before exiting.
"""
import argparse
import asyncio
import json
import os
import signal
import socket
import struct
import tempfile
from collections import Counter

KAFKA_APIS = {
    0: "Produce", 1: "Fetch", 2: "ListOffsets", 3: "Metadata", 8: "OffsetCommit", 9: "OffsetFetch",
    10: "FindCoordinator", 11: "JoinGroup", 12: "Heartbeat", 13: "LeaveGroup", 14: "SyncGroup",
    15: "DescribeGroups", 16: "ListGroups", 17: "SaslHandshake", 18: "ApiVersions", 19: "CreateTopics",
    20: "DeleteTopics", 22: "InitProducerId", 32: "DescribeConfigs", 36: "SaslAuthenticate",
    42: "DeleteGroups", 60: "DescribeCluster", 68: "ConsumerGroupHeartbeat", 71: "GetTelemetrySubscriptions",
    72: "PushTelemetry",
}

MONGO_OPS = {2001: "OP_UPDATE", 2002: "OP_INSERT", 2004: "OP_QUERY", 2005: "OP_GET_MORE", 2006: "OP_DELETE",
             2007: "OP_KILL_CURSORS", 2012: "OP_COMPRESSED"}


class Counts:
    def __init__(self):
        self.counts = Counter()
        self.turns = 0
        self.connections = 0
        self.seq = 0


def mongo_counter(counts):
    """Returns feed(data) that counts complete MongoDB wire messages."""
    buf = bytearray()

    def feed(data):
        buf.extend(data)
        while len(buf) >= 16:
            length, _req, _resp, opcode = struct.unpack_from("<iiii", buf, 0)
            if length < 16 or len(buf) < length:
                break
            name = MONGO_OPS.get(opcode, f"op{opcode}")
            if opcode == 2013 and length >= 26:  # OP_MSG: flags, then sections; kind 0 = body document
                pos = 20
                if buf[pos] == 0:
                    # body BSON: int32 size, then the first element: type byte, cstring name
                    start = pos + 1 + 4 + 1
                    end = buf.find(b"\x00", start, length)
                    if end > start:
                        name = buf[start:end].decode("ascii", "replace")
            counts.counts[name] += 1
            del buf[:length]

    return feed


def smtp_counter(counts):
    buf = bytearray()
    state = {"data": False}

    def feed(data):
        buf.extend(data)
        while True:
            if state["data"]:
                # The body ends with CRLF . CRLF (an empty body is just ". CRLF").
                if buf.startswith(b".\r\n"):
                    end = 3
                else:
                    i = buf.find(b"\r\n.\r\n")
                    if i < 0:
                        # keep a tail that may hold the start of the terminator
                        if len(buf) > 4:
                            del buf[:-4]
                        return
                    end = i + 5
                counts.counts["<EOD>"] += 1
                del buf[:end]
                state["data"] = False
                continue
            i = buf.find(b"\r\n")
            if i < 0:
                return
            line = bytes(buf[:i])
            del buf[:i + 2]
            verb = line.split(b" ", 1)[0].split(b":", 1)[0].upper().decode("ascii", "replace") or "<empty>"
            counts.counts[verb] += 1
            if verb == "DATA":
                state["data"] = True

    return feed


def kafka_counter(counts):
    buf = bytearray()

    def feed(data):
        buf.extend(data)
        while len(buf) >= 4:
            (size,) = struct.unpack_from(">i", buf, 0)
            if len(buf) < 4 + size:
                break
            api_key, _ver, _corr, cid_len = struct.unpack_from(">hhih", buf, 4)
            client = buf[14:14 + cid_len].decode("utf-8", "replace") if cid_len > 0 else "-"
            counts.counts[f"{client}/{KAFKA_APIS.get(api_key, f'api{api_key}')}"] += 1
            del buf[:4 + size]

    return feed


COUNTERS = {"mongo": mongo_counter, "smtp": smtp_counter, "kafka": kafka_counter}


async def pump(reader, writer, feed, turn):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            turn(data)
            if feed is not None:
                feed(data)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError, asyncio.CancelledError):
        pass
    finally:
        try:
            if writer.can_write_eof():
                writer.write_eof()
        except (OSError, RuntimeError):
            pass


def nodelay(writer):
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


async def handle(client_reader, client_writer, args, counts):
    host, port = args.upstream.rsplit(":", 1)
    try:
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
    except OSError:
        client_writer.close()
        return
    counts.connections += 1
    nodelay(client_writer)
    nodelay(up_writer)
    feed = COUNTERS[args.mode](counts)
    last = {"from": "server"}

    def client_sent(_data):
        if last["from"] != "client":
            counts.turns += 1
            last["from"] = "client"

    def server_sent(_data):
        last["from"] = "server"

    await asyncio.gather(pump(client_reader, up_writer, feed, client_sent),
                         pump(up_reader, client_writer, None, server_sent))
    for w in (client_writer, up_writer):
        try:
            w.close()
        except OSError:
            pass


def dump(path, counts):
    counts.seq += 1
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".stats.", dir=d)
    with os.fdopen(fd, "w") as f:
        json.dump({"seq": counts.seq, "counts": dict(counts.counts), "turns": counts.turns,
                   "connections": counts.connections}, f)
    os.replace(tmp, path)


async def main_async(args):
    counts = Counts()
    server = await asyncio.start_server(lambda r, w: handle(r, w, args, counts), "127.0.0.1", args.listen_port,
                                        backlog=1024)
    port = server.sockets[0].getsockname()[1]
    d = os.path.dirname(os.path.abspath(args.port_file))
    fd, tmp = tempfile.mkstemp(prefix=".port.", dir=d)
    with os.fdopen(fd, "w") as f:
        f.write(f"{port}\n")
    os.replace(tmp, args.port_file)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, lambda: dump(args.stats, counts))
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    dump(args.stats, counts)
    server.close()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=sorted(COUNTERS), required=True)
    p.add_argument("--listen-port", type=int, default=0)
    p.add_argument("--upstream", required=True, help="HOST:PORT")
    p.add_argument("--port-file", required=True)
    p.add_argument("--stats", required=True)
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
