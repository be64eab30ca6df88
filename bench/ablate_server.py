"""Measurement only (not a server to run): asps_server.py with one part taken out, to see what it costs.

Run through bench_server.py, one process (`--workers 1`: workers are started from asps_server.py
itself and would not carry the change):

    ASPS_BENCH_ABLATE=seal-only .venv/bin/python bench/bench_server.py --callers 32 --duration 8 \\
        --server-script bench/ablate_server.py

ASPS_BENCH_ABLATE is a comma-separated list of:
  seal-only          GetSecrets does only what the ceiling cannot skip and still be opened by the
                     caller: one HPKE seal of the bench's value to the evidence's key (the key read
                     once per evidence). No token, signature, evidence check, policy, KMS or audit.
  no-audit           the audit line is not written (AuditRecord._emit does nothing).
  no-receive-limit   the ReceiveLimit interceptor passes every handler through unwrapped.
  gc-freeze          gc.freeze() once the server has started (start-up objects leave the GC's scans).
  inline             WorkPool.run calls its function on the event loop's own thread: no hand-off to
                     the pool and back. Against issue 11 item 1 (a slow verification or KMS read
                     then stops the loop); it measures what the hand-off costs under the GIL.

Each of these removes a check or a record the product must keep; the numbers only bound what the
part costs under load. Nothing here is imported by the product or the tests.
"""

from __future__ import annotations

import gc
import hashlib
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asps_server
import ops

BENCH_VALUE = ("bench-" + "ab" * 16).encode()  # bench_server.SECRET_VALUE, the one name "master_key"


def seal_only() -> None:
    keys: dict[bytes, Any] = {}

    def get_secrets(self, evidence, token, names, signature, *, peer=""):
        digest = hashlib.sha256(evidence).digest()
        key = keys.get(digest)
        if key is None:
            key = keys[digest] = asps_server.evidence_public_key(asps_server.evidence_der(evidence))
        suite = asps_server.sealing_suite(key)
        return "1", asps_server.seal(suite, key, {"master_key": BENCH_VALUE}, token)

    asps_server.Provisioner.get_secrets = get_secrets


def no_audit() -> None:
    ops.AuditRecord._emit = lambda self, *args, **kwargs: None


def no_receive_limit() -> None:
    async def intercept_service(self, continuation, handler_call_details):
        return await continuation(handler_call_details)

    asps_server.ReceiveLimit.intercept_service = intercept_service


def gc_freeze() -> None:
    serve = asps_server.serve

    def serve_then_freeze(config):
        handle = serve(config)
        gc.freeze()
        return handle

    asps_server.serve = serve_then_freeze


def inline() -> None:
    async def run(self, fn):
        return fn()

    asps_server.WorkPool.run = run


ABLATIONS = {
    "seal-only": seal_only,
    "no-audit": no_audit,
    "no-receive-limit": no_receive_limit,
    "gc-freeze": gc_freeze,
    "inline": inline,
}

if __name__ == "__main__":
    for name in filter(None, os.environ.get("ASPS_BENCH_ABLATE", "").split(",")):
        if name not in ABLATIONS:
            sys.exit(f"ASPS_BENCH_ABLATE: unknown {name!r}; known: {', '.join(ABLATIONS)}")
        ABLATIONS[name]()
    sys.exit(asps_server.main())
