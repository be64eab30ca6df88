"""Median time to make one RA-TLS certificate (sim provider) and to verify one with warm collateral.

Usage: python bench/bench_ratls.py [--runs N] [--sim-dir DIR]
Key generation is part of "make" (a fresh key per certificate is what an enclave does).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dcap
import ratls
import ratls_attest
import sgxsim


def _median_ms(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--sim-dir", help="simulated platform directory (default: a fresh temporary one)")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        platform = sgxsim.SimPlatform.init(args.sim_dir or tmp)
        provider = sgxsim.SimProvider(platform.directory)
        verifier = dcap.Verifier(platform.collateral(), root_ca=platform.root_ca_der)
        print(f"{'format':8} {'key':8} {'make (ms)':>10} {'verify warm (ms)':>17}   runs={args.runs}")
        for fmt in ratls_attest.FORMATS:
            for key_type in ratls_attest.KEY_TYPES:
                runs = max(3, args.runs // 5) if key_type == "rsa3072" else args.runs
                def make(f=fmt, k=key_type):
                    return ratls_attest.make_certificate(provider, fmt=f, key_type=k)

                make_ms = _median_ms(make, runs)
                cert, _ = ratls_attest.make_certificate(provider, fmt=fmt, key_type=key_type)
                ratls.verify_evidence(cert, verifier)  # warm the verifier's collateral caches
                verify_ms = _median_ms(lambda c=cert: ratls.verify_evidence(c, verifier), args.runs)
                print(f"{fmt:8} {key_type:8} {make_ms:10.2f} {verify_ms:17.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
