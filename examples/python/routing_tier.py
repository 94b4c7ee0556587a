#!/usr/bin/env python3
"""A small routing-tier client for Pigeonhole, in Python, to show the
contract (proto/pigeonhole/v1) is usable without the Rust SDK.

It does what a routing tier does:
  1. appends messages with idempotency keys, retrying on UNAVAILABLE with
     the SAME key, so a retry never stores a second copy (it gets the
     original seq back, with duplicate=true);
  2. syncs a device from its cursor ("what came after seq N?"), page by page;
  3. follows mailboxes with Subscribe and receives a message appended after
     the stream opened.

Stubs are generated from proto/ at start (grpcio-tools), into a temporary
directory. Run against a node:

    pip install -r examples/python/requirements.txt
    python3 examples/python/routing_tier.py --endpoint 127.0.0.1:7070

It exits 0 and prints "ok" when every step behaved as the contract says,
and exits 1 naming the step otherwise. This is the check scripts/test runs.
"""

import argparse
import os
import sys
import tempfile
import threading
import time
import uuid

import grpc
from grpc_tools import protoc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def load_stubs():
    """Generates the pigeonhole.v1 Python modules and imports them."""
    out = tempfile.mkdtemp(prefix="pigeonhole-py-")
    proto_dir = os.path.join(ROOT, "proto")
    wkt = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    files = ["pigeonhole/v1/mailbox.proto", "pigeonhole/v1/admin.proto"]
    args = ["protoc", f"-I{proto_dir}", f"-I{wkt}", f"--python_out={out}", f"--grpc_python_out={out}"] + files
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed on " + ", ".join(files))
    sys.path.insert(0, out)
    from pigeonhole.v1 import mailbox_pb2, mailbox_pb2_grpc  # noqa: E402

    return mailbox_pb2, mailbox_pb2_grpc


class Router:
    """The routing tier's side of one Pigeonhole endpoint."""

    def __init__(self, endpoint, pb, pb_grpc, deadline_s=5.0):
        self.pb = pb
        self.stub = pb_grpc.MailboxStub(grpc.insecure_channel(endpoint))
        self.deadline_s = deadline_s

    def mailbox(self, namespace, user):
        return self.pb.MailboxId(namespace=namespace, user_id=user.encode())

    def append(self, mailbox, payload, key):
        """Appends once, whatever the retries: the key makes them idempotent."""
        req = self.pb.AppendRequest(mailbox=mailbox, payload=payload, idempotency_key=key)
        delay = 0.05
        for attempt in range(10):
            try:
                return self.stub.Append(req, timeout=self.deadline_s)
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE or attempt == 9:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def sync(self, mailbox, after_seq, page=100):
        """Every message after `after_seq`, in seq order, page by page."""
        out = []
        while True:
            r = self.stub.Sync(
                self.pb.SyncRequest(mailbox=mailbox, after_seq=after_seq, max_messages=page),
                timeout=self.deadline_s,
            )
            out.extend(r.messages)
            if r.messages:
                after_seq = r.messages[-1].seq
            if not r.has_more:
                return out

    def subscribe(self, cursors):
        """A Subscribe stream following (mailbox, after_seq) pairs."""
        req = self.pb.SubscribeRequest(
            mailboxes=[self.pb.MailboxCursor(mailbox=m, after_seq=s) for m, s in cursors]
        )
        return self.stub.Subscribe(req)


def check(ok, step):
    if not ok:
        print(f"FAILED: {step}", file=sys.stderr)
        sys.exit(1)
    print(f"  {step}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--endpoint", default="127.0.0.1:7070")
    ap.add_argument("--namespace", default="pyexample")
    args = ap.parse_args()
    pb, pb_grpc = load_stubs()
    router = Router(args.endpoint, pb, pb_grpc)
    run = uuid.uuid4().hex[:8]
    alice = router.mailbox(args.namespace, f"alice-{run}")
    bob = router.mailbox(args.namespace, f"bob-{run}")

    # 1. Appends with idempotency keys; a retry gets the original seq.
    # (duplicate may be true here too: a retry after a timeout whose first
    # attempt had committed gets the original seq, which is the point.)
    first = router.append(alice, b"hello", f"msg-{run}-1".encode())
    check(first.seq == 1, "append: seq 1")
    again = router.append(alice, b"hello", f"msg-{run}-1".encode())
    check(again.seq == 1 and again.duplicate, "retry with the same key: seq 1 again, duplicate")
    for i in range(2, 6):
        r = router.append(alice, f"message {i}".encode(), f"msg-{run}-{i}".encode())
        check(r.seq == i, f"append: seq {i}")
    try:
        router.append(alice, b"other bytes", f"msg-{run}-1".encode())
        check(False, "a reused key with another payload is refused")
    except grpc.RpcError as e:
        check(e.code() == grpc.StatusCode.ALREADY_EXISTS, "a reused key with another payload: ALREADY_EXISTS")

    # 2. Sync from a device's cursor.
    got = router.sync(alice, after_seq=2, page=2)
    check([m.seq for m in got] == [3, 4, 5], "sync after seq 2, two per page: 3, 4, 5")
    check(got[0].payload == b"message 3", "payloads come back as they were sent")

    # 3. Subscribe: follow both mailboxes, then a new append arrives.
    stream = router.subscribe([(alice, 5), (bob, 0)])
    received = []

    def follow():
        for event in stream:
            if event.HasField("messages"):
                received.extend((event.messages.mailbox.user_id, m.seq) for m in event.messages.messages)
                return

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    time.sleep(0.5)
    router.append(bob, b"for bob", f"bob-{run}-1".encode())
    t.join(timeout=10)
    stream.cancel()
    check(received == [(bob.user_id, 1)], "subscribe: bob's new message is delivered")
    print("ok")


if __name__ == "__main__":
    main()
