"""Benchmark (not a test): microseconds per quote verification, dcap.py beside dcap-qvl, same run.

dcap.py is measured the way the server uses it: one `dcap.Verifier` per collateral bundle, warm (the
collateral, its chains and CRLs already verified and cached), so each call verifies the quote itself.
dcap-qvl is measured with its collateral object built once outside the loop; it re-verifies the whole
collateral on every call, which is what its API offers.

Quotes: the real Intel sample (../shared/samples/intel-sgx-v3, at its `now`, Intel root), a real TDX
quote (../shared/samples/real-dcap/tdx/go-tdx-guest-90c06f-v5-2026: v5, TD report 1.5), and quotes
from a fresh simulated platform (sim root): SGX v3 and a TD (v4).
Usage:  .venv/bin/python bench/bench_verify.py [-n N]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import dcap_qvl  # noqa: E402

import dcap  # noqa: E402
import sgxsim  # noqa: E402
from dcap_collateral import Collateral  # noqa: E402

SAMPLE = REPO.parent / "shared" / "samples" / "intel-sgx-v3"
TDX_SAMPLE = REPO.parent / "shared" / "samples" / "real-dcap" / "tdx" / "go-tdx-guest-90c06f-v5-2026"


def median_us(fn: Callable[[], object], n: int) -> float:
    """Median over n timed calls (after a few warm-up calls), in microseconds."""
    for _ in range(min(20, n)):
        fn()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - t0)
    return statistics.median(samples) / 1000


def bench_case(name: str, quote: bytes, coll: Collateral, root_der: bytes, now: int, n: int) -> dict:
    verifier = dcap.Verifier(coll, root_ca=root_der)
    ours = verifier.verify(quote, now=now)
    qvl_coll = dcap_qvl.QuoteCollateralV3.from_json(coll.to_json())
    try:
        ref = dcap_qvl.verify_with_root_ca(quote, qvl_coll, root_der, now)
        ref_status = ref.status
    except Exception as exc:  # dcap-qvl refuses some results dcap.py reports (Revoked, debug)
        ref_status = f"error: {exc}"
    # Cold: a new Verifier per call (empty caches): chains, CRLs, TCB info and QE identity verified again.
    cold_us = median_us(lambda: dcap.Verifier(coll, root_ca=root_der).verify(quote, now=now), max(5, n // 10))
    warm_us = median_us(lambda: verifier.verify(quote, now=now), n)
    qvl_us = median_us(lambda: dcap_qvl.verify_with_root_ca(quote, qvl_coll, root_der, now), n)
    return {"case": name, "status": ours.status, "dcap_qvl_status": ref_status, "warm_us": warm_us,
            "cold_us": cold_us, "qvl_us": qvl_us}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=500, help="timed calls per measurement (default 500)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    # A Verifier warns once per instance when its root is not Intel's; the cold loop makes hundreds.
    logging.getLogger("dcap").setLevel(logging.ERROR)

    rows = []
    expected = json.loads((SAMPLE / "expected.json").read_text())
    rows.append(bench_case(
        "intel-sgx-v3 (real)", (SAMPLE / "quote.bin").read_bytes(),
        Collateral.from_json((SAMPLE / "collateral.json").read_text()),
        (SAMPLE / "Intel_SGX_Root_CA.der").read_bytes(), expected["now"], args.n))
    rows.append(bench_case(
        "tdx v5 go-tdx-guest (real)", (TDX_SAMPLE / "quote.bin").read_bytes(),
        Collateral.from_json((TDX_SAMPLE / "collateral.json").read_text()), dcap.intel_root_ca(),
        json.loads((TDX_SAMPLE / "expected.json").read_text())["now"], args.n))
    with tempfile.TemporaryDirectory(prefix="bench-sim-") as tmp:
        plat = sgxsim.SimPlatform.init(tmp)
        quote = plat.make_quote(bytes(range(64)), tcb="SWHardeningNeeded")
        rows.append(bench_case("sim v3 (SWHardeningNeeded)", quote, plat.collateral(), plat.root_ca_der,
                               int(time.time()), args.n))
        td = plat.make_td_quote(bytes(range(64)), td_tcb="OutOfDate")
        rows.append(bench_case("sim TD v4 (OutOfDate)", td, plat.tdx_collateral(), plat.root_ca_der,
                               int(time.time()), args.n))

    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"median microseconds per verification, n={args.n}, python {sys.version.split()[0]}, "
          f"dcap-qvl {dcap_qvl.__version__ if hasattr(dcap_qvl, '__version__') else '?'}")
    head = f"{'quote':28} {'status':36} {'dcap warm':>10} {'dcap cold':>10} {'dcap-qvl':>10} {'speed-up':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        speedup = r["qvl_us"] / r["warm_us"]
        print(f"{r['case']:28} {r['status']:36} {r['warm_us']:10.0f} {r['cold_us']:10.0f} "
              f"{r['qvl_us']:10.0f} {speedup:8.1f}x  (warm = {r['warm_us'] / r['qvl_us']:.2f}x dcap-qvl)")
    print("dcap warm: dcap.Verifier, verified collateral cached; dcap cold: a new dcap.Verifier per call;")
    print("dcap-qvl: dcap_qvl.verify_with_root_ca with a prebuilt QuoteCollateralV3 (verifies everything).")
    for r in rows:
        if r["dcap_qvl_status"] != r["status"]:
            print(f"note: {r['case']}: dcap-qvl says {r['dcap_qvl_status']}")


if __name__ == "__main__":
    main()
