"""asps_server.py as an operator runs it: a subprocess configured by ASPS_* variables, SIGHUP, SIGTERM."""

from __future__ import annotations

import json
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
from asps_testkit import ENCLAVE_1, ENCLAVE_2, Client, assert_no_secret_in, make_env, write_policy
from openbao import free_port, openbao_server  # noqa: F401  (fixture)

import asps_client

REPO = Path(__file__).resolve().parent.parent
V1 = "first-" + secrets.token_hex(12)
V2 = "second-" + secrets.token_hex(12)
TOKEN_KEY = secrets.token_hex(32)


def doc(master: str, app2: bool = False) -> dict:
    apps = [{"id": "app1", "mr_enclave": ENCLAVE_1.hex(), "secrets": {"master_key": master}}]
    if app2:
        apps.append({"id": "app2", "mr_enclave": ENCLAVE_2.hex(), "secrets": {"master_key": master + "-2"}})
    return {"kms": "none", "app_list": apps}


class ServerProcess:
    """The server as a child process; its stdout and stderr are collected line by line."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "asps_server.py"), *args],
            cwd=REPO,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(stream, sink: list[str]) -> None:
        for line in stream:
            sink.append(line.rstrip("\n"))

    def wait_for(self, phrase: str, where: str = "err", timeout: float = 20.0) -> str:
        sink = self.err if where == "err" else self.out
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(sink):
                if phrase in line:
                    return line
            if self.proc.poll() is not None:
                time.sleep(0.2)
                break
            time.sleep(0.05)
        for line in list(sink):
            if phrase in line:
                return line
        raise AssertionError(f"{phrase!r} not seen; stderr:\n" + "\n".join(self.err[-30:]))

    def count(self, phrase: str) -> int:
        return sum(phrase in line for line in self.err)

    def finish(self, timeout: float = 20.0) -> int:
        rc = self.proc.wait(timeout=timeout)
        for t in self._threads:
            t.join(timeout=5)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def env(tmp_path_factory, sim_platform):
    return make_env(tmp_path_factory, sim_platform)


def server_env(env, policy: Path, port: int, **extra: str) -> dict[str, str]:
    return env.server_env(policy, port, **{"ASPS_TOKEN_KEY": TOKEN_KEY, **extra})


def test_sighup_reload_broken_keeps_old_good_applies_and_sigterm_exits_0(env):
    policy = write_policy(env.tmp / "hup.json", doc(V1))
    port = free_port()
    audit_file = env.tmp / "audit.jsonl"
    srv = ServerProcess(
        [], server_env(env, policy, port, ASPS_LOG_FORMAT="json", ASPS_AUDIT_LOG=str(audit_file))
    )
    ev1, ev2 = env.evidence(ENCLAVE_1), env.evidence(ENCLAVE_2)
    client = None
    try:
        srv.wait_for(f"Server listening on 127.0.0.1:{port}", where="out")
        assert srv.wait_for("NOT INTEL'S")  # loud warning about the sim root
        client = Client(f"localhost:{port}", env.ca)
        assert client.get(ev1, ["master_key"]) == ("app1", {"master_key": V1.encode()})

        # broken: not JSON at all, then JSON with a bad field; both keep the old policy
        policy.write_text('{"kms": "none", "app_list": [')
        srv.proc.send_signal(signal.SIGHUP)
        srv.wait_for("policy reload failed")
        bad = doc(V2)
        bad["app_list"][0]["mr_enclave"] = "not hex"
        write_policy(policy, bad)
        srv.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while srv.count("policy reload failed") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.count("policy reload failed") == 2
        assert any("app app1" in ln and "mr_enclave" in ln for ln in srv.err)
        assert client.get(ev1, ["master_key"]) == ("app1", {"master_key": V1.encode()})
        err = client.refused(client.request(ev2, ["master_key"])[0])
        assert err.code().name == "PERMISSION_DENIED"

        # good: new value, and a second app
        write_policy(policy, doc(V2, app2=True))
        srv.proc.send_signal(signal.SIGHUP)
        srv.wait_for("policy reloaded")
        assert client.get(ev1, ["master_key"]) == ("app1", {"master_key": V2.encode()})
        assert client.get(ev2, ["master_key"]) == ("app2", {"master_key": (V2 + "-2").encode()})

        srv.proc.send_signal(signal.SIGTERM)
        assert srv.finish() == 0
        srv.wait_for('"stopped"')
    finally:
        if client:
            client.close()
        srv.kill()
    # JSON log format: every stderr line is one JSON object; audit lines went to the file too
    for line in srv.err:
        if line.startswith("{"):
            json.loads(line)
    audit = [json.loads(ln) for ln in audit_file.read_text().splitlines()]
    assert audit == [json.loads(ln) for ln in srv.err if '"verdict"' in ln]  # same lines on stderr
    assert [a["verdict"] for a in audit].count("granted") == 4
    assert any(a["verdict"] == "refused" and "unknown enclave" in a["reason"] for a in audit)
    assert_no_secret_in(
        srv.err + srv.out + audit_file.read_text().splitlines(), [V1, V2, V2 + "-2", TOKEN_KEY]
    )


def test_replicas_sharing_a_token_key_accept_each_others_challenges(env, tmp_path):
    policy = write_policy(env.tmp / "replicas.json", doc(V1))
    key_file = tmp_path / "token.key"
    key_file.write_text("# token keys, first one signs\n" + TOKEN_KEY + "\n")
    key_file.chmod(0o600)
    ports = [free_port(), free_port()]
    procs = [
        ServerProcess(
            ["--token-key-file", str(key_file)], {**server_env(env, policy, p), "ASPS_TOKEN_KEY": ""}
        )
        for p in ports
    ]
    lone = free_port()
    procs.append(ServerProcess([], {**server_env(env, policy, lone), "ASPS_TOKEN_KEY": ""}))
    clients = []
    try:
        for p, port in zip(procs, [*ports, lone], strict=True):
            p.wait_for(f"Server listening on 127.0.0.1:{port}", where="out")
        assert procs[2].wait_for("replicas will not accept each other's challenges")
        a, b, c = (Client(f"localhost:{port}", env.ca) for port in [*ports, lone])
        clients = [a, b, c]
        ev = env.evidence(ENCLAVE_1)
        token = a.challenge()
        assert b.get(ev, ["master_key"], token=token) == ("app1", {"master_key": V1.encode()})
        err = c.refused(c.request(ev, ["master_key"], token=a.challenge())[0])
        assert err.code().name == "UNAUTHENTICATED" and "not issued by this service" in err.details()
    finally:
        for cl in clients:
            cl.close()
        for p in procs:
            p.proc.send_signal(signal.SIGTERM)
        for p in procs:
            assert p.finish() == 0
    assert_no_secret_in([ln for p in procs for ln in p.err + p.out], [V1, TOKEN_KEY])


def test_invalid_policy_refuses_to_start_with_a_clear_error(env):
    bad = doc(V1)
    bad["app_list"][0]["app_tokn"] = "x"
    policy = write_policy(env.tmp / "bad.json", bad)
    srv = ServerProcess([], server_env(env, policy, free_port()))
    assert srv.finish() == 2
    assert any("cannot start" in ln and "app app1" in ln and "app_tokn" in ln for ln in srv.err), srv.err


def test_help_explains_every_option_and_its_variable():
    out = subprocess.run(
        [sys.executable, str(REPO / "asps_server.py"), "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag, var in [
        ("--host", "ASPS_HOST"),
        ("--cert", "ASPS_CERT"),
        ("--key", "ASPS_KEY"),
        ("--policy", "ASPS_POLICY"),
        ("--collateral", "ASPS_COLLATERAL"),
        ("--pccs", "ASPS_PCCS"),
        ("--root-ca", "ASPS_ROOT_CA"),
        ("--token-key-file", "ASPS_TOKEN_KEY"),
        ("--legacy-cczoo", "ASPS_LEGACY_CCZOO"),
        ("--reflection", "ASPS_REFLECTION"),
        ("--log-format", "ASPS_LOG_FORMAT"),
    ]:
        assert flag in out and var in out, flag
    assert "SIGHUP" in out and "SIGTERM" in out
    client_help = subprocess.run(
        [sys.executable, str(REPO / "asps_client.py"), "--help"], capture_output=True, text=True, check=True
    ).stdout
    for code in range(9):
        assert f"\n  {code}  " in client_help


def test_sigterm_lets_the_in_flight_request_finish(env, openbao_server):  # noqa: F811
    """A request stuck in the KMS (OpenBao frozen with SIGSTOP) completes after SIGTERM; then exit 0."""
    bao = openbao_server
    bao.enable_kv("drain", version=1)
    value = "drain-" + secrets.token_hex(12)
    bao.kv_put("drain/master", {"key": value})
    bao.read_policy("drain-app", "drain/*")
    doc = {
        "kms": "vault",
        "addr": bao.addr,
        "timeout": 20,
        "app_list": [
            {
                "id": "app1",
                "mr_enclave": ENCLAVE_1.hex(),
                "app_token": bao.create_token(["drain-app"]),
                "secrets": {"master_key": "drain/master"},
            }
        ],
    }
    policy = write_policy(env.tmp / "drain.json", doc)
    policy.chmod(0o600)
    port = free_port()
    srv = ServerProcess([], server_env(env, policy, port, ASPS_GRACE="30"))
    ev = env.evidence(ENCLAVE_1)
    client = Client(f"localhost:{port}", env.ca)
    result: dict[str, object] = {}
    try:
        srv.wait_for(f"Server listening on 127.0.0.1:{port}", where="out")
        req, token = client.request(ev, ["master_key"])
        os.kill(bao.pid, signal.SIGSTOP)
        try:

            def call() -> None:
                try:
                    result["reply"] = client.stub.GetSecrets(req, timeout=30)
                except Exception as e:  # recorded and asserted below
                    result["error"] = e

            caller = threading.Thread(target=call)
            caller.start()
            time.sleep(0.5)  # the request is now waiting on the frozen KMS
            srv.proc.send_signal(signal.SIGTERM)
            srv.wait_for("draining")
            # new calls are refused once the drain has begun (the log line comes just before it)
            refused_new = False
            deadline = time.monotonic() + 5
            while not refused_new and time.monotonic() < deadline:
                late = Client(f"localhost:{port}", env.ca)
                try:
                    late.challenge()
                    time.sleep(0.05)
                except grpc.RpcError:
                    refused_new = True
                finally:
                    late.close()
            assert refused_new
            assert srv.proc.poll() is None  # still draining
        finally:
            os.kill(bao.pid, signal.SIGCONT)
        caller.join(timeout=30)
        assert "error" not in result, result.get("error")
        got = asps_client.open_bundle(ev.private_key, result["reply"].sealed, token)
        assert got == {"master_key": value.encode()}
        assert srv.finish() == 0
    finally:
        client.close()
        srv.kill()
    assert_no_secret_in(srv.err + srv.out, [value])


# The scene of a hang seen in tests/test_faults.py, replayed in a fresh interpreter: a thread holds a
# logging handler's lock (as one that is writing a line does) and needs gRPC's process-wide asyncio
# lock (as an aio object's destructor, run by the GC in that thread, does), while the loop thread
# holds that lock and, with gRPC's DEBUG lines on, waits for the handler. setup_logging keeps gRPC's
# loggers at INFO whatever the level asked for, so the loop never waits for the handler there.
_AIO_LOCK_SCENE = r"""
import asyncio, logging, sys, threading, time
sys.path.insert(0, sys.argv[1])
import asps_server, grpc
from grpc._cython import cygrpc

asps_server.setup_logging(level=logging.DEBUG)
handler = logging.getLogger().handlers[0]
loop_in_grpc_lock, handler_taken = threading.Event(), threading.Event()

def pause_in_grpc_lock(record):
    # gRPC's aio set-up logs this line while it holds its lock (only if its DEBUG lines are on):
    # hold the loop thread here until this handler is taken by the main thread, as by a writer.
    if record.getMessage().startswith("Using ") and "I/O engine" in record.getMessage():
        loop_in_grpc_lock.set()
        handler_taken.wait(10)
    return True

handler.addFilter(pause_in_grpc_lock)  # filters run before Handler.handle takes the handler's lock
loop = asyncio.new_event_loop()

async def make():
    return grpc.aio.server()  # the process's first aio object: gRPC's aio set-up, under its lock

threading.Thread(target=loop.run_until_complete, args=(make(),), daemon=True).start()
loop_in_grpc_lock.wait(3)  # never set when gRPC's DEBUG lines are off
handler.acquire()  # the main thread is "inside the handler", writing a line...
handler_taken.set()
time.sleep(0.5)  # ...while the loop thread (if it logged under gRPC's lock) waits for the handler
cygrpc.init_grpc_aio()  # ...and the GC runs an aio destructor here, which takes gRPC's lock first
handler.release()
print("no deadlock", flush=True)
"""


def test_grpc_debug_lines_stay_off_so_the_gc_cannot_deadlock_logging():
    try:
        done = subprocess.run(
            [sys.executable, "-c", _AIO_LOCK_SCENE, str(REPO)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("deadlock: the loop thread waited for a logging handler while holding gRPC's lock")
    assert done.returncode == 0 and "no deadlock" in done.stdout, done.stderr[-2000:]
