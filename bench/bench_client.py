"""Benchmark (not a test): cold start of asps_client.py, from process start to secret received.

Starts an ASPS server (sim root, JSON KMS) as bench_server.py does, then runs
`asps_client.py --provider sim ... --key master_key` as a new process N times (median), beside the
peers that bound it from below: an interpreter that does nothing, one that imports grpc and
cryptography (what any Python gRPC+TLS client pays; issue 12's peer), the floor (grpc plus the
cryptography modules any client that makes a key and an X.509 certificate loads, and HPKE and the
protobuf runtime, with none of our code), and one that imports asps_client (our modules).
Each cold start includes making a key pair and a simulated quote, the TLS handshake, both RPCs and
opening the sealed bundle.  One warm-up run first, so the page cache holds the files.

Usage:  .venv/bin/python bench/bench_client.py [-n 10] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from bench_server import SECRET_VALUE, Server, asps_flags, free_port, make_setup  # noqa: E402

PEER = "python -c 'import grpc, cryptography'"  # issue 12's yardstick
KEY_AND_CERT = "import grpc, cryptography.x509, cryptography.hazmat.primitives.asymmetric.ec"
FLOOR = KEY_AND_CERT + ", cryptography.hazmat.primitives.hpke, google.protobuf.descriptor_pool"


def median_ms(
    commands: list[tuple[list[str], str | None]], n: int
) -> list[tuple[float, float, float]]:
    """(median, min, max) wall milliseconds of each command run as a new process, over n rounds.
    The commands take turns within each round, so that a change in the machine's load hits all
    alike; round 0 only warms the page cache."""
    samples: list[list[float]] = [[] for _ in commands]
    # As in a built image: .pyc files are read and written (a shell's PYTHONDONTWRITEBYTECODE would
    # make every run compile our modules again).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    for i in range(n + 1):
        for (argv, expect), out in zip(commands, samples, strict=True):
            t0 = time.perf_counter()
            done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=False, env=env)
            elapsed = (time.perf_counter() - t0) * 1000
            if done.returncode != 0 or (expect and expect not in done.stdout):
                raise RuntimeError(f"{argv[:3]}... failed ({done.returncode}): {done.stderr.strip()[-300:]}")
            if i:
                out.append(elapsed)
    return [(statistics.median(x), min(x), max(x)) for x in samples]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=10, help="runs per measurement (default %(default)s)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    py = sys.executable
    rows: list[tuple[str, tuple[float, float, float]]]
    with tempfile.TemporaryDirectory(prefix="bench-client-") as tmp:
        setup = make_setup(Path(tmp), "json")
        port = free_port()
        server = Server(
            [py, str(REPO / "asps_server.py"), *asps_flags(port, setup.certs, setup.policy, setup.sim_dir)],
            {"ASPS_TOKEN_KEY": secrets.token_hex(32)},
            port,
            Path(tmp) / "server.log",
        )
        try:
            server.wait_ready()
            client = [py, str(REPO / "asps_client.py"), "--host", f"localhost:{port}",
                      "--ca", str(setup.certs / "ca.crt"), "--provider", "sim",
                      "--sim-dir", str(setup.sim_dir), "--key", "master_key"]  # fmt: skip
            measured = (
                ("asps_client.py (sim), start to secret", client, SECRET_VALUE),
                ("python -c 'import asps_client'", [py, "-c", "import asps_client"], None),
                (PEER, [py, "-c", "import grpc, cryptography"], None),
                ("grpc + cryptography's x509 and ec", [py, "-c", KEY_AND_CERT], None),
                ("floor: those + hpke + protobuf runtime", [py, "-c", FLOOR], None),
                ("python -c pass", [py, "-c", "pass"], None),
            )
            stats = median_ms([(cmd, expect) for _, cmd, expect in measured], args.n)
            rows = [(what, st) for (what, _, _), st in zip(measured, stats, strict=True)]
        finally:
            server.stop()
    if args.json:
        out = [{"what": w, "median_ms": m, "min_ms": lo, "max_ms": hi} for w, (m, lo, hi) in rows]
        print(json.dumps(out, indent=1))
        return 0
    print(f"cold start, median of {args.n} runs (after one warm-up), nproc={os.cpu_count()}")
    peer = dict(rows)[PEER][0]
    print(f"{'what':42} {'median ms':>10} {'min':>7} {'max':>7} {'x peer':>7}")
    for what, (m, lo, hi) in rows:
        print(f"{what:42} {m:10.0f} {lo:7.0f} {hi:7.0f} {m / peer:7.2f}")
    goal = rows[0][1][0]
    print(f"goal < 1000 ms: {'met' if goal < 1000 else 'NOT met'} ({goal:.0f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
