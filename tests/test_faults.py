"""Faults under load: a real OpenBao restarted or hanging, a PCCS going away (warm and cold), SIGHUP
and SIGTERM while callers keep attesting. Real TLS, real gRPC, concurrent callers on threads.

What is asserted is what an operator relies on: refusals are UNAVAILABLE (retry) and come within the
caller's deadline, everything else succeeds, and the server is never restarted to recover. Timing
bounds are deliberately loose (a 2-core CI machine under load)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest
from asps_testkit import (  # noqa: F401  (fixtures: env, logs)
    ENCLAVE_1,
    ENCLAVE_2,
    NOT_SERVING,
    SERVING,
    Client,
    assert_no_secret_in,
    health_of,
    module_env,
    module_logs,
    recorded_vault_tokens,
    send_reply,
    wait_health,
    write_policy,
)
from openbao import OpenBao, SilentListener, free_port, openbao_server  # noqa: F401  (fixture)

import asps_client
import asps_pb2
import asps_pb2_grpc
import asps_server
import asps_wire
import dcap
from dcap_collateral import Collateral

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
import soak  # noqa: E402

DEADLINE = 10.0  # every caller's deadline; each call must end (with its answer) well within it
SECRET = "faults-" + secrets.token_hex(12)
HEALTH_WAIT = 15.0  # how long health may take to follow the PCCS here (wait_health's timeout)
API = "/sgx/certification/v4"

pytestmark = pytest.mark.usefixtures("logs")  # every test runs under the log capture


# Values no log line may show: the secrets and every Vault token this module uses.
FORBIDDEN: list[str] = [SECRET]


@pytest.fixture(scope="module")
def bao(openbao_server: OpenBao, logs):  # noqa: F811
    openbao_server.enable_kv("faults", version=1)
    openbao_server.kv_put("faults/master", {"key": SECRET})
    openbao_server.read_policy("faults-app", "faults/*")
    with recorded_vault_tokens(openbao_server, into=FORBIDDEN):
        yield openbao_server


def server_log_has_no_secret(server: soak.SoakServer, expected: dict[str, bytes]) -> None:
    lines = server.log_path.read_text().splitlines()
    assert_no_secret_in(lines, [*FORBIDDEN, *expected.values()])


def vault_doc(addr: str, token: str, timeout: float = 1) -> dict:
    return {
        "kms": "vault",
        "addr": addr,
        "timeout": timeout,
        "app_list": [
            {
                "id": "app1",
                "mr_enclave": ENCLAVE_1.hex(),
                "app_token": token,
                "secrets": {"master_key": "faults/master"},
            }
        ],
    }


def policy_file(path: Path, doc: dict) -> Path:
    write_policy(path, doc).chmod(0o600)
    return path


@dataclass(frozen=True)
class Call:
    start: float
    end: float
    code: str
    details: str


class Load:
    """`callers` threads attesting in a loop (each with its own channel and evidence) until stopped;
    every call is recorded with its start, end and outcome."""

    def __init__(
        self,
        address: str,
        ca: bytes,
        evidence: list[asps_client.Evidence],
        *,
        expected: dict[str, bytes] | None = None,
        stop_on_error: bool = False,
    ) -> None:
        self.expected = expected or {"master_key": SECRET.encode()}
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, args=(address, ca, ev, stop_on_error), daemon=True)
            for ev in evidence
        ]

    def _loop(self, address: str, ca: bytes, ev: asps_client.Evidence, stop_on_error: bool) -> None:
        with grpc.secure_channel(address, grpc.ssl_channel_credentials(ca)) as channel:
            stub = asps_pb2_grpc.SecretProvisionStub(channel)
            while not self._stop.is_set():
                t0 = time.monotonic()
                code, details = attest(stub, ev, self.expected)
                with self._lock:
                    self.calls.append(Call(t0, time.monotonic(), code, details))
                if code != "OK" and stop_on_error:
                    return
                if code != "OK":
                    time.sleep(0.05)  # a retrying client backs off a little

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> list[Call]:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=DEADLINE * 3)
        return self.calls

    def count(self) -> int:
        with self._lock:
            return len(self.calls)


def attest(stub, ev: asps_client.Evidence, expected: dict[str, bytes] | None = None) -> tuple[str, str]:
    """One attestation for master_key: ("OK", "") or (status name, details)."""
    expected = expected or {"master_key": SECRET.encode()}
    names = list(expected)
    try:
        token = stub.GetChallenge(asps_pb2.ChallengeRequest(), timeout=DEADLINE).token
        sig = asps_wire.sign_transcript(ev.private_key, asps_wire.transcript(token, ev.cert_der, names))
        req = asps_pb2.SecretsRequest(evidence=ev.cert_der, token=token, names=names, signature=sig)
        reply = stub.GetSecrets(req, timeout=DEADLINE)
    except grpc.RpcError as e:
        return e.code().name, e.details() or ""
    got = asps_client.open_bundle(ev.private_key, reply.sealed, token)
    return ("OK" if got == expected else "BAD_REPLY"), ""


def within_deadline(calls: list[Call]) -> None:
    slow = [c for c in calls if c.end - c.start > DEADLINE * 0.8]
    assert not slow, f"calls near or past their deadline: {slow[:3]}"
    assert not [c for c in calls if c.code == "DEADLINE_EXCEEDED"]


# --- Vault ------------------------------------------------------------------------------------------


def test_vault_restarted_under_load(env, bao):
    """While OpenBao is down, requests get UNAVAILABLE fast; before and after, every one succeeds; the
    same server process carries on."""
    policy = policy_file(env.tmp / "restart.json", vault_doc(bao.addr, bao.create_token(["faults-app"])))
    handle = asps_server.serve(env.config(policy, health_interval=0.2))
    evidence = [env.evidence(ENCLAVE_1) for _ in range(6)]
    try:
        with Load(f"localhost:{handle.port}", env.ca, evidence) as load:
            time.sleep(1.0)
            stop_at = time.monotonic()
            bao.stop()
            try:
                time.sleep(1.5)
            finally:
                bao.start()
            back_at = time.monotonic()
            n_back = load.count()
            while load.count() < n_back + 30 or time.monotonic() < back_at + 2:
                time.sleep(0.05)
            calls = load.stop()
        assert health_of(handle.port, env.ca) == SERVING  # a KMS outage is not a collateral problem
    finally:
        handle.stop(0)
    within_deadline(calls)
    assert {c.code for c in calls} <= {"OK", "UNAVAILABLE"}, {c.code for c in calls}
    before = [c for c in calls if c.end < stop_at]
    after = [c for c in calls if c.start > back_at + 0.5]
    outage = [c for c in calls if c.code == "UNAVAILABLE"]
    assert before and all(c.code == "OK" for c in before)
    assert len(after) >= 10 and all(c.code == "OK" for c in after), [c for c in after if c.code != "OK"][:3]
    assert outage, "no request saw the outage"
    assert all(c.end > stop_at and c.start < back_at + 0.5 for c in outage)
    assert all("retry later" in c.details for c in outage)


def test_hanging_vault_is_cut_off_by_the_timeout(env, bao):
    """A KMS that accepts and never answers: the agent's timeout (1 s per try in the policy) ends each
    request with UNAVAILABLE inside the caller's deadline, the server keeps answering meanwhile, and a
    reload to a working Vault recovers it."""
    hang = SilentListener(backlog=64)  # a wedged Vault, a black-holing proxy
    token = bao.create_token(["faults-app"])
    policy = policy_file(env.tmp / "hang.json", vault_doc(hang.addr, token, timeout=1))
    handle = asps_server.serve(env.config(policy))
    results: list[tuple[str, str, float]] = []
    lock = threading.Lock()
    client = Client(f"localhost:{handle.port}", env.ca)
    try:

        def one() -> None:
            ev = env.evidence(ENCLAVE_1)
            with grpc.secure_channel(f"localhost:{handle.port}", grpc.ssl_channel_credentials(env.ca)) as ch:
                t0 = time.monotonic()
                code, details = attest(asps_pb2_grpc.SecretProvisionStub(ch), ev)
            with lock:
                results.append((code, details, time.monotonic() - t0))

        callers = [threading.Thread(target=one) for _ in range(4)]
        for t in callers:
            t.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        client.challenge()  # the server still answers while the four wait on the KMS
        assert time.monotonic() - t0 < 2
        for t in callers:
            t.join(DEADLINE * 2)
        assert len(results) == 4 and len(hang.held) >= 4
        for code, details, took in results:
            assert code == "UNAVAILABLE" and "KMS" in details, details
            assert took < DEADLINE * 0.8, took
        policy_file(policy, vault_doc(bao.addr, token))
        assert handle.reload_policy()
        assert client.get(env.evidence(ENCLAVE_1), ["master_key"])[1] == {"master_key": SECRET.encode()}
    finally:
        client.close()
        handle.stop(0)
        hang.close()


# --- PCCS -------------------------------------------------------------------------------------------


class Pccs:
    """A PCCS-shaped HTTP server (v4 API: /tcb, /qe/identity, /pckcrl, /rootcacrl) serving one bundle
    for every FMSPC; stoppable and restartable on the same port."""

    def __init__(self, collateral: Collateral) -> None:
        self.collateral = collateral
        self.requests = 0
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server: ThreadingHTTPServer | None = None
        self.start()

    def start(self) -> None:
        pccs = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                pccs.requests += 1
                status, body, headers = pccs.answer(self.path)
                send_reply(self, status, headers, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def answer(self, path: str) -> tuple[int, bytes, dict[str, str]]:
        c, enc = self.collateral, urllib.parse.quote
        route = urllib.parse.urlsplit(path).path.removeprefix(API)
        if route == "/tcb":
            body = f'{{"tcbInfo":{c.tcb_info},"signature":"{c.tcb_info_signature.hex()}"}}'
            return 200, body.encode(), {"TCB-Info-Issuer-Chain": enc(c.tcb_info_issuer_chain)}
        if route == "/qe/identity":
            body = f'{{"enclaveIdentity":{c.qe_identity},"signature":"{c.qe_identity_signature.hex()}"}}'
            return 200, body.encode(), {"SGX-Enclave-Identity-Issuer-Chain": enc(c.qe_identity_issuer_chain)}
        if route == "/pckcrl":
            return 200, c.pck_crl, {"SGX-PCK-CRL-Issuer-Chain": enc(c.pck_crl_issuer_chain)}
        if route == "/rootcacrl":
            return 200, c.root_ca_crl, {}
        return 404, b"", {}


def test_pccs_down_with_warm_cache_verifies_until_next_update(env, bao):
    """PCCS stops after the first fetch: verification goes on from the cache (no request to it) until
    the collateral's nextUpdate; then UNAVAILABLE with the reason, health NOT_SERVING; when the PCCS
    is back, health recovers by itself and requests succeed again."""
    issue = int(time.time()) - 3600
    short = env.sim.build_collateral(issue=issue, validity=3600 + 12)  # nextUpdate in 12 s
    next_update = dcap.collateral_next_update(short)
    pccs = Pccs(short)
    token = bao.create_token(["faults-app"])
    policy = policy_file(env.tmp / "pccs-warm.json", vault_doc(bao.addr, token))
    handle = asps_server.serve(
        env.config(policy, collateral=None, pccs=pccs.url, health_interval=0.2, metrics_port=0)
    )
    client = Client(f"localhost:{handle.port}", env.ca)
    try:
        assert client.get(env.evidence(ENCLAVE_1))[1] == {"master_key": SECRET.encode()}
        assert pccs.requests == 4
        pccs.stop()
        # four new pieces of evidence: each quote is verified, against the cached collateral
        with Load(f"localhost:{handle.port}", env.ca, [env.evidence(ENCLAVE_1) for _ in range(4)]) as load:
            while load.count() < 20:
                time.sleep(0.05)
            warm = load.stop()
        assert time.time() < next_update, "the machine was too slow for this test's window"
        assert [c.code for c in warm] == ["OK"] * len(warm)
        assert health_of(handle.port, env.ca) == SERVING
        m = soak.scrape(handle.metrics.port)
        assert m["asps_pccs_http_requests_total{}"] == 4
        assert m["asps_collateral_fetches_total{result=ok}"] == 1
        assert m["asps_collateral_cache_hits_total{}"] >= 4
        assert m["asps_collateral_expiry_timestamp_seconds{}"] == next_update
        time.sleep(max(0.0, next_update + 1.5 - time.time()))
        ev = env.evidence(ENCLAVE_1)
        t0 = time.monotonic()
        err = client.refused(client.request(ev)[0])
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
        assert "collateral source unreachable" in err.details()
        assert time.monotonic() - t0 < DEADLINE * 0.8
        wait_health(handle.port, env.ca, NOT_SERVING, HEALTH_WAIT)
        assert "unreachable" in (handle.monitor.reason or "") or "expired" in (handle.monitor.reason or "")
        m = soak.scrape(handle.metrics.port)
        assert m["asps_serving{}"] == 0 and m["asps_collateral_fetches_total{result=unavailable}"] >= 1
        pccs.collateral = env.sim.build_collateral()
        pccs.start()
        wait_health(handle.port, env.ca, SERVING, HEALTH_WAIT)
        assert client.get(ev)[1] == {"master_key": SECRET.encode()}
        m = soak.scrape(handle.metrics.port)
        assert (
            m["asps_serving{}"] == 1 and m["asps_collateral_expiry_timestamp_seconds{}"] > time.time() + 600
        )
    finally:
        client.close()
        handle.stop(0)
        pccs.stop()


def test_pccs_unreachable_cold_is_unavailable_with_reason_never_a_hang(env, bao):
    closed = f"http://127.0.0.1:{free_port()}"
    policy = policy_file(env.tmp / "pccs-cold.json", vault_doc(bao.addr, bao.create_token(["faults-app"])))
    handle = asps_server.serve(env.config(policy, collateral=None, pccs=closed, health_interval=0.2))
    try:
        assert health_of(handle.port, env.ca) == SERVING  # nothing known to be wrong before a quote asks
        with Load(f"localhost:{handle.port}", env.ca, [env.evidence(ENCLAVE_1) for _ in range(4)]) as load:
            while load.count() < 8:
                time.sleep(0.05)
            calls = load.stop()
        within_deadline(calls)
        assert {c.code for c in calls} == {"UNAVAILABLE"}
        reason = "evidence: collateral source unreachable; retry later"
        assert all(c.details == reason for c in calls), calls[0]
        wait_health(handle.port, env.ca, NOT_SERVING, HEALTH_WAIT)
        assert "unreachable" in (handle.monitor.reason or ""), handle.monitor.reason
        c = Client(f"localhost:{handle.port}", env.ca)
        try:
            c.challenge()  # still serving the cheap call
        finally:
            c.close()
    finally:
        handle.stop(0)


def test_pccs_that_hangs_is_cut_off_unavailable_within_the_deadline(env, bao):
    hang = SilentListener(backlog=64)
    policy = policy_file(env.tmp / "pccs-hang.json", vault_doc(bao.addr, bao.create_token(["faults-app"])))
    handle = asps_server.serve(env.config(policy, collateral=None, pccs=hang.addr))
    try:
        evidence = [env.evidence(ENCLAVE_1) for _ in range(3)]
        with Load(f"localhost:{handle.port}", env.ca, evidence, stop_on_error=True) as load:
            while load.count() < 3:
                time.sleep(0.05)
            calls = load.stop()
        within_deadline(calls)
        assert {c.code for c in calls} == {"UNAVAILABLE"}, calls
        assert all("collateral source unreachable" in c.details for c in calls)
        assert hang.held, "the PCCS stand-in was never asked"
    finally:
        handle.stop(0)
        hang.close()


def test_pccs_answer_that_does_not_verify_is_retried_and_health_follows(env, bao):
    """A PCCS answer whose TCB info signature does not verify (a glitch, a tampering proxy) is not kept
    until its nextUpdate: the request is UNAVAILABLE, health goes NOT_SERVING and stays so while the
    PCCS serves that answer (asked again once per back-off, not per request), and once the PCCS is
    fixed health recovers by itself and requests succeed."""
    from dataclasses import replace

    good = env.sim.build_collateral()
    sig = bytearray(good.tcb_info_signature)
    sig[10] ^= 0x01
    pccs = Pccs(replace(good, tcb_info_signature=bytes(sig)))
    policy = policy_file(env.tmp / "pccs-bad.json", vault_doc(bao.addr, bao.create_token(["faults-app"])))
    handle = asps_server.serve(env.config(policy, collateral=None, pccs=pccs.url, health_interval=0.2))
    client = Client(f"localhost:{handle.port}", env.ca)
    try:
        err = client.refused(client.request(env.evidence(ENCLAVE_1))[0])
        failed_at = time.monotonic()
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
        assert pccs.requests == 4
        wait_health(handle.port, env.ca, NOT_SERVING, HEALTH_WAIT)
        assert "tcb_info_signature" in (handle.monitor.reason or ""), handle.monitor.reason
        time.sleep(max(0.0, failed_at + 6.5 - time.monotonic()))  # past one back-off (5 s)
        assert health_of(handle.port, env.ca) == NOT_SERVING
        assert pccs.requests == 8  # asked again once, the same answer refused again
        err = client.refused(client.request(env.evidence(ENCLAVE_1))[0])
        assert err.code() == grpc.StatusCode.UNAVAILABLE and pccs.requests == 8, err.details()
        pccs.collateral = good
        wait_health(handle.port, env.ca, SERVING, HEALTH_WAIT)
        assert client.get(env.evidence(ENCLAVE_1))[1] == {"master_key": SECRET.encode()}
        assert pccs.requests == 12
    finally:
        client.close()
        handle.stop(0)
        pccs.stop()


# --- signals (the server as a subprocess) -----------------------------------------------------------


@pytest.fixture(scope="module")
def proc_env(env, bao, tmp_path_factory):
    """soak.setup's server environment: a Vault policy for the sim's default enclave."""
    work = tmp_path_factory.mktemp("signals")
    senv, ca, sim_dir, _names, expected = soak.setup(
        work, bao, metrics_port=free_port(), grpc_port=free_port()
    )
    return work, senv, ca, sim_dir, expected


def start_server(proc_env, **extra: str) -> tuple[soak.SoakServer, int]:
    work, senv, *_ = proc_env
    port = free_port()
    server = soak.SoakServer(
        work, {**senv, "ASPS_HOST": f"127.0.0.1:{port}", "ASPS_METRICS_PORT": "", **extra}
    )
    return server, port


def sim_evidence(sim_dir: str, n: int) -> list[asps_client.Evidence]:
    return [asps_client.make_evidence("sim", sim_dir=sim_dir) for _ in range(n)]


def test_sighup_under_load_fails_no_request(proc_env):
    _work, senv, ca, sim_dir, expected = proc_env
    policy = Path(senv["ASPS_POLICY"])
    original = policy.read_bytes()
    doc_b = json.loads(original)
    doc_b["app_list"].append({**doc_b["app_list"][0], "id": "other", "mr_enclave": ENCLAVE_2.hex()})
    variant = json.dumps(doc_b).encode()
    server, port = start_server(proc_env)
    hups = 8
    try:
        with Load(f"localhost:{port}", ca, sim_evidence(sim_dir, 8), expected=expected) as load:
            time.sleep(0.5)
            for i in range(hups):
                tmp = policy.with_suffix(".new")
                tmp.write_bytes(variant if i % 2 == 0 else original)
                tmp.chmod(0o600)
                os.replace(tmp, policy)  # atomically: the reload never sees half a file
                server.proc.send_signal(signal.SIGHUP)
                time.sleep(0.3)
            time.sleep(0.3)
            calls = load.stop()
    finally:
        policy.write_bytes(original)
        rc = server.stop()
    log = server.log_path.read_text()
    assert log.count("policy reloaded from") == hups, log[-2000:]
    assert "policy reload failed" not in log
    assert len(calls) > 40
    assert [c.code for c in calls] == ["OK"] * len(calls), [c for c in calls if c.code != "OK"][:3]
    assert rc == 0
    server_log_has_no_secret(server, expected)


def test_sigterm_under_load_drains_in_flight_refuses_new_exits_0(proc_env, bao):
    """Requests held in the KMS (OpenBao frozen) when SIGTERM arrives complete with their secrets; calls
    made after the drain began are refused UNAVAILABLE; the process exits 0."""
    _work, _senv, ca, sim_dir, expected = proc_env
    server, port = start_server(proc_env, ASPS_GRACE="30")
    callers = 6
    try:
        load = Load(
            f"localhost:{port}", ca, sim_evidence(sim_dir, callers), expected=expected, stop_on_error=True
        )
        with load:
            time.sleep(0.8)
            os.kill(bao.pid, signal.SIGSTOP)
            try:
                time.sleep(0.5)  # every caller is now waiting on the frozen KMS
                term_at = time.monotonic()
                server.proc.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + 10
                while "draining" not in server.log_path.read_text() and time.monotonic() < deadline:
                    time.sleep(0.05)
                time.sleep(0.3)
                late_code = None
                with grpc.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(ca)) as ch:
                    try:
                        asps_pb2_grpc.SecretProvisionStub(ch).GetChallenge(
                            asps_pb2.ChallengeRequest(), timeout=5
                        )
                    except grpc.RpcError as e:
                        late_code = e.code()
                assert server.proc.poll() is None  # still draining
            finally:
                os.kill(bao.pid, signal.SIGCONT)
            rc = server.proc.wait(timeout=30)
            calls = load.stop()
    finally:
        server.stop()
    assert rc == 0
    assert late_code == grpc.StatusCode.UNAVAILABLE
    within_deadline(calls)
    in_flight = [c for c in calls if c.start < term_at < c.end]
    assert len(in_flight) == callers, in_flight
    assert all(c.code == "OK" for c in calls if c.start < term_at), [c for c in calls if c.code != "OK"][:3]
    refused = [c for c in calls if c.code != "OK"]
    assert refused and all(c.code == "UNAVAILABLE" and c.start > term_at for c in refused), refused
    server_log_has_no_secret(server, expected)


def test_zz_no_secret_or_vault_token_in_any_log_line(logs):
    """Every line the in-process servers of this module logged (faults included: Vault restarted or
    hanging, PCCS gone) is free of every secret value and Vault token used here."""
    assert len(FORBIDDEN) > 1, "no Vault token was recorded: the search would miss them"
    assert_no_secret_in(logs.lines, FORBIDDEN)
