#!/usr/bin/env python3
"""A small omnibus client in Python, generated from proto/ with grpcio-tools.

It proves that nothing about the services is Rust-specific:

1. checks gRPC health of both services (standard grpc.health.v1);
2. inserts a row through db-svc (with a request_id, so a retry is harmless) and queries it back;
3. opens a consumer-svc Subscribe stream and reads a few updates.

Usage (see README.md in this folder):

    python3 omnibus_example.py --db 127.0.0.1:50052 --consumer 127.0.0.1:50051 \
        [--token TOKEN] [--updates 3] [--gen-dir DIR] [--agent NAME]

The stubs are generated at start-up into --gen-dir (default: a temporary directory) from the
repository's proto/ folder, so they always match the contract. Exit status 0 means every step
worked; each step prints one line.
"""

import argparse
import os
import sys
import tempfile
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.normpath(os.path.join(HERE, "..", "..", "proto"))


def generate_stubs(out_dir):
    """Runs grpc_tools.protoc over every .proto under proto/ into out_dir."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    protos = []
    for root, _dirs, files in os.walk(os.path.join(PROTO_ROOT, "omnibus")):
        protos += [os.path.join(root, f) for f in files if f.endswith(".proto")]
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
    ] + sorted(protos)
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    sys.path.insert(0, out_dir)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True, help="db-svc address host:port")
    parser.add_argument("--consumer", required=True, help="consumer-svc address host:port")
    parser.add_argument("--token", default=os.environ.get("OMNIBUS_TOKEN"),
                        help="bearer token (write scope for the insert), if auth is on")
    parser.add_argument("--updates", type=int, default=3,
                        help="stream updates to read from consumer-svc")
    parser.add_argument("--agent", default="python-example", help="agent_name of the row")
    parser.add_argument("--gen-dir", default=None, help="where to generate the stubs")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per step")
    args = parser.parse_args()

    gen_dir = args.gen_dir or tempfile.mkdtemp(prefix="omnibus-py-")
    os.makedirs(gen_dir, exist_ok=True)
    generate_stubs(gen_dir)

    import grpc
    from google.protobuf import json_format, struct_pb2
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from omnibus.consumer.v1 import consumer_pb2, consumer_pb2_grpc
    from omnibus.db.v1 import db_pb2, db_pb2_grpc

    metadata = [("authorization", f"Bearer {args.token}")] if args.token else []

    # 1. Health.
    for name, addr, service in [
        ("db-svc", args.db, "omnibus.db.v1.DatabaseService"),
        ("consumer-svc", args.consumer, "omnibus.consumer.v1.ConsumerService"),
    ]:
        with grpc.insecure_channel(addr) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=args.timeout)
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            print(f"health {name}: {status}")
            if status != "SERVING":
                raise SystemExit(f"{name} is {status}")

    # 2. db-svc: insert (idempotent with request_id) and query it back.
    correlation_id = str(uuid.uuid4())
    with grpc.insecure_channel(args.db) as channel:
        db = db_pb2_grpc.DatabaseServiceStub(channel)
        row = struct_pb2.Struct()
        row.update({
            "correlation_id": correlation_id,
            "agent_name": args.agent,
            "action_type": "tool_call",
            "action_name": "python_example",
            "action_details": {"language": "python", "grpcio": grpc.__version__},
            "duration_ms": 7,
        })
        request_id = f"python-example-{correlation_id}"
        inserted = db.Insert(
            db_pb2.InsertRequest(table="agent_actions", rows=[row], request_id=request_id),
            metadata=metadata, timeout=args.timeout)
        print(f"insert: affected={inserted.affected} replayed={inserted.replayed}")
        # The same request again is answered from the idempotency record.
        again = db.Insert(
            db_pb2.InsertRequest(table="agent_actions", rows=[row], request_id=request_id),
            metadata=metadata, timeout=args.timeout)
        print(f"insert again: affected={again.affected} replayed={again.replayed}")
        if inserted.affected != 1 or not again.replayed:
            raise SystemExit("unexpected insert results")

        where = struct_pb2.Struct()
        where.update({"correlation_id": correlation_id})
        found = db.Query(
            db_pb2.QueryRequest(table="agent_actions", where=where,
                                columns=["agent_name", "action_name", "duration_ms"],
                                include_total=True),
            metadata=metadata, timeout=args.timeout)
        rows = [json_format.MessageToDict(r) for r in found.rows]
        print(f"query: total={found.total} rows={rows}")
        if found.total != 1 or rows[0].get("agent_name") != args.agent:
            raise SystemExit("the inserted row was not found")

    # 3. consumer-svc: a Subscribe stream (snapshot first, then live updates).
    with grpc.insecure_channel(args.consumer) as channel:
        consumer = consumer_pb2_grpc.ConsumerServiceStub(channel)
        stream = consumer.Subscribe(
            consumer_pb2.SubscribeRequest(include_snapshot=True),
            metadata=metadata, timeout=args.timeout)
        received = 0
        for update in stream:
            kind = update.WhichOneof("update") or "?"
            print(f"update {received + 1}: sequence={update.sequence} {kind}")
            received += 1
            if received >= args.updates:
                stream.cancel()
                break
        if received < args.updates:
            raise SystemExit(f"only {received} of {args.updates} stream updates")

    print("ok")


if __name__ == "__main__":
    main()
