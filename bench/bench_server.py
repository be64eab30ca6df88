"""Benchmark (not a test): ASPS attestations per second against this machine's ceiling, same run.

One attestation, as an enclave does it: GetChallenge, GetSecrets (evidence + signature over the
transcript), then opening the HPKE-sealed bundle.  The callers run in several client processes
(multiprocessing, spawn), each caller a thread with its own TLS channel and its own pre-made sim
evidence, so the client side costs one ECDSA signature and one HPKE open per attestation.

Servers (subprocesses, so their CPU time and peak RSS can be read from /proc):
  asps      asps_server.py with a simulated SGX root, a JSON (or --kms vault: local OpenBao) KMS
  ceiling   a bare gRPC-over-TLS server in Python answering the same two RPCs with no work (a fixed
            token, fixed sealed bytes): the most this machine gives this traffic shape in Python.
            Served as ASPS serves: grpc.aio on an event-loop thread, GetSecrets through a thread pool

Both get the same process layout (--replicas, --workers) and thread count.  Loopback only; every
level is bounded by --duration seconds and --max-requests attestations.

Usage:  .venv/bin/python bench/bench_server.py [--callers 1,8,32] [--duration 5] [--workers N]
                                               [--replicas N] [--kms json|vault] [--json]
                                               [--server-script OLD/asps_server.py]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SECRET_VALUE = "bench-" + "ab" * 16  # inline JSON KMS value; the number of bytes is what matters


# --- the client side (runs in spawned client processes) ---------------------------------------------


@dataclass(frozen=True)
class CallerSpec:
    address: str
    evidence: tuple[tuple[bytes, bytes], ...]  # (certificate DER, private key PEM), used in turn
    open_key: bytes | None  # ceiling: the fixed bundle is sealed to this key (PEM), not the caller's


def _caller(
    spec: CallerSpec,
    ca: bytes,
    names: list[str],
    warmed: threading.Barrier,
    start: threading.Event,
    stop_at: list[float],
    cap: int,
    out: list[float],
    errors: list[str],
) -> None:
    import grpc
    from cryptography.hazmat.primitives import serialization

    import asps_client
    import asps_pb2
    import asps_pb2_grpc
    import asps_wire

    keys = [(der, serialization.load_pem_private_key(pem, None)) for der, pem in spec.evidence]
    open_key = serialization.load_pem_private_key(spec.open_key, None) if spec.open_key else None
    channel = grpc.secure_channel(
        spec.address,
        grpc.ssl_channel_credentials(root_certificates=ca),
        options=[("grpc.ssl_target_name_override", "localhost")],
    )
    stub = asps_pb2_grpc.SecretProvisionStub(channel)

    def once(i: int) -> None:
        der, key = keys[i % len(keys)]
        token = stub.GetChallenge(asps_pb2.ChallengeRequest(), timeout=30).token
        sig = asps_wire.sign_transcript(key, asps_wire.transcript(token, der, names))
        reply = stub.GetSecrets(
            asps_pb2.SecretsRequest(evidence=der, token=token, names=names, signature=sig), timeout=30
        )
        got = asps_client.open_bundle(open_key or key, reply.sealed, token)
        if set(got) != set(names):
            raise RuntimeError("bundle does not hold the names asked for")

    try:
        for i in range(len(keys)):  # warm-up: TLS handshake, and each evidence once
            once(i)
    except Exception as e:  # a broken setup shows up as errors, not as a hang
        errors.append(f"warm-up: {type(e).__name__}: {str(e)[:200]}")
        cap = 0  # nothing to measure
    warmed.wait()
    start.wait()
    i, deadline = 0, stop_at[0]
    while i < cap and time.perf_counter() < deadline:
        t0 = time.perf_counter()
        try:
            once(i)
        except Exception as e:
            errors.append(f"{type(e).__name__}: {str(e)[:200]}")
        else:
            out.append(time.perf_counter() - t0)
        i += 1
    channel.close()


def client_process(
    specs: list[CallerSpec],
    ca: bytes,
    names: list[str],
    duration: float,
    cap: int,
    ready: Any,
    go: Any,
    results: Any,
) -> None:
    """Runs its callers as threads; reports (latencies, errors, wall time) on `results`."""
    warmed = threading.Barrier(len(specs) + 1)
    start = threading.Event()
    stop_at = [0.0]
    lat: list[list[float]] = [[] for _ in specs]
    errs: list[str] = []
    threads = [
        threading.Thread(target=_caller, args=(s, ca, names, warmed, start, stop_at, cap, lat[k], errs))
        for k, s in enumerate(specs)
    ]
    for t in threads:
        t.start()
    warmed.wait()
    ready.put(os.getpid())
    go.wait()
    t0 = time.perf_counter()
    stop_at[0] = t0 + duration
    start.set()
    for t in threads:
        t.join()
    results.put(([x for xs in lat for x in xs], errs, time.perf_counter() - t0))


# --- servers (subprocesses) ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def asps_flags(port: int, certs: Path, policy: Path, sim_dir: Path) -> list[str]:
    """asps_server.py's flags as every benchmark starts it: loopback `port`, the demo TLS pair in
    `certs`, a policy file, and a simulated platform's collateral and root in `sim_dir`."""
    return [
        "--host",
        f"127.0.0.1:{port}",
        "--cert",
        str(certs / "server.crt"),
        "--key",
        str(certs / "server.key"),
        "--policy",
        str(policy),
        "--collateral",
        str(sim_dir / "collateral.json"),
        "--root-ca",
        str(sim_dir / "root_ca.pem"),
    ]


def proc_tree(pid: int) -> list[int]:
    """pid and all its descendants (workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError):
                todo += [int(c) for c in (task / "children").read_text().split()]
    return out


def cpu_seconds(pids: list[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def peak_rss_mib(pids: list[int]) -> float:
    """Sum over the processes of VmHWM (each process's peak resident set)."""
    total = 0
    for p in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
    return total / 1024


class Server:
    """A server subprocess (asps_server.py or the ceiling) on one port; stop() sends SIGTERM."""

    def __init__(self, argv: list[str], env: dict[str, str], port: int, log: Path) -> None:
        self.port = port
        self.log = log.open("ab")
        self.proc = subprocess.Popen(
            argv, cwd=REPO, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=self.log, text=True
        )

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"server exited with {self.proc.wait()}; see {self.log.name}")
            if "listening on" in line.lower():
                threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # keep draining
                return
        raise RuntimeError("server did not start in time")

    def pids(self) -> list[int]:
        return proc_tree(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def ceiling_main(argv: list[str]) -> int:
    """The bare server: same TLS, same message limits and thread count, a fixed answer to each RPC."""


    ap = argparse.ArgumentParser()
    for opt in ("--host", "--cert", "--key", "--reply-file"):
        ap.add_argument(opt, required=True)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--reuse", action="store_true", help="SO_REUSEPORT (set in each of --workers)")
    args = ap.parse_args(argv)
    token, sealed = json.loads(Path(args.reply_file).read_text()).values()
    token, sealed = bytes.fromhex(token), bytes.fromhex(sealed)
    if args.workers > 1:
        children = [
            subprocess.Popen(
                [sys.executable, __file__, "_ceiling", *_without_workers(argv)],
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(args.workers)
        ]
        signal.signal(signal.SIGTERM, lambda *_: [c.terminate() for c in children])
        for c in children:
            assert c.stdout is not None
            if "listening" not in c.stdout.readline():
                return 1
        print(f"ceiling listening on {args.host} ({args.workers} workers)", flush=True)
        for c in children:
            c.wait()
        return 0

    return asyncio_ceiling(args, token, sealed)


def asyncio_ceiling(args: argparse.Namespace, token: bytes, sealed: bytes) -> int:
    """Served the way asps_server.py serves (issue 11): a grpc.aio server on an event loop that runs
    on a thread of its own, GetChallenge answered on the loop, GetSecrets handed to a pool of
    --threads threads (where ASPS verifies, reads the KMS and seals) which returns the fixed answer."""
    import asyncio

    import grpc

    import asps_pb2
    import asps_pb2_grpc

    pool = futures.ThreadPoolExecutor(max_workers=args.threads, thread_name_prefix="ceiling")

    def fixed_reply() -> tuple[str, bytes]:
        return "1", sealed

    class Bare(asps_pb2_grpc.SecretProvisionServicer):
        async def GetChallenge(self, request, context):
            return asps_pb2.Challenge(token=token, expires_at=2**40)

        async def GetSecrets(self, request, context):
            app_id, reply = await asyncio.wrap_future(pool.submit(fixed_reply))
            return asps_pb2.SecretsReply(app_id=app_id, sealed=reply)

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name="ceiling-loop", daemon=True).start()

    async def start() -> grpc.aio.Server:
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", 256 * 1024),
                ("grpc.so_reuseport", 1 if args.reuse else 0),
            ],
            maximum_concurrent_rpcs=max(64, args.threads * 16),
        )
        asps_pb2_grpc.add_SecretProvisionServicer_to_server(Bare(), server)
        creds = grpc.ssl_server_credentials([(Path(args.key).read_bytes(), Path(args.cert).read_bytes())])
        server.add_secure_port(args.host, creds)
        await server.start()
        return server

    server = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    print(f"ceiling listening on {args.host}", flush=True)
    done.wait()
    asyncio.run_coroutine_threadsafe(server.stop(1), loop).result(10)
    pool.shutdown(wait=False)
    return 0


def _without_workers(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--workers":
            skip = True
            continue
        out.append(a)
    return [*out, "--reuse"]


# --- setup ----------------------------------------------------------------------------------------


@dataclass
class Setup:
    tmp: Path
    certs: Path
    sim_dir: Path
    policy: Path
    names: list[str]
    ceiling_reply: Path
    ceiling_key_pem: bytes
    bao: Any = None


def make_setup(tmp: Path, kms: str, cache_ttl: float = 0) -> Setup:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    import asps_server
    import sgxsim

    plat = sgxsim.SimPlatform.init(tmp / "sim")
    (plat.directory / "collateral.json").write_text(plat.collateral().to_json())
    certs = asps_server.generate_demo_certs(tmp / "certs")
    names = ["master_key"]
    app: dict[str, Any] = {"id": 1, "mr_enclave": sgxsim.DEFAULT_MR_ENCLAVE.hex()}
    bao = None
    if kms == "vault":
        sys.path.insert(0, str(REPO / "tests"))
        from openbao import OpenBao

        bao = OpenBao(tmp / "openbao")
        bao.start()
        bao.enable_kv("occlum/1", version=1)
        bao.kv_put("occlum/1/image_key", {"key": SECRET_VALUE})
        bao.read_policy("app1", "occlum/1/*")
        app |= {"app_token": bao.create_token(["app1"]), "secrets": {"master_key": "occlum/1/image_key"}}
        doc = {"kms": "vault", "addr": bao.addr, "auth_method": "token", "app_list": [app]}
        if cache_ttl:  # the opt-in value cache (policy field cache_ttl; off by default)
            doc["cache_ttl"] = cache_ttl
    else:
        doc = {"kms": "none", "app_list": [app | {"secrets": {"master_key": SECRET_VALUE}}]}
    policy = tmp / "policy.json"
    policy.write_text(json.dumps(doc))
    # The ceiling's fixed reply: a real sealed bundle of the same size, to one shared key.
    key = ec.generate_private_key(ec.SECP256R1())
    token = b"\x01" + secrets.token_bytes(56)
    sealed = asps_server.seal(
        asps_server.sealing_suite(key.public_key()),
        key.public_key(),
        {"master_key": SECRET_VALUE.encode()},
        token,
    )
    reply = tmp / "ceiling_reply.json"
    reply.write_text(json.dumps({"token": token.hex(), "sealed": sealed.hex()}))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return Setup(tmp, certs, plat.directory, policy, names, reply, key_pem, bao)


def make_evidence(setup: Setup, count: int) -> list[tuple[bytes, bytes]]:
    from cryptography.hazmat.primitives import serialization

    import asps_client

    out = []
    for _ in range(count):
        ev = asps_client.make_evidence("sim", sim_dir=str(setup.sim_dir))
        pem = ev.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        out.append((ev.cert_der, pem))
    return out


def _profiler(args: argparse.Namespace) -> list[str]:
    """The prefix that runs the server under bench/cprofile_threads.py (--profile-server), or none."""
    if not args.profile_server:
        return []
    return [str(REPO / "bench" / "cprofile_threads.py"), str(args.profile_server)]


def start_servers(kind: str, setup: Setup, args: argparse.Namespace, token_key: str) -> list[Server]:
    servers = []
    for r in range(args.replicas):
        port = free_port()
        log = setup.tmp / f"{kind}-{r}.log"
        if kind.startswith("asps"):
            argv = [
                sys.executable,
                *_profiler(args),
                str(args.server_script),
                *asps_flags(port, setup.certs, setup.policy, setup.sim_dir),
                "--threads",
                str(args.threads),
                *args.server_arg,
            ]
            if args.workers > 1:
                argv += ["--workers", str(args.workers)]
            if kind == "asps-nocache":  # the same server verifying every evidence in full
                argv += ["--evidence-cache", "0"]
        else:
            argv = [
                sys.executable,
                __file__,
                "_ceiling",
                "--host",
                f"127.0.0.1:{port}",
                "--cert",
                str(setup.certs / "server.crt"),
                "--key",
                str(setup.certs / "server.key"),
                "--reply-file",
                str(setup.ceiling_reply),
                "--threads",
                str(args.threads),
                "--workers",
                str(args.workers),
            ]
        servers.append(Server(argv, {"ASPS_TOKEN_KEY": token_key}, port, log))
    for s in servers:
        s.wait_ready()
    return servers


# --- one measurement --------------------------------------------------------------------------------


@dataclass
class Row:
    server: str
    callers: int
    attestations: int
    errors: int
    rate: float  # attestations per second
    p50_ms: float
    p99_ms: float
    server_cpu_s: float
    server_cpu_ms_per_att: float
    peak_rss_mib: float
    server_cores: float = float("nan")  # server CPU seconds / wall seconds: ~1.0 in one process = GIL-bound
    first_error: str = ""
    kms_cpu_ms_per_att: float = float("nan")  # OpenBao's own CPU (--kms vault, asps rows), same cores


def run_level(
    kind: str,
    servers: list[Server],
    setup: Setup,
    callers: int,
    evidence: list[list[tuple]],
    args: argparse.Namespace,
) -> Row:
    ctx = mp.get_context("spawn")
    procs_n = max(1, min(callers, args.client_procs))
    ca = (setup.certs / "ca.crt").read_bytes()
    specs = []
    for c in range(callers):
        addr = f"127.0.0.1:{servers[c % len(servers)].port}"
        specs.append(
            CallerSpec(addr, tuple(evidence[c]), setup.ceiling_key_pem if kind == "ceiling" else None)
        )
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    cap = max(1, args.max_requests // callers)
    procs = [
        ctx.Process(
            target=client_process,
            args=(specs[p::procs_n], ca, setup.names, args.duration, cap, ready, go, results),
            daemon=True,
        )
        for p in range(procs_n)
    ]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=120)
    pids = [p for s in servers for p in s.pids()]
    bao_pid = setup.bao.pid if setup.bao is not None and kind.startswith("asps") else None
    kms_pids = proc_tree(bao_pid) if bao_pid else []
    cpu0, kms_cpu0 = cpu_seconds(pids), cpu_seconds(kms_pids)
    go.set()
    lat: list[float] = []
    errs: list[str] = []
    wall = 0.0
    for _ in procs:
        got_lat, got_errs, got_wall = results.get(timeout=args.duration + 120)
        lat += got_lat
        errs += got_errs
        wall = max(wall, got_wall)
    cpu = cpu_seconds(pids) - cpu0
    kms_cpu = cpu_seconds(kms_pids) - kms_cpu0
    for p in procs:
        p.join(timeout=30)
    lat.sort()
    n = len(lat)

    def pct(q: float) -> float:
        return lat[min(n - 1, int(q * n))] * 1000 if n else float("nan")

    return Row(
        kind,
        callers,
        n,
        len(errs),
        n / wall if wall else 0.0,
        pct(0.50),
        pct(0.99),
        round(cpu, 2),
        cpu / n * 1000 if n else float("nan"),
        round(peak_rss_mib(pids), 1),
        cpu / wall if wall else float("nan"),
        errs[0] if errs else "",
        kms_cpu / n * 1000 if n and kms_pids else float("nan"),
    )


# --- main ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_ceiling"]:
        return ceiling_main(argv[1:])
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    ap.add_argument("--callers", default="1,8,32", help="concurrent callers per level (default %(default)s)")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per level (default %(default)s)")
    ap.add_argument("--max-requests", type=int, default=100_000, help="attestations per level at most")
    ap.add_argument("--client-procs", type=int, default=4, help="client processes at most (default 4)")
    ap.add_argument(
        "--evidence-per-caller",
        type=int,
        default=1,
        help="distinct evidence certificates each caller cycles through (default 1: every "
        "attestation of a caller re-sends its certificate, as a restarting enclave would not)",
    )
    ap.add_argument("--workers", type=int, default=1, help="server processes per replica (--workers)")
    ap.add_argument("--replicas", type=int, default=1, help="servers on different ports, callers round-robin")
    ap.add_argument("--threads", type=int, default=16, help="request threads per server process")
    ap.add_argument("--kms", choices=("json", "vault"), default="json")
    ap.add_argument(
        "--cache-ttl",
        type=float,
        default=0,
        help="with --kms vault: the policy's cache_ttl (seconds a value read is kept; default 0: off)",
    )
    ap.add_argument(
        "--servers",
        default="asps,ceiling",
        help="which servers to run: asps, asps-nocache (--evidence-cache 0), ceiling (default %(default)s)",
    )
    ap.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra asps_server.py argument (repeatable), e.g. --server-arg=--evidence-cache=0",
    )
    ap.add_argument(
        "--server-script",
        type=Path,
        default=REPO / "asps_server.py",
        help="the asps_server.py to run (e.g. an older commit's, for a before/after table; it "
        "imports kms.py and the rest from its own directory)",
    )
    ap.add_argument(
        "--profile-server",
        type=Path,
        help="write a CPU profile of every server thread to this file (bench/cprofile_threads.py); "
        "slows the server down: for where the time goes, not for rates",
    )
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.callers.split(",") if x]
    kinds = [k for k in args.servers.split(",") if k]

    rows: list[Row] = []
    load_at_start = os.getloadavg()[0]  # a shared machine's other work shows here
    with tempfile.TemporaryDirectory(prefix="bench-asps-") as tmpdir:
        setup = make_setup(Path(tmpdir), args.kms, args.cache_ttl)
        try:
            evidence = [make_evidence(setup, args.evidence_per_caller) for _ in range(max(levels))]
            token_key = secrets.token_hex(32)
            # Every server runs for the whole benchmark and the kinds take turns at each level, so
            # that a change in the machine's load (other work on a shared box) hits both alike.
            running: dict[str, list[Server]] = {}
            try:
                for kind in kinds:
                    running[kind] = start_servers(kind, setup, args, token_key)
                for callers in levels:
                    for kind in kinds:
                        row = run_level(kind, running[kind], setup, callers, evidence, args)
                        rows.append(row)
                        if not args.json:
                            print(
                                f"  {kind:12} callers={callers:3}  {row.rate:7.1f}/s  "
                                f"p50 {row.p50_ms:6.1f} ms  p99 {row.p99_ms:6.1f} ms  errors {row.errors}",
                                file=sys.stderr,
                                flush=True,
                            )
            finally:
                for servers in running.values():
                    for s in servers:
                        s.stop()
        finally:
            if setup.bao is not None:
                setup.bao.close()
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=1))
        return 0
    cache_note = f" cache_ttl={args.cache_ttl:g}" if args.cache_ttl else ""
    print(
        f"ASPS vs ceiling: {args.kms} KMS{cache_note}, replicas={args.replicas} workers={args.workers} "
        f"threads={args.threads}, {args.duration:g} s per level, nproc={os.cpu_count()}, "
        f"load average {load_at_start:.1f} at start"
    )
    head = (
        f"{'server':12} {'callers':>7} {'att/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} "
        f"{'srv CPU s':>9} {'CPU ms/att':>10} {'srv cores':>9} {'peak RSS MiB':>12}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r.server:12} {r.callers:7} {r.rate:8.1f} {r.p50_ms:7.1f} {r.p99_ms:7.1f} {r.errors:6} "
            f"{r.server_cpu_s:9.2f} {r.server_cpu_ms_per_att:10.2f} {r.server_cores:9.2f} "
            f"{r.peak_rss_mib:12.1f}"
        )
    by = {(r.server, r.callers): r for r in rows}
    for c in levels:
        a, b = by.get(("asps", c)), by.get(("ceiling", c))
        if a and b and b.rate:
            print(f"ratio ASPS/ceiling at {c:2} callers: {a.rate / b.rate:.2f}")
    for r in rows:
        if r.kms_cpu_ms_per_att == r.kms_cpu_ms_per_att:  # not NaN
            where = f"{r.server}, {r.callers} callers"
            print(f"OpenBao CPU per attestation ({where}): {r.kms_cpu_ms_per_att:.2f} ms")
    for r in rows:
        if r.first_error:
            print(f"first error ({r.server}, {r.callers} callers): {r.first_error}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
