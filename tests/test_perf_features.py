"""The hot-path features: the evidence cache (what it skips, what it never skips, when an entry is
stale) and --workers (several processes on one port, sharing the token key, signals passed on).

Real TLS, real gRPC, real crypto throughout; no timing is asserted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from asps_testkit import (  # noqa: F401  (fixtures: env, ev1, logs)
    ENCLAVE_1,
    Client,
    assert_no_secret_in,
    module_env,
    module_ev1,
    module_logs,
    new_p256,
    write_policy,
)
from openbao import free_port

import asps_client
import asps_server
import asps_wire
import policy as policy_mod
import ratls

REPO = Path(__file__).resolve().parent.parent
V1 = "first-" + secrets.token_hex(12)
V2 = "second-" + secrets.token_hex(12)
NAMES = ["master_key"]

pytestmark = pytest.mark.usefixtures("logs")  # every test runs under the log capture


def doc(value: str) -> dict:
    return {
        "kms": "none",
        "app_list": [{"id": "app1", "mr_enclave": ENCLAVE_1.hex(), "secrets": {"master_key": value}}],
    }


@pytest.fixture
def served(env, tmp_path):
    """A fresh in-process server per test, so each starts with an empty evidence cache."""
    policy = write_policy(tmp_path / "policy.json", doc(V1))
    collateral = tmp_path / "collateral.json"  # a private copy: one test rewrites it
    collateral.write_bytes((env.sim.directory / "collateral.json").read_bytes())
    handle = asps_server.serve(env.config(policy, collateral=str(collateral)))
    client = Client(f"localhost:{handle.port}", env.ca)
    try:
        yield handle, client, policy, collateral
    finally:
        client.close()
        handle.stop(0)


def test_second_request_is_a_cache_hit_and_token_and_signature_are_still_checked(served, ev1):
    handle, client, _, _ = served
    cache = handle.provisioner.evidence
    assert client.get(ev1, NAMES) == ("app1", {"master_key": V1.encode()})
    assert (cache.hits, cache.misses, len(cache)) == (0, 1, 1)
    assert client.get(ev1, NAMES) == ("app1", {"master_key": V1.encode()})
    assert (cache.hits, cache.misses) == (1, 1)

    # a replayed request (same token, same signature) is refused although its evidence is cached
    req, _ = client.request(ev1, NAMES)
    client.stub.GetSecrets(req, timeout=10)
    err = client.refused(req)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "already used" in err.details()

    # cached evidence, but signed by a key that is not the evidence's: refused at the signature step
    hits = cache.hits
    req, _ = client.request(ev1, NAMES, signer=new_p256())
    err = client.refused(req)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and err.details().startswith("signature:")
    assert cache.hits == hits + 1  # the refusal came from the hit path

    # a signature over other names than those sent: refused too
    token = client.challenge()
    sig = asps_wire.sign_transcript(ev1.private_key, asps_wire.transcript(token, ev1.cert_der, []))
    err = client.refused(
        asps_client.asps_pb2.SecretsRequest(evidence=ev1.cert_der, token=token, names=NAMES, signature=sig)
    )
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and err.details().startswith("signature:")


def test_policy_reload_makes_cached_evidence_miss_and_the_new_policy_decides(served, ev1):
    handle, client, policy, _ = served
    cache = handle.provisioner.evidence
    client.get(ev1, NAMES)
    write_policy(policy, doc(V2))
    assert handle.reload_policy()
    assert len(cache) == 0
    assert client.get(ev1, NAMES) == ("app1", {"master_key": V2.encode()})
    assert (cache.hits, cache.misses) == (0, 2)

    # an entry is bound to the policy object it was stored under, however the policy gets replaced
    handle.provisioner.policy = policy_mod.load_policy(str(policy))
    client.get(ev1, NAMES)
    assert (cache.hits, cache.misses) == (0, 3)
    client.get(ev1, NAMES)
    assert cache.hits == 1

    # the appraisal runs on a hit: a policy that no longer knows this enclave refuses it
    unknown = doc(V2)
    unknown["app_list"][0]["mr_enclave"] = "ab" * 32
    write_policy(policy, unknown)
    assert handle.reload_policy()
    err = client.refused(client.request(ev1, NAMES)[0])
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED


def test_changed_collateral_file_makes_cached_evidence_miss(served, ev1):
    handle, client, _, collateral = served
    cache = handle.provisioner.evidence
    client.get(ev1, NAMES)
    client.get(ev1, NAMES)
    assert (cache.hits, cache.misses) == (1, 1)
    st = collateral.stat()
    os.utime(collateral, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # "a new bundle"
    client.get(ev1, NAMES)
    assert (cache.hits, cache.misses) == (1, 2)


def test_entries_expire_at_collateral_expiry_or_certificate_not_after(env, ev1):
    verifier = asps_server.build_verifier(env.config(env.tmp / "unused.json"))
    identity = ratls.verify_evidence(ev1.cert_der, verifier)
    pol = object()
    cache = asps_server.EvidenceCache(4)
    now = int(time.time())
    early = dataclasses.replace(identity, collateral_expiry=now + 100, not_after=now + 1000)
    cache.put(b"a" * 32, early, pol, cache.version(verifier))
    # what is kept: the identity without the certificate DER, and the DER's SHA-256
    entry = cache.get(b"a" * 32, now + 99, pol, verifier)
    assert entry == (dataclasses.replace(early, cert_der=b""), hashlib.sha256(ev1.cert_der).digest())
    assert cache.get(b"a" * 32, now + 100, pol, verifier) is None
    assert cache.get(b"a" * 32, now, pol, verifier) is None  # the expired entry was dropped

    short = dataclasses.replace(identity, collateral_expiry=now + 1000, not_after=now + 50)
    cache.put(b"b" * 32, short, pol, cache.version(verifier))
    assert cache.get(b"b" * 32, now + 50, pol, verifier)[0] == dataclasses.replace(short, cert_der=b"")
    assert cache.get(b"b" * 32, now + 51, pol, verifier) is None

    # another policy object: miss; bounded: the least recently used entry goes first
    cache.put(b"c" * 32, early, pol, cache.version(verifier))
    assert cache.get(b"c" * 32, now, object(), verifier) is None
    for i in range(6):
        cache.put(bytes([i]) * 32, early, pol, cache.version(verifier))
    assert len(cache) == 4
    assert cache.get(bytes([0]) * 32, now, pol, verifier) is None
    assert cache.get(bytes([5]) * 32, now, pol, verifier) is not None

    off = asps_server.EvidenceCache(0)
    off.put(b"a" * 32, early, pol, None)
    assert off.get(b"a" * 32, now, pol, verifier) is None and len(off) == 0


def test_expired_entry_is_verified_again_through_the_provisioner(env, ev1, tmp_path):
    """With the clock past the entry's expiry the evidence is verified in full again (and here the
    certificate has expired, so the request is refused: a stale hit would have been granted)."""
    clock = [time.time()]
    policy_path = write_policy(tmp_path / "p.json", doc(V1))
    verifier = asps_server.build_verifier(env.config(policy_path))
    tokens = asps_server.TokenBook([b"k" * 32], clock=lambda: clock[0])
    prov = asps_server.Provisioner(
        policy_mod.load_policy(str(policy_path)), verifier, tokens, clock=lambda: clock[0]
    )

    def ask() -> str:
        token, _ = prov.get_challenge()
        sig = asps_wire.sign_transcript(ev1.private_key, asps_wire.transcript(token, ev1.cert_der, NAMES))
        app_id, _ = prov.get_secrets(ev1.cert_der, token, NAMES, sig)
        return app_id

    assert ask() == "app1" and ask() == "app1"
    assert (prov.evidence.hits, prov.evidence.misses) == (1, 1)
    identity = ratls.verify_evidence(ev1.cert_der, verifier)
    clock[0] = min(identity.collateral_expiry, identity.not_after + 1) + 1
    with pytest.raises(asps_server.Refusal) as e:
        ask()
    assert e.value.kind in (asps_server.Kind.DENIED, asps_server.Kind.UNAUTHENTICATED)
    assert (prov.evidence.hits, prov.evidence.misses) == (1, 2)


# --- --workers ---------------------------------------------------------------------------------------


class Supervisor:
    """asps_server.py --workers N as a child process, its output collected."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("ASPS_")}
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "asps_server.py"), *args],
            cwd=REPO,
            env={**clean, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(
                target=lambda s=stream, k=sink: k.extend(ln.rstrip("\n") for ln in s), daemon=True
            ).start()

    def wait_for(self, phrase: str, lines: list[str], count: int = 1, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(phrase in ln for ln in list(lines)) >= count:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{phrase!r} x{count} not seen; stderr:\n" + "\n".join(self.err[-30:]))

    def children(self) -> list[int]:
        out: list[int] = []
        for task in Path(f"/proc/{self.proc.pid}/task").glob("*"):
            with contextlib.suppress(OSError):
                out += [int(c) for c in (task / "children").read_text().split()]
        return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _replica(client: Client, ev) -> str:
    req, token = client.request(ev, NAMES)
    reply, call = client.stub.GetSecrets.with_call(req, timeout=10)
    assert asps_client.open_bundle(ev.private_key, reply.sealed, token) == {"master_key": V1.encode()}
    return dict(call.trailing_metadata() or ()).get(asps_server.REPLICA_METADATA, "")


def test_two_workers_serve_one_port_share_the_token_key_and_stop_on_sigterm(env, ev1, tmp_path):
    policy = write_policy(tmp_path / "policy.json", doc(V1))
    port = free_port()
    sup = Supervisor(["--workers", "2", "--grace", "2"], env.server_env(policy, port))
    clients: dict[str, Client] = {}
    try:
        sup.wait_for(f"Server listening on 127.0.0.1:{port} (2 workers)", sup.out)
        assert any("share a random one" in ln for ln in sup.err)
        workers = sup.children()
        assert len(workers) == 2
        # no token key on any command line
        for pid in (sup.proc.pid, *workers):
            assert "TOKEN_KEY" not in Path(f"/proc/{pid}/cmdline").read_bytes().decode()
        environ = Path(f"/proc/{workers[0]}/environ").read_bytes().split(b"\0")
        (token_key,) = [e.split(b"=", 1)[1] for e in environ if e.startswith(b"ASPS_TOKEN_KEY=")]

        # new connections until both workers have answered (the kernel spreads connections)
        for _ in range(60):
            c = Client(f"localhost:{port}", env.ca)
            name = _replica(c, ev1)
            if name in clients:
                c.close()
            else:
                clients[name] = c
            if len(clients) == 2:
                break
        assert sorted(n.rsplit("/", 1)[1] for n in clients) == ["w0", "w1"]
        a, b = clients.values()

        # a challenge from one worker is accepted by the other (shared key); each redeems it once
        token = a.challenge()
        req, _ = a.request(ev1, NAMES, token=token)
        reply = b.stub.GetSecrets(req, timeout=10)
        assert asps_client.open_bundle(ev1.private_key, reply.sealed, token) == {"master_key": V1.encode()}
        assert "already used" in b.refused(req).details()
        # ...and once more at the other worker: sealed to the enclave's key, useless to anyone else
        replay = a.stub.GetSecrets(req, timeout=10)
        with pytest.raises(asps_client.BadReply):
            asps_client.open_bundle(new_p256(), replay.sealed, token)

        # SIGHUP reaches every worker
        write_policy(policy, doc(V1))
        sup.proc.send_signal(signal.SIGHUP)
        sup.wait_for("policy reloaded", sup.err, count=2)

        for c in clients.values():
            c.close()
        clients.clear()
        sup.proc.send_signal(signal.SIGTERM)
        assert sup.proc.wait(timeout=40) == 0
        assert not any(_alive(pid) for pid in workers)
        assert any("stopping 2 workers" in ln for ln in sup.err)
        assert_no_secret_in(sup.err + sup.out, [V1, V2, token_key])
    finally:
        for c in clients.values():
            c.close()
        if sup.proc.poll() is None:
            sup.proc.kill()
            sup.proc.wait()


def test_workers_refuse_to_start_on_a_broken_policy(env, tmp_path):
    policy = tmp_path / "broken.json"
    policy.write_text('{"kms": "none", "app_list": [')
    sup = Supervisor(
        [
            "--workers",
            "2",
            "--host",
            f"127.0.0.1:{free_port()}",
            "--cert",
            str(env.certs / "server.crt"),
            "--key",
            str(env.certs / "server.key"),
            "--policy",
            str(policy),
            "--collateral",
            str(env.sim.directory / "collateral.json"),
            "--root-ca",
            str(env.sim.directory / "root_ca.pem"),
        ],
        {},
    )
    assert sup.proc.wait(timeout=60) == 2
    time.sleep(0.2)
    assert any("cannot start" in ln and "policy" in ln for ln in sup.err)
    assert not sup.out


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if text in (d / "cmdline").read_bytes().decode(errors="replace") and _alive(int(d.name)):
                    found.append(int(d.name))
    return found


def test_sigterm_while_workers_start_stops_them_all(env, tmp_path):
    policy = write_policy(tmp_path / "policy.json", doc(V1))
    host = f"127.0.0.1:{free_port()}"
    sup = Supervisor(
        [
            "--workers", "2", "--host", host,
            "--cert", str(env.certs / "server.crt"), "--key", str(env.certs / "server.key"),
            "--policy", str(policy), "--collateral", str(env.sim.directory / "collateral.json"),
            "--root-ca", str(env.sim.directory / "root_ca.pem"),
        ],
        {},
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while len(sup.children()) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    sup.proc.send_signal(signal.SIGTERM)
    assert sup.proc.wait(timeout=40) == 0
    assert not sup.out  # it never claimed to listen
    assert _processes_mentioning(host) == []


def test_zz_no_secret_in_any_log_line(logs):
    """Every line the in-process servers of this module logged (cache hits, misses, refusals after a
    reload) is free of every secret value used here."""
    assert_no_secret_in(logs.lines, [V1, V2])


def test_receive_limit_wraps_each_handler_once_streaming_requests_included():
    """The interceptor's per-method cache: the same registered handler gets the same stream-request
    twin on every call; another handler gets its own; a streaming-request handler is wrapped too (its
    messages are held to the receive limit one by one, and it counts as a long-lived call), keeping
    its shape, also once."""
    import asyncio

    limit = asps_server.ReceiveLimit(5.0)

    async def unary(request, context):
        return request

    async def replies(request, context):
        yield request

    first = grpc.unary_unary_rpc_method_handler(unary)
    second = grpc.unary_stream_rpc_method_handler(replies)
    streaming = grpc.stream_unary_rpc_method_handler(unary)

    def intercept(handler):
        async def continuation(_details):
            return handler

        return asyncio.run(limit.intercept_service(continuation, None))

    a, b = intercept(first), intercept(first)
    assert a is b and a.request_streaming and not a.response_streaming
    c = intercept(second)
    assert c is not a and c.request_streaming and c.response_streaming
    assert intercept(second) is c
    d = intercept(streaming)
    assert d is not streaming and d.request_streaming and not d.response_streaming
    assert intercept(streaming) is d
    assert intercept(None) is None
