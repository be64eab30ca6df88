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
  batched            one worker thread instead of the pool, which wakes the loop once per batch of
                     finished calls rather than once per call (no admission bound: measurement only).

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

from bench_server import SECRET_VALUE  # the value of the benchmark policy's one name, "master_key"

import asps_server
import ops


def seal_only() -> None:
    keys: dict[bytes, Any] = {}

    def get_secrets(self, evidence, token, names, signature, *, peer=""):
        digest = hashlib.sha256(evidence).digest()
        key = keys.get(digest)
        if key is None:
            key = keys[digest] = asps_server.evidence_public_key(asps_server.evidence_der(evidence))
        suite = asps_server.sealing_suite(key)
        return "1", asps_server.seal(suite, key, {"master_key": SECRET_VALUE.encode()}, token)

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


def batched() -> None:
    import asyncio
    import queue
    import threading

    jobs: queue.SimpleQueue = queue.SimpleQueue()
    started: list[threading.Thread] = []

    def deliver(results: list) -> None:
        for fut, ok, value in results:
            if not fut.cancelled():
                fut.set_result(value) if ok else fut.set_exception(value)

    def worker(loop: asyncio.AbstractEventLoop) -> None:
        results: list = []
        while True:
            try:
                fut, fn = jobs.get(block=not results)
            except queue.Empty:  # nothing more queued: hand the batch back in one wake-up
                loop.call_soon_threadsafe(deliver, results)
                results = []
                continue
            try:
                results.append((fut, True, fn()))
            except BaseException as e:  # handed to the awaiting call
                results.append((fut, False, e))

    async def run(self, fn):
        loop = asyncio.get_running_loop()
        if not started:
            started.append(threading.Thread(target=worker, args=(loop,), daemon=True))
            started[0].start()
        fut = loop.create_future()
        jobs.put((fut, fn))
        return await fut

    asps_server.WorkPool.run = run


ABLATIONS = {
    "seal-only": seal_only,
    "no-audit": no_audit,
    "no-receive-limit": no_receive_limit,
    "gc-freeze": gc_freeze,
    "inline": inline,
    "batched": batched,
}

if __name__ == "__main__":
    for name in filter(None, os.environ.get("ASPS_BENCH_ABLATE", "").split(",")):
        if name not in ABLATIONS:
            sys.exit(f"ASPS_BENCH_ABLATE: unknown {name!r}; known: {', '.join(ABLATIONS)}")
        ABLATIONS[name]()
    sys.exit(asps_server.main())
