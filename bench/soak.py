"""Soak: many attestations against a real OpenBao-backed ASPS server running as a subprocess.

Passes (exit 0) when every attestation succeeds and the server's resident memory after the run is
within --max-growth (10 %) of its resident memory after the first --checkpoint attestations: a leak
of a few hundred bytes per request shows up there, a warm-up does not.

    python bench/soak.py                      # 20,000 attestations, 32 callers in 4 processes
    python bench/soak.py --total 2000 --callers 8 --procs 2

Each attestation is what an enclave does: GetChallenge, sign the transcript with the evidence key,
GetSecrets, open the HPKE bundle and compare the value with the one in OpenBao. Evidence is made
once per caller process (sim provider), so the client side stays cheap. The server's RSS is read
from /proc/PID/status (VmRSS); its Prometheus endpoint is scraped at the end for its own counts.

The load functions (`run_load`, `attest_once`) are also used by tests/test_ops.py (a scaled-down
soak) and tests/test_faults.py.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO, REPO / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")  # OpenBao is started with fork+exec

import grpc  # noqa: E402

import asps_client  # noqa: E402
import asps_pb2  # noqa: E402
import asps_pb2_grpc  # noqa: E402
import asps_wire  # noqa: E402


def attest_once(
    stub: Any, ev: asps_client.Evidence, names: list[str], expected: dict[str, bytes], timeout: float = 30.0
) -> str:
    """One attestation; "OK", the gRPC status name of a refusal, or "BAD_REPLY"."""
    try:
        token = stub.GetChallenge(asps_pb2.ChallengeRequest(), timeout=timeout).token
        sig = asps_wire.sign_transcript(ev.private_key, asps_wire.transcript(token, ev.cert_der, names))
        req = asps_pb2.SecretsRequest(evidence=ev.cert_der, token=token, names=names, signature=sig)
        reply = stub.GetSecrets(req, timeout=timeout)
    except grpc.RpcError as e:
        return e.code().name
    try:
        got = asps_client.open_bundle(ev.private_key, reply.sealed, token)
    except asps_client.BadReply:
        return "BAD_REPLY"
    return "OK" if got == expected else "BAD_REPLY"


@dataclass
class LoadResult:
    results: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)

    def merge(self, other: LoadResult) -> None:
        self.results.update(other.results)
        self.latencies += other.latencies

    @property
    def errors(self) -> int:
        return sum(n for code, n in self.results.items() if code != "OK")


def run_load(
    address: str,
    ca: bytes,
    ev: asps_client.Evidence,
    callers: int,
    names: list[str],
    expected: dict[str, bytes],
    claimed: Any,
    done: Any,
    total: int,
) -> LoadResult:
    """`callers` threads, each with its own channel (its own TLS connection, like separate enclaves),
    attest until `claimed` (a multiprocessing.Value shared with other processes) reaches `total`."""
    out = LoadResult()
    lock = threading.Lock()
    creds = grpc.ssl_channel_credentials(root_certificates=ca)

    def loop() -> None:
        channel = grpc.secure_channel(address, creds)
        stub = asps_pb2_grpc.SecretProvisionStub(channel)
        try:
            while True:
                with claimed.get_lock():
                    if claimed.value >= total:
                        return
                    claimed.value += 1
                t0 = time.perf_counter()
                code = attest_once(stub, ev, names, expected)
                dt = time.perf_counter() - t0
                with lock:
                    out.results[code] += 1
                    out.latencies.append(dt)
                with done.get_lock():
                    done.value += 1
        finally:
            channel.close()

    threads = [threading.Thread(target=loop, name=f"caller-{i}") for i in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _process_main(
    address: str,
    ca: bytes,
    sim_dir: str,
    callers: int,
    names: list[str],
    expected: dict[str, bytes],
    claimed: Any,
    done: Any,
    total: int,
    results: Any,
) -> None:
    ev = asps_client.make_evidence("sim", sim_dir=sim_dir)
    r = run_load(address, ca, ev, callers, names, expected, claimed, done, total)
    results.put((dict(r.results), r.latencies))


def rss_kib(pid: int) -> int:
    """Resident set size of `pid` in KiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def drive(
    address: str,
    ca: bytes,
    sim_dir: str,
    *,
    total: int,
    callers: int,
    procs: int,
    names: list[str],
    expected: dict[str, bytes],
    server_pid: int,
    checkpoint: int,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[LoadResult, int | None, int, float]:
    """Run the load in `procs` processes (0: threads of this process); returns the merged result, the
    server RSS (KiB) once `checkpoint` attestations are done, the RSS at the end, and the seconds."""
    ctx = multiprocessing.get_context("spawn")  # never fork a process that runs gRPC
    claimed, done = ctx.Value("q", 0), ctx.Value("q", 0)
    out = LoadResult()
    t0 = time.monotonic()
    if procs <= 0:
        ev = asps_client.make_evidence("sim", sim_dir=sim_dir)
        box: dict[str, LoadResult] = {}
        runner = threading.Thread(
            target=lambda: box.setdefault(
                "r", run_load(address, ca, ev, callers, names, expected, claimed, done, total)
            )
        )
        runner.start()
        alive: Callable[[], bool] = runner.is_alive
        workers: list[Any] = []
    else:
        results = ctx.Queue()
        per = [callers // procs + (1 if i < callers % procs else 0) for i in range(procs)]
        workers = [
            ctx.Process(
                target=_process_main,
                args=(address, ca, sim_dir, n, names, expected, claimed, done, total, results),
            )
            for n in per
            if n
        ]
        for w in workers:
            w.start()
        alive = lambda: any(w.is_alive() for w in workers)  # noqa: E731
    rss_checkpoint: int | None = None
    last_report = time.monotonic()
    collected = 0
    while True:
        n = done.value
        if rss_checkpoint is None and n >= checkpoint:
            rss_checkpoint = rss_kib(server_pid)
        if progress and time.monotonic() - last_report >= 5:
            progress(n, time.monotonic() - t0)
            last_report = time.monotonic()
        if procs > 0:
            while collected < len(workers):
                try:
                    codes, lat = results.get(timeout=0.05)
                except Exception:  # queue.Empty
                    break
                out.merge(LoadResult(Counter(codes), lat))
                collected += 1
        if not alive() and (procs <= 0 or collected == len(workers)):
            break
        time.sleep(0.02)
    elapsed = time.monotonic() - t0
    if procs <= 0:
        runner.join()
        out.merge(box["r"])
    else:
        for w in workers:
            w.join()
    if rss_checkpoint is None:  # fewer attestations than the checkpoint
        rss_checkpoint = rss_kib(server_pid)
    return out, rss_checkpoint, rss_kib(server_pid), elapsed


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def scrape(port: int) -> dict[str, float]:
    """The server's metrics as {name{labels}: value}."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


class SoakServer:
    """asps_server.py as a subprocess with a Vault policy; stderr (audit lines) goes to a file."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.log_path = workdir / "server.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "asps_server.py")],
            cwd=REPO,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "Server listening" not in line:
            self.stop()
            raise RuntimeError(f"server did not start: {line!r}\n{self.log_path.read_text()[-3000:]}")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._log.close()
        return rc


def setup(
    workdir: Path, bao: Any, *, metrics_port: int, grpc_port: int, threads: int = 16
) -> tuple[Any, ...]:
    """Sim platform, TLS, one app's secret in OpenBao, the policy; returns (server env, ca, sim dir,
    names, expected values)."""
    import asps_server
    import sgxsim

    sim = sgxsim.SimPlatform.init(workdir / "sim")
    coll = sim.directory / "collateral.json"
    if not coll.exists():
        coll.write_text(sim.collateral().to_json())
    certs = asps_server.generate_demo_certs(workdir / "certs")
    value = "soak-" + secrets.token_hex(16)
    bao.enable_kv("soak", version=1)
    bao.kv_put("soak/master", {"key": value})
    bao.read_policy("soak-app", "soak/*")
    policy = {
        "kms": "vault",
        "addr": bao.addr,
        "timeout": 5,
        "app_list": [
            {
                "id": "soak",
                "mr_enclave": sgxsim.DEFAULT_MR_ENCLAVE.hex(),
                "app_token": bao.create_token(["soak-app"]),
                "secrets": {"master_key": "soak/master"},
            }
        ],
    }
    import json

    policy_path = workdir / "policy_soak.json"
    policy_path.write_text(json.dumps(policy))
    policy_path.chmod(0o600)
    env = {
        "ASPS_HOST": f"127.0.0.1:{grpc_port}",
        "ASPS_CERT": str(certs / "server.crt"),
        "ASPS_KEY": str(certs / "server.key"),
        "ASPS_POLICY": str(policy_path),
        "ASPS_COLLATERAL": str(coll),
        "ASPS_ROOT_CA": str(sim.directory / "root_ca.pem"),
        "ASPS_METRICS_PORT": str(metrics_port),
        "ASPS_THREADS": str(threads),
        "ASPS_LOG_FORMAT": "json",
    }
    return (
        env,
        (certs / "ca.crt").read_bytes(),
        str(sim.directory),
        ["master_key"],
        {"master_key": value.encode()},
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--total", type=int, default=20_000, help="attestations (default %(default)s)")
    ap.add_argument("--callers", type=int, default=32, help="concurrent callers (default %(default)s)")
    ap.add_argument(
        "--procs", type=int, default=4, help="client processes sharing the callers (default %(default)s)"
    )
    ap.add_argument(
        "--checkpoint", type=int, default=5_000, help="RSS baseline after this many (default %(default)s)"
    )
    ap.add_argument("--max-growth", type=float, default=0.10, help="allowed RSS growth (default %(default)s)")
    ap.add_argument("--threads", type=int, default=16, help="server request threads (default %(default)s)")
    ap.add_argument(
        "--evidence-cache",
        type=int,
        default=None,
        help="server --evidence-cache (0: verify every quote in full; default: the server's)",
    )
    args = ap.parse_args(argv)

    from openbao import OpenBao, free_port

    with tempfile.TemporaryDirectory(prefix="asps-soak-") as tmp, OpenBao(Path(tmp) / "bao") as bao:
        workdir = Path(tmp)
        metrics_port, grpc_port = free_port(), free_port()
        env, ca, sim_dir, names, expected = setup(
            workdir, bao, metrics_port=metrics_port, grpc_port=grpc_port, threads=args.threads
        )
        if args.evidence_cache is not None:
            env["ASPS_EVIDENCE_CACHE"] = str(args.evidence_cache)
        server = SoakServer(workdir, env)
        try:
            print(
                f"soak: {args.total} attestations, {args.callers} callers in {max(args.procs, 1)} "
                f"process(es), server pid {server.proc.pid}, OpenBao {bao.addr}",
                flush=True,
            )
            result, rss_cp, rss_end, elapsed = drive(
                f"localhost:{grpc_port}",
                ca,
                sim_dir,
                total=args.total,
                callers=args.callers,
                procs=args.procs,
                names=names,
                expected=expected,
                server_pid=server.proc.pid,
                checkpoint=args.checkpoint,
                progress=lambda n, t: print(f"  {n:>6} done, {n / t:6.0f}/s", flush=True),
            )
            metrics = scrape(metrics_port)
        finally:
            rc = server.stop()
    n = sum(result.results.values())
    growth = (rss_end - rss_cp) / rss_cp if rss_cp else float("inf")
    granted = metrics.get("asps_attestations_total{code=OK,protocol=asps.v1,result=granted,step=none}", 0)
    print(f"attestations: {n} in {elapsed:.1f} s = {n / elapsed:.0f}/s; results {dict(result.results)}")
    print(
        f"latency: p50 {statistics.median(result.latencies) * 1000:.1f} ms, "
        f"p99 {percentile(result.latencies, 0.99) * 1000:.1f} ms"
    )
    print(
        f"server RSS after {args.checkpoint}: {rss_cp / 1024:.1f} MiB; after {n}: {rss_end / 1024:.1f} MiB "
        f"({growth:+.1%}, limit {args.max_growth:.0%})"
    )
    print(f"server metrics: granted {granted:.0f}, exit code {rc}")
    failed = []
    if result.errors or n != args.total:
        failed.append(f"{result.errors} error(s), {n} of {args.total} attempted")
    if growth > args.max_growth:
        failed.append(f"RSS grew {growth:.1%} > {args.max_growth:.0%}")
    if granted != n:
        failed.append(f"server counted {granted:.0f} granted, callers {n}")
    if rc != 0:
        failed.append(f"server exited {rc} on SIGTERM")
    if failed:
        print("FAIL: " + "; ".join(failed))
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
