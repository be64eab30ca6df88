"""Benchmark (not a test): the client-side cost of one Vault/OpenBao KV read, per HTTP client, same run.

Why: a secret read is on every GetSecrets, and the server's CPU is the bottleneck under load, so what
matters is the CPU a read costs the ASPS process (held under the GIL), then its latency. Each client
reads the same KV v1 secret from one real OpenBao on 127.0.0.1 over one kept-alive connection:

  asps-agent    kms.VaultAgent.get: what the server does (urllib3; mount cache, deadline, retries)
  agent+reqs    the same agent over a requests.Session (session=): the transport before issue 11
  requests      a bare requests.Session GET + JSON decode: the floor for anything built on requests
  urllib3       a bare urllib3 HTTPConnectionPool GET + JSON decode (requests' own transport)
  http.client   the standard library's HTTPConnection: the floor in Python
  httpx         httpx.Client, when importable (not a dependency: install it to compare)
  aiohttp       aiohttp.ClientSession in an asyncio loop, when importable (not a dependency)

Then one app's K reads (--batch) one after another against the same K reads issued concurrently
(threads over one urllib3 pool): the latency a batch saves, and what it costs in CPU.

Usage:  .venv/bin/python bench/bench_kms.py [-n 2000] [--batch 4]
        (httpx/aiohttp rows appear only in an interpreter that has them, e.g. a scratch venv made
        from requirements.txt plus `pip install httpx aiohttp`.)
Prints, per client: median and p99 wall time per read, and CPU per read (this process's
process_time over the loop, divided by the reads). OpenBao runs in its own process.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import kms  # noqa: E402


def _measure(name: str, read: Callable[[], bytes], n: int, expect: bytes) -> dict[str, float | str]:
    for _ in range(min(50, n)):  # warm: connection open, caches filled
        assert read() == expect, name
    walls = []
    cpu0 = time.process_time()
    for _ in range(n):
        t0 = time.perf_counter()
        value = read()
        walls.append(time.perf_counter() - t0)
        if value != expect:
            raise SystemExit(f"{name}: wrong value read")
    cpu = (time.process_time() - cpu0) / n
    walls.sort()
    return {
        "client": name,
        "p50_us": statistics.median(walls) * 1e6,
        "p99_us": walls[int(len(walls) * 0.99) - 1] * 1e6,
        "cpu_us": cpu * 1e6,
    }


def _value(body: bytes) -> bytes:
    return json.loads(body)["data"]["key"].encode()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=2000, help="reads per client (default 2000)")
    ap.add_argument("--batch", type=int, default=4, help="reads in one app's batch (default 4)")
    args = ap.parse_args(argv)

    import requests
    import urllib3
    from openbao import OpenBao

    secret = "bench-" + "cd" * 16
    with tempfile.TemporaryDirectory(prefix="asps-bench-kms-") as tmp, OpenBao(Path(tmp) / "bao") as bao:
        token = bao.add_app(1, {f"s{i}": secret for i in range(max(args.batch, 1))})
        host, port = "127.0.0.1", bao.port
        path = "/v1/occlum/1/s0"
        headers = {"X-Vault-Token": token}
        expect = secret.encode()
        rows = []

        agent = kms.VaultAgent(bao.addr, token)
        rows.append(_measure("asps-agent", lambda: agent.get("occlum/1/s0"), args.n, expect))
        # the agent as it was before issue 11 (a requests.Session): still accepted as session=
        old_session = requests.Session()
        old_session.trust_env = False
        old_agent = kms.VaultAgent(bao.addr, token, session=old_session)
        rows.append(_measure("agent+reqs", lambda: old_agent.get("occlum/1/s0"), args.n, expect))

        session = requests.Session()
        session.trust_env = False
        url = bao.addr + path
        rows.append(
            _measure(
                "requests",
                lambda: _value(session.get(url, headers=headers, timeout=5).content),
                args.n,
                expect,
            )
        )

        pool = urllib3.HTTPConnectionPool(host, port, maxsize=8, timeout=urllib3.Timeout(2, 5), retries=False)
        rows.append(
            _measure(
                "urllib3", lambda: _value(pool.request("GET", path, headers=headers).data), args.n, expect
            )
        )

        conn = http.client.HTTPConnection(host, port, timeout=5)

        def stdlib_read() -> bytes:
            conn.request("GET", path, headers=headers)
            return _value(conn.getresponse().read())

        rows.append(_measure("http.client", stdlib_read, args.n, expect))

        try:
            import httpx
        except ImportError:
            httpx = None
        if httpx is not None:
            hclient = httpx.Client(base_url=bao.addr, timeout=5, trust_env=False)
            rows.append(
                _measure("httpx", lambda: _value(hclient.get(path, headers=headers).content), args.n, expect)
            )

        try:
            import aiohttp
        except ImportError:
            aiohttp = None
        if aiohttp is not None:
            loop = asyncio.new_event_loop()

            async def make() -> aiohttp.ClientSession:
                return aiohttp.ClientSession(base_url=bao.addr)

            asession = loop.run_until_complete(make())

            async def aread() -> bytes:
                async with asession.get(path, headers=headers) as r:
                    return _value(await r.read())

            rows.append(_measure("aiohttp", lambda: loop.run_until_complete(aread()), args.n, expect))
            loop.run_until_complete(asession.close())
            loop.close()

        print(f"one KV v1 read from OpenBao on loopback, n={args.n} (median, p99 wall; CPU of this process)")
        print(f"{'client':<12} {'p50 µs':>9} {'p99 µs':>9} {'CPU µs/read':>12}")
        for r in rows:
            print(f"{r['client']:<12} {r['p50_us']:>9.0f} {r['p99_us']:>9.0f} {r['cpu_us']:>12.0f}")

        k = args.batch
        if k > 1:
            paths = [f"/v1/occlum/1/s{i}" for i in range(k)]
            bpool = urllib3.HTTPConnectionPool(
                host, port, maxsize=k, timeout=urllib3.Timeout(2, 5), retries=False
            )
            ex = futures.ThreadPoolExecutor(max_workers=k)

            def one(p: str) -> bytes:
                return _value(bpool.request("GET", p, headers=headers).data)

            def sequential() -> bytes:
                return b"".join(one(p) for p in paths)

            def concurrent() -> bytes:
                return b"".join(ex.map(one, paths))

            n = max(args.n // k, 50)
            brows = [
                _measure(f"seq x{k}", sequential, n, expect * k),
                _measure(f"conc x{k}", concurrent, n, expect * k),
            ]
            ex.shutdown()
            print(f"\none app's {k} reads as one batch (urllib3), n={n} batches")
            print(f"{'batch':<12} {'p50 µs':>9} {'p99 µs':>9} {'CPU µs/batch':>12}")
            for r in brows:
                print(f"{r['client']:<12} {r['p50_us']:>9.0f} {r['p99_us']:>9.0f} {r['cpu_us']:>12.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
