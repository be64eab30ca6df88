"""Benchmark (not a test): the per-call costs issue 11 item 4 changed, in isolation (CPU µs per call,
best of 5 rounds), and whether the two crypto steps of GetSecrets release the GIL.

Why in isolation: a few µs per call disappear in the run-to-run spread of bench_server.py on a shared
2-core box; here each old and new way runs the same work back to back on one thread.

Usage:  python bench/bench_percall.py [-n 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def best(fn: Callable[[], None], n: int, rounds: int = 5) -> float:
    """CPU µs per call of fn, the best of `rounds` rounds of n calls."""
    out = []
    for _ in range(rounds):
        t = time.thread_time()
        for _ in range(n):
            fn()
        out.append((time.thread_time() - t) / n * 1e6)
    return min(out)


def receive_limit(n: int) -> None:
    """The wait for the request message: asyncio.wait_for (a task per call in 3.11) against an
    asyncio.timeout scope, each around a message that arrives on the loop's next turn."""
    loop = asyncio.new_event_loop()

    async def ready() -> int:
        fut = loop.create_future()
        loop.call_soon(fut.set_result, 1)
        return await fut

    async def with_wait_for() -> None:
        for _ in range(n):
            await asyncio.wait_for(ready(), 5)

    async def with_timeout() -> None:
        for _ in range(n):
            async with asyncio.timeout(5):
                await ready()

    async def bare() -> None:
        for _ in range(n):
            await ready()

    ways = (("no bound", bare), ("asyncio.wait_for", with_wait_for), ("asyncio.timeout", with_timeout))
    for name, body in ways:
        rounds = []
        for _ in range(5):
            t = time.thread_time()
            loop.run_until_complete(body())
            rounds.append((time.thread_time() - t) / n * 1e6)
        print(f"receive limit, {name:18s} {min(rounds):6.1f} µs/call")
    loop.close()


def audit_line(n: int) -> None:
    line = {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
        "event": "get_secrets", "peer": "ipv4:127.0.0.1:54321", "tee": "sgx", "mr_enclave": "ab" * 32,
        "mr_signer": "cd" * 32, "tcb_status": "UpToDate", "app_id": "demo-app", "names": ["db_password"],
        "verdict": "granted", "status": "OK", "step": None, "reason": None, "ms": 1.3,
    }
    print(f"audit line, json.dumps once        {best(lambda: json.dumps(line), n):6.1f} µs/call "
          "(saved per handler: text/JSON formatter, audit file)")


def metric_labels(n: int) -> None:
    import prometheus_client as prom

    reg = prom.CollectorRegistry()
    c = prom.Counter("x", "x", ["protocol", "result", "code", "step", "tee"], registry=reg)
    labels = ("asps.v1", "granted", "OK", "none", "sgx")
    child = c.labels(*labels)
    cache = {(id(c), labels): child}
    print(f"metrics, labels(...).inc()         {best(lambda: c.labels(*labels).inc(), n):6.1f} µs/call")
    print(f"metrics, cached child .inc()       {best(lambda: cache[(id(c), labels)].inc(), n):6.1f} µs/call")


def crypto_gil(n: int) -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    import asps_wire

    key = ec.generate_private_key(ec.SECP256R1())
    pub = key.public_key()
    data = b"x" * 200
    sig = key.sign(data, ec.ECDSA(hashes.SHA256()))
    suite = asps_wire.hpke_suite(pub)
    values = {"db_password": b"v" * 64}

    def verify() -> None:
        for _ in range(n):
            pub.verify(sig, data, ec.ECDSA(hashes.SHA256()))

    def seal() -> None:
        for _ in range(n):
            asps_wire.seal(suite, pub, values, b"t" * 32)

    for name, fn in (("ECDSA P-256 verify", verify), ("HPKE seal (P-256)", seal)):
        for threads in (1, 2):
            ts = [threading.Thread(target=fn) for _ in range(threads)]
            w, c = time.perf_counter(), time.process_time()
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            w, c = time.perf_counter() - w, time.process_time() - c
            print(f"{name}, {threads} thread(s): {c / (threads * n) * 1e6:6.1f} µs CPU each, "
                  f"process CPU / wall {c / w:.2f} (2.0 would mean the GIL is released)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=20000)
    n = ap.parse_args().n
    receive_limit(n)
    audit_line(n)
    metric_labels(n)
    crypto_gil(max(500, n // 20))


if __name__ == "__main__":
    main()
