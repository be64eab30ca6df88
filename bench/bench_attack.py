"""Benchmark (not a test): what legitimate enclaves see while the service is under attack.

A few legitimate callers attest in a loop (GetChallenge, GetSecrets, open the sealed bundle; each call
under a 2 s deadline) against asps_server.py (a subprocess: sim SGX root, JSON KMS), first with no
attack, then during each attack in turn, then during all of them together:

  bodyless    HTTP/2 streams that send headers and never a body (tests/h2raw.py), reopened as the
              server ends them, on --attack-conns connections (as many streams as each allows)
  silent      TLS connections that say nothing (--silent of them), reopened as the server closes them
  flood       GetChallenge as fast as --flooders callers can send it
  malformed   GetSecrets with an oversized message, bytes that are no protobuf, a string field that
              is not UTF-8, and garbage evidence, in turn, as fast as --flooders callers can
  refused     genuine quotes of an enclave the policy does not know, full attestations at full speed
              (--flooders callers), the work the replay-cache fix was about

Attackers run in their own processes (spawn), so they do not share the callers' GIL. For each row:
legitimate attestations, success rate, p50/p99 latency of a whole attestation, and what the attackers
got done. Loopback only; each row is bounded by --duration seconds, every count by its flag.

Usage:  .venv/bin/python bench/bench_attack.py [--duration 5] [--callers 4] [--threads 16]
                                               [--attack-conns 4] [--silent 64] [--flooders 2]
                                               [--only bodyless,refused] [--server-script PATH] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "bench")]

from bench_server import asps_flags, free_port  # noqa: E402

ATTACKS = ("bodyless", "silent", "flood", "malformed", "refused")
DEADLINE = 2.0
GET_SECRETS = "/asps.v1.SecretProvision/GetSecrets"
GET_CHALLENGE = "/asps.v1.SecretProvision/GetChallenge"


# --- attackers (each in a spawned process; returns how many attacking operations it made) ----------


def _attack(kind: str, port: int, ca: bytes, seconds: float, opts: dict[str, Any], out: Any) -> None:
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
    stop_at = time.monotonic() + seconds
    fn = {
        "bodyless": _bodyless,
        "silent": _silent,
        "flood": _flood,
        "malformed": _malformed,
        "refused": _refused,
    }[kind]
    try:
        out.put((kind, fn(port, ca, stop_at, opts)))
    except Exception as e:  # report, never hang the bench
        out.put((kind, f"error: {e!r}"))


def _bodyless(port: int, ca: bytes, stop_at: float, opts: dict[str, Any]) -> int:
    import h2raw

    opened = 0
    conns: list[Any] = []
    open_now: dict[int, set[int]] = {}
    while time.monotonic() < stop_at:
        conns = [c for c in conns if not c.eof]
        while len(conns) < opts["attack_conns"]:
            try:
                c = h2raw.RawH2("127.0.0.1", port, ca)
            except OSError:
                time.sleep(0.05)
                break
            c.pump(0.1)
            conns.append(c)
            open_now[id(c)] = set()
        for c in conns:
            live = open_now.setdefault(id(c), set())
            for f in c.pump(0.02):
                if f.type == h2raw.RST_STREAM or (f.type == h2raw.HEADERS and f.flags & h2raw.END_STREAM):
                    live.discard(f.stream)
            limit = min(c.settings().get(h2raw.SETTINGS_MAX_CONCURRENT_STREAMS, 100), 1000)
            while len(live) < limit and c.next_stream < 2**30:
                try:
                    live.add(c.open_stream(GET_SECRETS if opened % 2 else GET_CHALLENGE))
                except OSError:
                    c.eof = True
                    break
                opened += 1
    for c in conns:
        c.close()
    return opened


def _silent(port: int, ca: bytes, stop_at: float, opts: dict[str, Any]) -> int:
    import h2raw

    opened = 0
    conns: list[Any] = []
    while time.monotonic() < stop_at:
        kept = []
        for c in conns:
            if c.closed_within(0.001):
                c.close()
            else:
                kept.append(c)
        conns = kept
        while len(conns) < opts["silent"] and time.monotonic() < stop_at:
            try:
                conns.append(h2raw.SilentTls("127.0.0.1", port, timeout=5))
                opened += 1
            except OSError:
                break
        time.sleep(0.2)
    for c in conns:
        c.close()
    return opened


def _stub_threads(port: int, ca: bytes, stop_at: float, n: int, one: Any) -> int:
    import grpc

    counts = [0] * n

    def run(i: int) -> None:
        opts = [("grpc.max_send_message_length", 1024 * 1024)]
        with grpc.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(ca), options=opts) as ch:
            k = 0
            while time.monotonic() < stop_at:
                with contextlib.suppress(grpc.RpcError):
                    one(ch, k)
                k += 1
                counts[i] += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts)


def _flood(port: int, ca: bytes, stop_at: float, opts: dict[str, Any]) -> int:
    import asps_pb2
    import asps_pb2_grpc

    def one(ch: Any, _k: int) -> None:
        asps_pb2_grpc.SecretProvisionStub(ch).GetChallenge(asps_pb2.ChallengeRequest(), timeout=5)

    return _stub_threads(port, ca, stop_at, opts["flooders"], one)


def _malformed(port: int, ca: bytes, stop_at: float, opts: dict[str, Any]) -> int:
    import asps_pb2

    bad_utf8 = asps_pb2.SecretsRequest(evidence=b"x", token=b"t", signature=b"s").SerializeToString()
    bad_utf8 += b"\x1a\x02\xff\xfe"  # field 3 (names, string): two bytes that are not UTF-8
    payloads = [
        b"\x0a" + b"\xff" * 9 + b"\x01",  # not a protobuf (overlong varint)
        bad_utf8,
        asps_pb2.SecretsRequest(
            evidence=os.urandom(2000), token=os.urandom(57), names=["k"], signature=os.urandom(64)
        ).SerializeToString(),
        asps_pb2.SecretsRequest(evidence=b"\x00" * (300 * 1024)).SerializeToString(),  # over 256 KiB
    ]

    def one(ch: Any, k: int) -> None:
        call = ch.unary_unary(GET_SECRETS, request_serializer=None, response_deserializer=None)
        call(payloads[k % len(payloads)], timeout=5)

    return _stub_threads(port, ca, stop_at, opts["flooders"], one)


def _refused(port: int, ca: bytes, stop_at: float, opts: dict[str, Any]) -> int:
    from cryptography.hazmat.primitives import serialization

    import asps_pb2
    import asps_pb2_grpc
    import asps_wire

    cert_der, key_pem = opts["unknown"]
    key = serialization.load_pem_private_key(key_pem, None)

    def one(ch: Any, _k: int) -> None:
        stub = asps_pb2_grpc.SecretProvisionStub(ch)
        token = stub.GetChallenge(asps_pb2.ChallengeRequest(), timeout=5).token
        sig = asps_wire.sign_transcript(key, asps_wire.transcript(token, cert_der, ["k"]))
        req = asps_pb2.SecretsRequest(evidence=cert_der, token=token, names=["k"], signature=sig)
        stub.GetSecrets(req, timeout=5)

    return _stub_threads(port, ca, stop_at, opts["flooders"], one)


# --- the legitimate callers (threads of this process) ---------------------------------------------


def legitimate(port: int, ca: bytes, evidence: list[Any], seconds: float) -> tuple[list[float], int, int]:
    """(latencies of successful attestations in s, successes, failures) over `seconds`."""
    import grpc

    import asps_client
    import asps_pb2
    import asps_pb2_grpc
    import asps_wire

    lat: list[float] = []
    fails = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def run(ev: Any) -> None:
        with grpc.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(ca)) as ch:
            stub = asps_pb2_grpc.SecretProvisionStub(ch)
            while time.monotonic() < stop_at:
                t = time.monotonic()
                try:
                    token = stub.GetChallenge(asps_pb2.ChallengeRequest(), timeout=DEADLINE).token
                    sig = asps_wire.sign_transcript(
                        ev.private_key, asps_wire.transcript(token, ev.cert_der, ["k"])
                    )
                    req = asps_pb2.SecretsRequest(
                        evidence=ev.cert_der, token=token, names=["k"], signature=sig
                    )
                    reply = stub.GetSecrets(req, timeout=DEADLINE)
                    asps_client.open_bundle(ev.private_key, reply.sealed, token)
                    with lock:
                        lat.append(time.monotonic() - t)
                except grpc.RpcError:
                    with lock:
                        fails[0] += 1
                    time.sleep(0.05)

    threads = [threading.Thread(target=run, args=(ev,)) for ev in evidence]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat, len(lat), fails[0]


# --- setup and the run ------------------------------------------------------------------------------


def start_server(tmp: Path, args: argparse.Namespace) -> tuple[subprocess.Popen[str], int, bytes, Path]:
    import asps_server
    import sgxsim

    plat = sgxsim.SimPlatform.init(tmp / "sim")
    (plat.directory / "collateral.json").write_text(plat.collateral().to_json())
    certs = asps_server.generate_demo_certs(tmp / "certs")
    app = {"id": "app1", "mr_enclave": sgxsim.DEFAULT_MR_ENCLAVE.hex(), "secrets": {"k": "bench-value"}}
    (tmp / "policy.json").write_text(json.dumps({"kms": "none", "app_list": [app]}))
    port = free_port()
    argv = [
        sys.executable,
        str(Path(args.server_script).resolve()),
        *asps_flags(port, certs, tmp / "policy.json", plat.directory),
        "--threads",
        str(args.threads),
        *args.server_arg,
    ]
    log = open(tmp / "server.log", "w")  # noqa: SIM115  (closed with the process)
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # an older asps_server.py finds this checkout's modules
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("Server listening on"):
            break
    else:
        raise SystemExit(f"server did not start; see {tmp / 'server.log'}")
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    return proc, port, (certs / "ca.crt").read_bytes(), plat.directory


def run_row(name: str, kinds: list[str], port: int, ca: bytes, evidence: list[Any], opts: dict, args) -> dict:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_attack, args=(k, port, ca, args.duration + 1.5, opts, out), daemon=True)
        for k in kinds
    ]
    for p in procs:
        p.start()
    if procs:
        time.sleep(1.5)  # let the attack build up before the callers start
    lat, ok, failed = legitimate(port, ca, evidence, args.duration)
    done: dict[str, Any] = {}
    for _ in procs:
        try:
            k, n = out.get(timeout=args.duration + 30)
            done[k] = n
        except Exception:
            break
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.terminate()
    lat_ms = sorted(x * 1000 for x in lat)
    total = ok + failed
    return {
        "row": name,
        "attestations": total,
        "success": ok / total if total else 0.0,
        "p50_ms": statistics.median(lat_ms) if lat_ms else None,
        "p99_ms": lat_ms[min(len(lat_ms) - 1, int(len(lat_ms) * 0.99))] if lat_ms else None,
        "attack_ops": done,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=5.0, help="seconds of legitimate traffic per row")
    p.add_argument("--callers", type=int, default=4, help="legitimate callers (threads)")
    p.add_argument("--threads", type=int, default=16, help="the server's --threads")
    p.add_argument("--attack-conns", type=int, default=4, help="connections of body-less streams")
    p.add_argument("--silent", type=int, default=64, help="silent TLS connections held")
    p.add_argument("--flooders", type=int, default=2, help="callers of each flooding attack")
    p.add_argument("--only", default=",".join(ATTACKS), help="attacks to run, comma-separated")
    p.add_argument("--server-arg", action="append", default=[], help="extra asps_server.py argument")
    p.add_argument(
        "--server-script",
        default=str(REPO / "asps_server.py"),
        help="the server to attack, e.g. an older asps_server.py (git show REV:asps_server.py) to compare",
    )
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = p.parse_args()
    if not (0 < args.duration <= 120 and 0 < args.callers <= 64 and args.silent <= 1000):
        p.error("bounded: --duration 0..120 s, --callers 1..64, --silent up to 1000")
    kinds = [k for k in args.only.split(",") if k]
    unknown_kinds = set(kinds) - set(ATTACKS)
    if unknown_kinds:
        p.error(f"unknown attack(s): {', '.join(sorted(unknown_kinds))}")

    from cryptography.hazmat.primitives import serialization

    import asps_client

    with tempfile.TemporaryDirectory(prefix="asps-attack-") as d:
        tmp = Path(d)
        proc, port, ca, sim_dir = start_server(tmp, args)
        try:
            evidence = [asps_client.make_evidence("sim", sim_dir=str(sim_dir)) for _ in range(args.callers)]
            unknown = asps_client.make_evidence("sim", sim_dir=str(sim_dir), mr_enclave=b"\x5a" * 32)
            pem = unknown.private_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            opts = vars(args) | {"unknown": (unknown.cert_der, pem)}
            legitimate(port, ca, evidence, 1.0)  # warm: connections, evidence cache
            rows = [run_row("no attack", [], port, ca, evidence, opts, args)]
            for k in kinds:
                rows.append(run_row(k, [k], port, ca, evidence, opts, args))
            if len(kinds) > 1:
                rows.append(run_row("all together", kinds, port, ca, evidence, opts, args))
        finally:
            proc.terminate()
            proc.wait(30)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    head = f"{'row':<14} {'attestations':>12} {'success':>8} {'p50 ms':>8} {'p99 ms':>8}"
    print(head + "  attackers' operations")
    for r in rows:
        p50 = f"{r['p50_ms']:.0f}" if r["p50_ms"] is not None else "-"
        p99 = f"{r['p99_ms']:.0f}" if r["p99_ms"] is not None else "-"
        ops = ", ".join(f"{k} {v}" for k, v in r["attack_ops"].items()) or "-"
        print(f"{r['row']:<14} {r['attestations']:>12} {r['success']:>8.1%} {p50:>8} {p99:>8}  {ops}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
