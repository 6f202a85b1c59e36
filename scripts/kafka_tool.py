#!/usr/bin/env python3
"""Small Kafka CLI for mailsender tests and benchmarks (confluent-kafka; run with the stack venv's python).

  kafka_tool.py create  --brokers B --topic T [--partitions N]           (exists already = success)
  kafka_tool.py produce --brokers B --topic T [--key K] (--value STR | --value-file F)
                        [--header NAME=VALUE ...] [--partition P] [--count N]
      --count N sends N messages; "{i}" in the key or value is replaced by the message index (0..N-1).
      Prints one JSON line: {"produced": N, "topic": T, "first": {"partition", "offset"}, "seconds": s}.
  kafka_tool.py consume --brokers B --topic T [--count N] [--timeout S] [--group G]
      Reads from the beginning with a fresh random consumer group (unless --group), no commits, and prints
      one JSON line per message: {"key", "value", "partition", "offset", "headers": {name: value}}
      (key/value/header values as utf-8 text, errors replaced; null stays null). Stops after N messages
      (N=0: until the timeout) or after S seconds; exit status 1 if fewer than N arrived.
"""
import argparse
import json
import sys
import time
import uuid

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic


def text(b):
    if b is None:
        return None
    if isinstance(b, str):
        return b
    return b.decode("utf-8", errors="replace")


def cmd_create(a):
    admin = AdminClient({"bootstrap.servers": a.brokers})
    futures = admin.create_topics(
        [NewTopic(a.topic, num_partitions=a.partitions, replication_factor=a.replication)],
        operation_timeout=a.timeout, request_timeout=a.timeout)
    try:
        futures[a.topic].result()
        print(json.dumps({"created": a.topic, "partitions": a.partitions}))
    except KafkaException as e:
        err = e.args[0]
        if err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
            print(json.dumps({"exists": a.topic}))
            return 0
        print(f"create {a.topic}: {err}", file=sys.stderr)
        return 1
    return 0


def cmd_produce(a):
    if (a.value is None) == (a.value_file is None):
        print("produce: give exactly one of --value / --value-file", file=sys.stderr)
        return 2
    if a.value_file is not None:
        with open(a.value_file, "rb") as f:
            value_bytes = f.read()
        value_tmpl = None
    else:
        value_bytes = None
        value_tmpl = a.value
    headers = []
    for h in a.header or []:
        name, sep, val = h.partition("=")
        if not sep:
            print(f"produce: --header needs NAME=VALUE, got {h!r}", file=sys.stderr)
            return 2
        headers.append((name, val.encode()))

    p = Producer({
        "bootstrap.servers": a.brokers,
        "linger.ms": 5,
        "message.max.bytes": max(1_000_000, (len(value_bytes) if value_bytes else 0) + 65536),
    })
    errors = []
    first = {}

    def on_delivery(err, msg):
        if err is not None:
            errors.append(str(err))
        elif not first:
            first.update(partition=msg.partition(), offset=msg.offset())

    t0 = time.monotonic()
    for i in range(a.count):
        key = a.key.replace("{i}", str(i)) if (a.key is not None and a.count > 1) else a.key
        value = value_bytes if value_bytes is not None else (
            value_tmpl.replace("{i}", str(i)) if a.count > 1 else value_tmpl).encode()
        kw = {"key": key.encode() if key is not None else None, "value": value, "on_delivery": on_delivery}
        if headers:
            kw["headers"] = headers
        if a.partition is not None:
            kw["partition"] = a.partition
        while True:
            try:
                p.produce(a.topic, **kw)
                break
            except BufferError:
                p.poll(0.05)
        p.poll(0)
    remaining = p.flush(a.timeout)
    secs = time.monotonic() - t0
    if remaining or errors:
        print(f"produce: {len(errors)} failed, {remaining} undelivered; first error: "
              f"{errors[0] if errors else 'timeout'}", file=sys.stderr)
        return 1
    print(json.dumps({"produced": a.count, "topic": a.topic, "first": first, "seconds": round(secs, 3)}))
    return 0


def cmd_consume(a):
    c = Consumer({
        "bootstrap.servers": a.brokers,
        "group.id": a.group or f"kafka-tool-{uuid.uuid4()}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "enable.partition.eof": False,
    })
    c.subscribe([a.topic])
    got = 0
    deadline = time.monotonic() + a.timeout
    try:
        while (a.count == 0 or got < a.count) and time.monotonic() < deadline:
            msg = c.poll(min(0.5, max(0.0, deadline - time.monotonic())))
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    continue
                print(f"consume: {msg.error()}", file=sys.stderr)
                if msg.error().fatal() or msg.error().code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                    return 1
                continue
            hdrs = {}
            for name, val in msg.headers() or []:
                hdrs[name] = text(val)
            print(json.dumps({
                "key": text(msg.key()),
                "value": text(msg.value()),
                "partition": msg.partition(),
                "offset": msg.offset(),
                "headers": hdrs,
            }, ensure_ascii=False), flush=True)
            got += 1
    finally:
        c.close()
    if a.count and got < a.count:
        print(f"consume: got {got} of {a.count} messages within {a.timeout}s", file=sys.stderr)
        return 1
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("create", help="create a topic")
    c.add_argument("--brokers", required=True)
    c.add_argument("--topic", required=True)
    c.add_argument("--partitions", type=int, default=1)
    c.add_argument("--replication", type=int, default=1)
    c.add_argument("--timeout", type=float, default=30.0)
    c.set_defaults(fn=cmd_create)

    p = sub.add_parser("produce", help="produce message(s)")
    p.add_argument("--brokers", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--key")
    p.add_argument("--value")
    p.add_argument("--value-file")
    p.add_argument("--header", action="append", metavar="NAME=VALUE")
    p.add_argument("--partition", type=int)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--timeout", type=float, default=60.0, help="flush timeout in seconds")
    p.set_defaults(fn=cmd_produce)

    s = sub.add_parser("consume", help="consume from the beginning with a fresh group")
    s.add_argument("--brokers", required=True)
    s.add_argument("--topic", required=True)
    s.add_argument("--count", type=int, default=1, help="stop after N messages (0 = read until --timeout)")
    s.add_argument("--timeout", type=float, default=30.0)
    s.add_argument("--group", help="consumer group (default: a fresh random one)")
    s.set_defaults(fn=cmd_consume)

    a = ap.parse_args()
    sys.exit(a.fn(a))


if __name__ == "__main__":
    main()
