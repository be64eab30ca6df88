"""A fleet under load: two ASPS replicas (subprocesses sharing one token key file) in front of a 3-node
OpenBao raft cluster loaded by write_secrets.sh, driven by many concurrent clients that give both
replica addresses to asps_client (gRPC round_robin). While they run, (a) one replica is SIGKILLed,
(b) the active OpenBao node is SIGKILLed and a standby takes over. Every client must end with its own
app's secrets, none may ever see another app's, and the error window of each event is printed.

Also: challenges cross replicas (and are single-use per replica only, as documented), and token key
rotation accepts exactly what the key lists say, in the order the README gives.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from asps_testkit import ENCLAVE_1, ENCLAVE_2, Client, Env, assert_no_secret_in, make_env, write_policy
from openbao import OpenBaoCluster, bao_bin_dir, free_port

import asps_client
import asps_server

REPO = Path(__file__).resolve().parent.parent
CLIENTS = 12  # concurrent client threads (enclaves), half per app
NAMES = ("master_key", "rsa_pubkey")


# --- the fleet ------------------------------------------------------------------------------------


class Replica:
    """asps_server.py as a child process, configured through ASPS_* variables like an operator would."""

    def __init__(self, replica_id: str, port: int, env: dict[str, str]) -> None:
        self.replica_id, self.port, self.env = replica_id, port, env
        self.err: list[str] = []
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> Replica:
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "asps_server.py")],
            cwd=REPO,
            env={
                **os.environ,
                **self.env,
                "ASPS_HOST": f"127.0.0.1:{self.port}",
                "ASPS_REPLICA_ID": self.replica_id,
            },
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        atexit.register(self.kill)  # even if the fixture's teardown never runs
        out: list[str] = []
        for stream, sink in ((self.proc.stdout, out), (self.proc.stderr, self.err)):
            threading.Thread(
                target=lambda s=stream, k=sink: k.extend(ln.rstrip("\n") for ln in s), daemon=True
            ).start()
        deadline = time.monotonic() + 20
        while not any("Server listening on" in ln for ln in out):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"replica {self.replica_id} did not start:\n" + "\n".join(self.err[-20:])
                )
            time.sleep(0.05)
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class Fleet:
    env: Env
    cluster: OpenBaoCluster
    replicas: list[Replica]
    expected: dict[str, dict[str, bytes]]  # app id -> name -> value, read back from OpenBao as root
    forbidden: list[str]  # every value and token that must never appear in a log line

    @property
    def hosts(self) -> list[str]:
        return [r.address for r in self.replicas]


def load_secrets(cluster: OpenBaoCluster, policy: Path) -> None:
    """write_secrets.sh against the active node, tokens filled into the policy file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env.update(
        {
            "VAULT_ADDR": cluster.addrs[cluster.active()],
            "VAULT_TOKEN": cluster.root_token or "",
            "PATH": f"{bao_bin_dir()}:{env.get('PATH', '/usr/bin:/bin')}",
        }
    )
    done = subprocess.run(
        [str(REPO / "write_secrets.sh"), "--policy", str(policy), "--kv-version", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, sim_platform) -> Env:
    return make_env(tmp_path_factory, sim_platform)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, env: Env) -> Iterator[Fleet]:
    cluster = OpenBaoCluster(tmp_path_factory.mktemp("fleet-bao"))
    replicas: list[Replica] = []
    began = time.monotonic()
    try:
        cluster.start()
        active = cluster.active()
        # the active node first: the replicas' agents start there, so killing it forces a failover
        addrs = [cluster.addrs[active]] + [a for i, a in enumerate(cluster.addrs) if i != active]
        policy = write_policy(
            env.tmp / "policy_vault.json",
            {
                "kms": "vault",
                "addr": ",".join(addrs),
                "auth_method": "token",
                "timeout": 2,
                "app_list": [
                    {
                        "id": app,
                        "mr_enclave": mr.hex(),
                        "app_token": "",
                        "secrets": {
                            "master_key": f"occlum/{app}/image_key",
                            "rsa_pubkey": f"occlum/{app}/rsa_pubkey",
                        },
                    }
                    for app, mr in ((1, ENCLAVE_1), (2, ENCLAVE_2))
                ],
            },
        )
        load_secrets(cluster, policy)
        paths = [f"occlum/{app}/{leaf}" for app in (1, 2) for leaf in ("image_key", "rsa_pubkey")]
        cluster.wait_readable(*paths)
        expected = {
            str(app): {
                n: cluster.kv_get(f"occlum/{app}/{leaf}")["key"].encode()
                for n, leaf in zip(NAMES, ("image_key", "rsa_pubkey"), strict=True)
            }
            for app in (1, 2)
        }
        assert expected["1"]["master_key"] != expected["2"]["master_key"]
        tokens = [a["app_token"] for a in json.loads(policy.read_text())["app_list"]]
        # one key file for the whole fleet: two keys, the first mints, both verify (a rotation window)
        key_file = env.tmp / "token_keys"
        key_file.write_text(f"# ASPS token keys\n{secrets.token_hex(32)}\n{secrets.token_hex(32)}\n")
        key_file.chmod(0o600)
        server_env = {
            "ASPS_CERT": str(env.certs / "server.crt"),
            "ASPS_KEY": str(env.certs / "server.key"),
            "ASPS_POLICY": str(policy),
            "ASPS_COLLATERAL": str(env.sim.directory / "collateral.json"),
            "ASPS_ROOT_CA": str(env.sim.directory / "root_ca.pem"),
            "ASPS_TOKEN_KEY_FILE": str(key_file),
        }
        replicas = [Replica(f"r{i}", free_port(), server_env) for i in (1, 2)]
        for r in replicas:
            r.start()
        print(
            f"\nfleet up in {time.monotonic() - began:.1f}s (3 OpenBao nodes, write_secrets.sh, 2 replicas)"
        )
        forbidden = [v.decode() for app in expected.values() for v in app.values()]
        forbidden += [*tokens, cluster.root_token or ""]
        yield Fleet(env, cluster, replicas, expected, forbidden)
    finally:
        for r in replicas:
            r.kill()
        cluster.close()


# --- load -----------------------------------------------------------------------------------------


@dataclass
class Attempt:
    client: int
    began: float
    ended: float
    ok: bool
    replica: str = ""
    attempts: int = 1
    error: str = ""
    library_retry: bool = True


@dataclass
class Load:
    """CLIENTS threads attesting in a loop against every replica address, until stopped. One client in
    four turns the library's retry off (retries=0), to show the error window the retry hides."""

    fleet: Fleet
    log: list[Attempt] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    last_ok: dict[int, bool] = field(default_factory=dict)

    def run(self, client: int) -> None:
        app, mr = ("1", ENCLAVE_1) if client % 2 == 0 else ("2", ENCLAVE_2)
        evidence = self.fleet.env.evidence(mr)  # one RA-TLS certificate per enclave, fresh challenges
        want = self.fleet.expected[app]
        hosts = ",".join(self.fleet.hosts) if client % 3 else self.fleet.hosts  # both forms of --host
        retries = 0 if client % 4 == 3 else 1
        drain_until = None
        while True:
            if self.stop.is_set():
                drain_until = drain_until or time.monotonic() + 15
                if self.last_ok.get(client) or time.monotonic() > drain_until:
                    return
            began = time.monotonic()
            try:
                result = asps_client.fetch_secrets(
                    hosts,
                    ca=self.fleet.env.ca,
                    evidence=evidence,
                    timeout=5,
                    connect_timeout=3,
                    retries=retries,
                )
            except asps_client.ClientError as e:
                self.log.append(
                    Attempt(
                        client, began, time.monotonic(), False, error=str(e)[:200], library_retry=retries > 0
                    )
                )
                self.last_ok[client] = False
                time.sleep(0.05)  # the caller's own retry, after the library's one
                continue
            if result.app_id != app or result.secrets != want:
                leaked = [n for n, v in result.secrets.items() if v not in want.values()]
                self.wrong.append(f"client {client} (app {app}) got app {result.app_id}, names {leaked}")
            self.log.append(
                Attempt(
                    client, began, time.monotonic(), True, result.replica, result.attempts, "", retries > 0
                )
            )
            self.last_ok[client] = True

    def since(self, t: float) -> list[Attempt]:
        return [a for a in self.log if a.ended >= t]


def wait_until(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def report(name: str, t0: float, attempts: list[Attempt], extra: str = "") -> float:
    """Print what the clients saw after the event at t0; return the error window (seconds after t0)."""
    print(f"[{name}]{extra}")
    window = 0.0
    for retry in (True, False):
        group = [a for a in attempts if a.library_retry == retry]
        errors = [a for a in group if not a.ok]
        oks = [a for a in group if a.ok]
        last = max((a.ended for a in errors), default=t0) - t0
        first = min((a.began for a in errors), default=t0) - t0
        window = max(window, last)
        how = "library retry once" if retry else "library retry off "
        print(
            f"    {how}: {len(group):4d} attestations, {len(errors)} failed"
            + (f" (error window {first:.2f}s..{last:.2f}s after the kill)" if errors else "")
            + (f", {sum(a.attempts > 1 for a in oks)} succeeded on the retry" if retry else "")
            + f", slowest success {max((a.ended - a.began for a in oks), default=0.0):.2f}s"
        )
        if errors:
            print(f"        e.g. {errors[0].error}")
    return window


# --- tests ----------------------------------------------------------------------------------------


def test_replicas_share_challenges_and_report_themselves(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    r1, r2 = fleet.replicas
    ev = fleet.env.evidence(ENCLAVE_1)
    c1, c2 = Client(r1.address, fleet.env.ca), Client(r2.address, fleet.env.ca)
    try:
        token = c1.challenge()  # minted by r1 ...
        assert c2.get(ev, ["master_key"], token=token)[1] == {"master_key": fleet.expected["1"]["master_key"]}
        err = c2.refused(c2.request(ev, ["master_key"], token=token)[0])  # ... redeemed once at r2
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "already used" in err.details()
        # single use is per replica (README): r1 has not seen it; the reply is sealed to ev's key anyway
        assert c1.get(ev, ["master_key"], token=token)[0] == "1"
        # a token under a key nobody in the fleet holds
        other = asps_server.TokenBook([secrets.token_bytes(32)]).mint()[0]
        err = c1.refused(c1.request(ev, ["master_key"], token=other)[0])
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "unknown key" in err.details()
    finally:
        c1.close()
        c2.close()
    # the CLI: two --host flags (one of them a comma list would do too), --json names the replica
    base = [
        "--ca",
        str(fleet.env.certs / "ca.crt"),
        "--provider",
        "sim",
        "--sim-dir",
        str(fleet.env.sim.directory),
    ]
    seen = set()
    for _ in range(6):
        assert asps_client.main(["--host", r1.address, "--host", r2.address, *base, "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["app_id"] == "1" and out["host"] == f"{r1.address},{r2.address}"
        assert out["secrets"]["master_key"] == fleet.expected["1"]["master_key"].decode()
        seen.add(out["replica"])
    assert seen <= {"r1", "r2"} and seen, seen
    rc = asps_client.main(["--host", f"{r1.address},{r2.address}", "--lb", "pick_first", *base, "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["replica"] == "r1"  # first in the list


def test_clients_survive_a_replica_kill_and_a_vault_failover(fleet: Fleet) -> None:
    cluster, r2 = fleet.cluster, fleet.replicas[1]
    load = Load(fleet)
    threads = [threading.Thread(target=load.run, args=(i,), daemon=True) for i in range(CLIENTS)]
    started = time.monotonic()
    for t in threads:
        t.start()
    try:
        wait_until(
            lambda: {a.replica for a in load.log if a.ok} >= {"r1", "r2"}, 20, "both replicas to serve"
        )
        time.sleep(1.0)
        warm = [a for a in load.log if a.ok]
        print(
            f"\n[warm-up] {len(warm)} attestations by {CLIENTS} clients "
            f"in {time.monotonic() - started:.1f}s, "
            f"r1 {sum(a.replica == 'r1' for a in warm)} / r2 {sum(a.replica == 'r2' for a in warm)}"
        )

        # (a) one ASPS replica dies without a goodbye
        killed_a = time.monotonic()
        r2.kill()
        time.sleep(3.0)
        phase_a = load.since(killed_a)
        window_a = report("replica r2 SIGKILLed", killed_a, phase_a)
        late = [a for a in phase_a if a.ok and a.began > killed_a + 0.5]
        assert late and all(a.replica == "r1" for a in late), "a dead replica cannot have answered"

        # r2 comes back on its port; round_robin picks it up again with no client change
        r2.start()
        back = time.monotonic()
        wait_until(
            lambda: any(a.ok and a.replica == "r2" and a.began > back for a in load.log), 15, "r2 back"
        )

        # (b) the active OpenBao node dies; a standby takes over
        dead = cluster.active()
        killed_b = time.monotonic()
        cluster.kill(dead)
        new_active = cluster.active(wait=30)
        takeover = time.monotonic() - killed_b
        time.sleep(max(0.0, 3.0 - takeover) + 1.0)
        phase_b = load.since(killed_b)
        window_b = report(
            f"active OpenBao node{dead} SIGKILLed",
            killed_b,
            phase_b,
            f" node{new_active} active after {takeover:.2f}s",
        )
        assert any(a.ok and a.began > killed_b + takeover for a in phase_b), (
            "no attestation after the takeover"
        )
    finally:
        load.stop.set()
        for t in threads:
            t.join(20)
    assert not any(t.is_alive() for t in threads), "a client is stuck"
    assert not load.wrong, load.wrong  # no client ever received another app's secret
    assert all(load.last_ok.get(i) for i in range(CLIENTS)), {i: load.last_ok.get(i) for i in range(CLIENTS)}
    assert window_a < 10.0 and window_b < 10.0, (window_a, window_b)
    total = len(load.log)
    print(
        f"[total] {total} attestations in {time.monotonic() - started:.1f}s, "
        f"{sum(not a.ok for a in load.log)} failed (after the library's retry, if any); "
        "every client ended with its own secrets"
    )
    for r in fleet.replicas:
        assert_no_secret_in(r.err, fleet.forbidden)


def test_token_key_rotation_window() -> None:
    """The README's order: (1) every replica verifies the new key, (2) new key mints, (3) old key
    dropped after one token lifetime. A replica may be at step k or k+1 and the fleet still agrees."""
    old, new = secrets.token_bytes(32), secrets.token_bytes(32)
    steps = {"0": [old], "1": [old, new], "2": [new, old], "3": [new]}
    books = {k: asps_server.TokenBook(v) for k, v in steps.items()}
    for minter, mbook in books.items():
        for verifier, vbook in books.items():
            token = mbook.mint()[0]
            should = steps[minter][0] in steps[verifier]
            if should:
                vbook.redeem(token)
            else:
                with pytest.raises(asps_server.Refusal, match="unknown key"):
                    vbook.redeem(token)
            if abs(int(minter) - int(verifier)) <= 1:
                assert should, (minter, verifier)  # neighbouring steps always agree
    # the file and variable forms read the same list, first line / first item minting
    assert asps_server.load_token_keys(None, f"{new.hex()}, {old.hex()}") == (
        new.hex().encode(),
        old.hex().encode(),
    )


def test_unavailable_replica_is_retried_once_on_another_with_a_fresh_challenge(env: Env) -> None:
    """One replica's KMS is down (UNAVAILABLE), the other's works: round_robin sends the retry to the
    other one; without the retry the broken replica's answer reaches the caller."""
    value = "fleet-" + secrets.token_hex(8)
    ok_policy = write_policy(
        env.tmp / "ok.json",
        {"kms": "none", "app_list": [{"id": 1, "mr_enclave": ENCLAVE_1.hex(), "secrets": {"k": value}}]},
    )
    down_policy = write_policy(
        env.tmp / "down.json",
        {
            "kms": "vault",
            "addr": f"http://127.0.0.1:{free_port()}",  # nobody listens
            "timeout": 1,
            "app_list": [
                {
                    "id": 1,
                    "mr_enclave": ENCLAVE_1.hex(),
                    "app_token": "s.unused",
                    "secrets": {"k": "occlum/1/k"},
                }
            ],
        },
    )
    keys = (secrets.token_bytes(32),)
    good = asps_server.serve(env.config(ok_policy, token_keys=keys, replica_id="good"))
    down = asps_server.serve(env.config(down_policy, token_keys=keys, replica_id="down"))
    hosts = [f"127.0.0.1:{down.port}", f"127.0.0.1:{good.port}"]
    ev = env.evidence(ENCLAVE_1)
    try:
        results: list[asps_client.Result] = []
        failures: list[asps_client.ClientError] = []
        for _ in range(24):
            try:
                results.append(asps_client.fetch_secrets(hosts, ca=env.ca, evidence=ev))
            except asps_client.RetryLater as e:  # both picks on "down": see the README on rotation
                failures.append(e)
        assert all(r.secrets == {"k": value.encode()} and r.replica == "good" for r in results)
        assert any(r.attempts == 2 for r in results), [r.attempts for r in results]  # down, then good
        assert all("(replica down)" in str(e) for e in failures)
        assert len(failures) < len(results), (len(failures), len(results))
        print(
            f"\none replica's KMS down: {len(results)} of 24 attestations succeeded, "
            f"{sum(r.attempts == 2 for r in results)} of them on the retry; {len(failures)} met 'down' twice"
        )
        # pick_first: "down" is first and stays picked, so the retry meets it again
        with pytest.raises(asps_client.RetryLater, match=r"replica down\).*KMS is unreachable") as info:
            asps_client.fetch_secrets(hosts, ca=env.ca, evidence=ev, lb="pick_first")
        assert info.value.exit_code == asps_client.EXIT_RETRY_LATER
        r = asps_client.fetch_secrets(hosts[::-1], ca=env.ca, evidence=ev, lb="pick_first", retries=0)
        assert (r.replica, r.attempts) == ("good", 1)
    finally:
        good.stop(0)
        down.stop(0)


def test_host_lists_become_one_static_target() -> None:
    parse, target = asps_client.parse_hosts, asps_client.channel_target
    assert parse("a:1, b:2,a:1") == ("a:1", "b:2")
    assert parse(["a:1", "b:2,c:3"]) == ("a:1", "b:2", "c:3")
    assert parse("dns:///asps.example:50051") == ("dns:///asps.example:50051",)  # one: any gRPC target
    for bad in ("a:1,,b:2", "a:1,b", "a:1,b:0", "a:1,b:99999", "::1:5,a:1", "[::1:5,a:1", ""):
        with pytest.raises(asps_client.UsageError):
            parse(bad)
    assert target(("dns:///x:1",)) == ("dns:///x:1", None)
    assert target(("127.0.0.1:1", "localhost:2")) == ("ipv4:127.0.0.1:1,127.0.0.1:2", "127.0.0.1")
    assert target(("[::1]:1", "[::1]:2")) == ("ipv6:[::1]:1,[::1]:2", "::1")
    with pytest.raises(asps_client.UsageError, match="one family"):
        target(("[::1]:1", "127.0.0.1:2"))
    with pytest.raises(asps_client.Unreachable, match="cannot resolve"):
        target(("127.0.0.1:1", "no-such-host.invalid:2"))
    with pytest.raises(asps_client.UsageError):
        asps_client.service_config("grpclb")
    config = json.loads(asps_client.service_config("pick_first"))
    assert config["loadBalancingConfig"] == [{"pick_first": {}}]
    assert config["methodConfig"][0]["name"] == [
        {"service": "asps.v1.SecretProvision", "method": "GetChallenge"}
    ]
