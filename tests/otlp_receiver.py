#!/usr/bin/env python3
"""A minimal OTLP/gRPC receiver for the integration tests.

Usage: otlp_receiver.py --out SPANS.jsonl [--port PORT]

Serves opentelemetry.proto.collector.trace.v1.TraceService/Export on 127.0.0.1
(PORT 0, the default, picks an ephemeral port). Once listening it prints exactly one
line to stdout,

    otlp receiver listening on 127.0.0.1:<port>

and flushes it; a test reads that line to learn the port. Nothing else goes to stdout
(diagnostics go to stderr).

Every span received is appended to SPANS.jsonl as one JSON object per line, flushed
as soon as it is written (writes from concurrent Export calls are serialised by a lock):

    {"service": "<resource attribute service.name, or \"\">",
     "trace_id": "<32 hex digits>", "span_id": "<16 hex digits>",
     "parent_span_id": "<16 hex digits, or \"\" for a root span>",
     "name": "<span name>", "kind": <SpanKind as an int, 1 = INTERNAL .. 5 = CONSUMER>,
     "attributes": {"<key>": "<value as a string>", ...}}

Attribute values are stringified: strings as they are, booleans as "true"/"false",
ints and doubles in decimal, bytes as hex, arrays and key-value lists as compact JSON
of their stringified members, an unset value as "".

OTLP logs and metrics Export calls are accepted too (answered with success, content
ignored), so an exporter configured for those signals does not log errors.

SIGTERM or SIGINT stops the server (in-flight calls get a short grace period) and the
process exits with status 0.

Needs the repo venv (scripts/python-env.sh installs opentelemetry-proto, grpcio and
protobuf from scripts/requirements.txt): .venv/bin/python tests/otlp_receiver.py ...
"""

import argparse
import json
import os
import signal
import sys
import threading
from concurrent import futures

try:
    import grpc
    from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
    from opentelemetry.proto.collector.metrics.v1 import (
        metrics_service_pb2,
        metrics_service_pb2_grpc,
    )
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
except ImportError as e:  # pragma: no cover - environment problem, not a code path
    sys.stderr.write(
        f"otlp_receiver: {e}\n"
        "otlp_receiver: run it with the repo venv (scripts/python-env.sh), "
        "e.g. .venv/bin/python tests/otlp_receiver.py\n"
    )
    sys.exit(2)

HOST = "127.0.0.1"


def any_value_native(v):
    """An AnyValue as a plain Python value (used inside arrays and key-value lists)."""
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "string_value":
        return v.string_value
    if which == "bool_value":
        return v.bool_value
    if which == "int_value":
        return v.int_value
    if which == "double_value":
        return v.double_value
    if which == "bytes_value":
        return v.bytes_value.hex()
    if which == "array_value":
        return [any_value_native(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: any_value_native(kv.value) for kv in v.kvlist_value.values}
    return str(getattr(v, which))  # a value kind newer than this script


def any_value_str(v):
    """An AnyValue stringified for the "attributes" map."""
    which = v.WhichOneof("value")
    if which is None:
        return ""
    if which == "string_value":
        return v.string_value
    if which == "bool_value":
        return "true" if v.bool_value else "false"
    if which == "int_value":
        return str(v.int_value)
    if which == "double_value":
        return repr(v.double_value)
    if which == "bytes_value":
        return v.bytes_value.hex()
    return json.dumps(any_value_native(v), separators=(",", ":"), ensure_ascii=False)


def service_name(resource):
    for kv in resource.attributes:
        if kv.key == "service.name":
            return any_value_str(kv.value)
    return ""


class SpanSink:
    """Appends span lines to the output file; one lock around every write + flush."""

    def __init__(self, path):
        self._lock = threading.Lock()
        # Created (empty) up front, so a test can open it as soon as the port is printed.
        self._f = open(path, "a", encoding="utf-8")
        self.count = 0

    def write_request(self, request):
        lines = []
        for rs in request.resource_spans:
            service = service_name(rs.resource)
            for ss in rs.scope_spans:
                for span in ss.spans:
                    record = {
                        "service": service,
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex(),
                        "name": span.name,
                        "kind": int(span.kind),
                        "attributes": {
                            kv.key: any_value_str(kv.value) for kv in span.attributes
                        },
                    }
                    lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        with self._lock:
            for line in lines:
                self._f.write(line)
                self._f.flush()
            self.count += len(lines)
        return len(lines)

    def close(self):
        with self._lock:
            self._f.close()


class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, sink):
        self._sink = sink

    def Export(self, request, context):
        self._sink.write_request(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class LogsService(logs_service_pb2_grpc.LogsServiceServicer):
    def Export(self, request, context):
        return logs_service_pb2.ExportLogsServiceResponse()


class MetricsService(metrics_service_pb2_grpc.MetricsServiceServicer):
    def Export(self, request, context):
        return metrics_service_pb2.ExportMetricsServiceResponse()


def main():
    ap = argparse.ArgumentParser(description="OTLP/gRPC trace receiver writing spans as JSONL")
    ap.add_argument("--out", required=True, help="JSONL file the spans are appended to")
    ap.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0 = ephemeral)")
    args = ap.parse_args()

    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    sink = SpanSink(args.out)

    stop = threading.Event()

    def on_signal(signum, _frame):
        stop.set()

    # Installed before the port is announced, so a test that kills the receiver right
    # after reading the line still gets a clean exit.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="otlp"),
        options=[
            # No SO_REUSEPORT: a fixed --port that is already taken must fail, not be shared.
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ],
    )
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceService(sink), server)
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server(LogsService(), server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(MetricsService(), server)

    try:
        port = server.add_insecure_port(f"{HOST}:{args.port}")
    except RuntimeError as e:  # newer grpcio raises instead of returning 0
        sys.stderr.write(f"otlp_receiver: cannot bind {HOST}:{args.port}: {e}\n")
        sys.exit(1)
    if port == 0:
        sys.stderr.write(f"otlp_receiver: cannot bind {HOST}:{args.port}\n")
        sys.exit(1)
    server.start()

    sys.stdout.write(f"otlp receiver listening on {HOST}:{port}\n")
    sys.stdout.flush()

    # Event.wait() returns as soon as a signal handler sets the event; the timeout only
    # bounds how long a wake-up could ever be missed.
    while not stop.wait(timeout=1.0):
        pass

    server.stop(grace=2.0).wait()
    sink.close()
    sys.stderr.write(f"otlp_receiver: stopped after {sink.count} span(s)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
