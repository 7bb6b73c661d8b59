#!/usr/bin/env python3
"""A webhook endpoint that checks Standard Webhooks signatures with the `standardwebhooks`
PyPI package, a verifier that Herald's authors did not write.

Usage:
    standardwebhooks_sink.py [--port N] [--secret whsec_...]... [--fail-first N] [--record FILE]

Listens on 127.0.0.1 (port 0 = any free port) and prints one JSON line
`{"listening": PORT}` to stdout once it accepts connections. For every POST it runs
`standardwebhooks.Webhook(secret).verify(body, headers)` once per `--secret` (each secret is a
separate verifier, as a receiver holding only that secret would be) and writes one JSON line:

    {"seq": 1, "path": "/hook", "verified": true, "results": [{"verified": true, "error": null}],
     "webhook_id": "...", "webhook_timestamp": "...", "webhook_signature": "...",
     "headers": {...}, "body": "...", "status": 200}

`verified` is true only when every verifier accepted the request, and `error` (top level) is
the first verifier's error. It answers 200 when verified, else 401, except that the first
`--fail-first` requests are answered 500 (after being verified and recorded), to exercise
retries. Lines go to stdout, or to `--record FILE` when given. Standard library only, apart
from `standardwebhooks`.
"""

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import standardwebhooks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--secret", action="append", default=[], help="whsec_... (repeatable)")
    parser.add_argument("--fail-first", type=int, default=0)
    parser.add_argument("--record", help="append JSON lines here instead of stdout")
    args = parser.parse_args()
    if not args.secret:
        parser.error("at least one --secret is required")

    verifiers = [standardwebhooks.Webhook(s) for s in args.secret]
    out = open(args.record, "a", encoding="utf-8") if args.record else sys.stdout
    lock = threading.Lock()
    state = {"seq": 0}

    def emit(record: dict) -> None:
        out.write(json.dumps(record, sort_keys=True) + "\n")
        out.flush()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 (http.server naming)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            headers = {k.lower(): v for k, v in self.headers.items()}
            results = []
            for verifier in verifiers:
                try:
                    verifier.verify(body, headers)
                    results.append({"verified": True, "error": None})
                except Exception as e:  # the verifier's own exceptions, or a malformed header
                    results.append({"verified": False, "error": f"{type(e).__name__}: {e}"})
            verified = all(r["verified"] for r in results)
            with lock:
                state["seq"] += 1
                seq = state["seq"]
                status = 500 if seq <= args.fail_first else (200 if verified else 401)
                emit(
                    {
                        "seq": seq,
                        "path": self.path,
                        "verified": verified,
                        "error": next((r["error"] for r in results if r["error"]), None),
                        "results": results,
                        "webhook_id": headers.get("webhook-id"),
                        "webhook_timestamp": headers.get("webhook-timestamp"),
                        "webhook_signature": headers.get("webhook-signature"),
                        "headers": headers,
                        "body": body.decode("utf-8", errors="replace"),
                        "status": status,
                    }
                )
            reply = json.dumps({"verified": verified}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args) -> None:  # noqa: A002
            sys.stderr.write("standardwebhooks_sink: " + (format % args) + "\n")

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    # Announce on stdout even when records go to a file: the caller waits for this line.
    sys.stdout.write(json.dumps({"listening": server.server_address[1]}) + "\n")
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
