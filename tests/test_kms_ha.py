"""VaultAgent against a real 3-node OpenBao raft cluster: any node serves, the active node dies and a
standby takes over, refusals are never retried elsewhere, and a dead cluster fails within the deadline.

Both ways a standby can answer are covered: OpenBao's default (standbys read from their own replica)
and ``disable_standby_reads = true`` (standbys forward, or redirect with 307 when asked not to forward
or when forwarding fails because the active node is gone).
"""

from __future__ import annotations

import collections
import secrets
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import requests
from openbao import OpenBaoCluster, SilentListener

from kms import KmsDenied, KmsNotFound, KmsUnavailable, VaultAgent

APP1 = {"image_key": "ha-app1-" + secrets.token_hex(8)}
APP2 = {"image_key": "ha-app2-" + secrets.token_hex(8), "rsa": "ha-app2-rsa-" + secrets.token_hex(8)}


class CountingSession(requests.Session):
    """A real Session that counts the requests each node (host:port) receives, redirects included.

    ``no_forwarding`` adds ``X-Vault-No-Request-Forwarding`` so that forwarding standbys answer 307
    (what a standby that cannot or will not forward does) instead of forwarding.
    """

    def __init__(self, *, no_forwarding: bool = False) -> None:
        super().__init__()
        self.trust_env = False
        self.per_node: collections.Counter[str] = collections.Counter()
        if no_forwarding:
            self.headers["X-Vault-No-Request-Forwarding"] = "true"

    def send(self, request, **kwargs):  # type: ignore[override]
        self.per_node[urllib.parse.urlsplit(request.url).netloc] += 1
        return super().send(request, **kwargs)

    def count(self, addr: str) -> int:
        return self.per_node[urllib.parse.urlsplit(addr).netloc]


@dataclass(frozen=True)
class HA:
    """One cluster under test, how its standbys answer, and two apps' tokens."""

    cluster: OpenBaoCluster
    mode: str  # "standby-reads" (OpenBao's default) or "forwarding" (disable_standby_reads = true)
    tokens: dict[str, str]

    @property
    def forbidden(self) -> list[str]:
        """Every value that must never appear in a message."""
        c = self.cluster
        return [*APP1.values(), *APP2.values(), *self.tokens.values(), c.root_token or "", c.unseal_key or ""]


@pytest.fixture(scope="module", params=["standby-reads", "forwarding"])
def ha(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HA]:
    """A formed cluster holding two apps' secrets (write_secrets.sh layout, KV v1 and v2)."""
    extra = "disable_standby_reads = true\n" if request.param == "forwarding" else ""
    cluster = OpenBaoCluster(tmp_path_factory.mktemp(f"ha-{request.param}"), extra_config=extra)
    started = time.monotonic()
    try:
        cluster.start()
        formed = time.monotonic() - started
        loading = time.monotonic()
        tokens = {
            "app1": cluster.add_app(1, APP1, kv_version=1),
            "app2": cluster.add_app(2, APP2, kv_version=2),
        }
        # standbys read from their own replica: wait until each serves what was just written
        cluster.wait_readable("occlum/1/image_key", "occlum/2/image_key", "occlum/2/rsa")
        print(
            f"\n[{request.param}] 3-node cluster formed in {formed:.1f}s; "
            f"secrets readable on every node {time.monotonic() - loading:.1f}s after loading began"
        )
        yield HA(cluster, request.param, tokens)
    finally:
        cluster.close()


def assert_clean(exc: BaseException, values: list[str]) -> None:
    text = f"{exc!s} {exc!r} {exc.args!r}"
    for value in values:
        assert value and value not in text, "a secret value or token leaked into an exception message"


def standbys_first(c: OpenBaoCluster) -> list[str]:
    active = c.active()
    return [a for i, a in enumerate(c.addrs) if i != active] + [c.addrs[active]]


# ------------------------------------------------------------------------------------------ reads
def test_every_node_serves_reads(ha: HA) -> None:
    cluster = ha.cluster
    active = cluster.active()
    for i, addr in enumerate(cluster.addrs):
        session = CountingSession()
        a1 = VaultAgent(addr, ha.tokens["app1"], session=session)
        a2 = VaultAgent(addr, ha.tokens["app2"], session=session)
        assert a1.get("occlum/1/image_key") == APP1["image_key"].encode(), f"node{i}"
        assert a2.get("occlum/2/rsa") == APP2["rsa"].encode(), f"node{i}"
        # a standby answered itself (local read or forwarding over the cluster port): one request
        # per step on this node, none over HTTP to any other node
        assert session.count(addr) == 4 and sum(session.per_node.values()) == 4, (i, active, session.per_node)
    # the three nodes as one agent, in both configured forms, starting on a standby
    listed = standbys_first(cluster)
    for addr in (listed, ",".join(listed), " , ".join(listed)):
        agent = VaultAgent(addr, ha.tokens["app2"])
        assert agent.addrs == tuple(listed)
        assert agent.get("occlum/2/image_key") == APP2["image_key"].encode()
        assert agent.current_addr == listed[0], "a node that answers is kept"


@pytest.mark.parametrize("ha", ["forwarding"], indirect=True)  # standbys reading locally never redirect
def test_standby_redirect_is_followed_to_a_listed_node_only(ha: HA) -> None:
    cluster = ha.cluster
    active = cluster.addrs[cluster.active()]
    standby = standbys_first(cluster)[0]
    # the standby answers 307 -> the active node, which is listed: followed, and kept from then on
    session = CountingSession(no_forwarding=True)
    agent = VaultAgent([standby, active], ha.tokens["app1"], session=session)
    assert agent.get("occlum/1/image_key") == APP1["image_key"].encode()
    assert session.count(standby) == 1 and session.count(active) == 2, session.per_node
    assert agent.current_addr == active
    # the active node is not listed: the token is not sent there; no node gives a verdict
    session = CountingSession(no_forwarding=True)
    alone = VaultAgent(standby, ha.tokens["app1"], session=session, retries=1, backoff=0.01)
    with pytest.raises(KmsUnavailable, match="not in the configured list") as info:
        alone.get("occlum/1/image_key")
    assert session.count(active) == 0 and session.count(standby) == 2, session.per_node
    assert_clean(info.value, ha.forbidden)


# ------------------------------------------------------------------------------------------ refusals
def test_refusals_are_not_retried_on_any_node(ha: HA) -> None:
    cluster = ha.cluster
    session = CountingSession()
    listed = standbys_first(cluster)
    agent = VaultAgent(listed, ha.tokens["app1"], session=session, retries=5)
    assert agent.get("occlum/1/image_key") == APP1["image_key"].encode()  # occlum/1 detected, cached
    session.per_node.clear()
    # 403: app 1's token on app 2's mount -> the mount check (403) and one token check, same node
    with pytest.raises(KmsDenied, match="occlum/2") as info:
        agent.get("occlum/2/image_key")
    assert not info.value.token_invalid
    assert_clean(info.value, ha.forbidden)
    assert dict(session.per_node) == {urllib.parse.urlsplit(listed[0]).netloc: 2}, session.per_node
    # 404: one request, nowhere else
    session.per_node.clear()
    with pytest.raises(KmsNotFound):
        agent.get("occlum/1/nothing")
    assert dict(session.per_node) == {urllib.parse.urlsplit(listed[0]).netloc: 1}, session.per_node
    # a dead token: 403 on the read's mount check, then lookup-self 403 -> invalid, 2 requests in all
    session.per_node.clear()
    wrong = VaultAgent(listed, "s." + secrets.token_urlsafe(18), session=session, retries=5)
    with pytest.raises(KmsDenied, match="invalid, expired or revoked") as info:
        wrong.get("occlum/1/image_key")
    assert info.value.token_invalid
    assert sum(session.per_node.values()) == 2 and len(session.per_node) == 1, session.per_node


# ------------------------------------------------------------------------------------------ failover
def test_active_killed_standby_takes_over_same_agent_keeps_reading(
    ha: HA, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster = ha.cluster
    mode = ha.mode
    dead = cluster.active()
    listed = [cluster.addrs[dead]] + [a for i, a in enumerate(cluster.addrs) if i != dead]
    session = CountingSession()
    deadline = 15.0
    agent1 = VaultAgent(
        listed, ha.tokens["app1"], session=session, timeout=2.0, retries=8, backoff=0.1, deadline=deadline
    )
    agent2 = VaultAgent(
        listed, ha.tokens["app2"], session=session, timeout=2.0, retries=8, backoff=0.1, deadline=deadline
    )
    assert agent1.get("occlum/1/image_key") == APP1["image_key"].encode()
    assert agent2.get("occlum/2/rsa") == APP2["rsa"].encode()
    assert agent1.current_addr == cluster.addrs[dead]

    cluster.kill(dead)
    killed_at = time.monotonic()
    takeover: list[float] = []

    def watch() -> None:  # when does a survivor report itself active?
        try:
            cluster.active(wait=30)
            takeover.append(time.monotonic() - killed_at)
        except RuntimeError:
            pass

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    reads: list[tuple[float, float]] = []  # (started after kill, duration) of each read
    try:
        while watcher.is_alive() or len(reads) < 5:
            began = time.monotonic()
            assert agent1.get("occlum/1/image_key") == APP1["image_key"].encode()
            assert agent2.get("occlum/2/image_key") == APP2["image_key"].encode()
            took = time.monotonic() - began
            assert took < deadline
            reads.append((began - killed_at, took))
            time.sleep(0.02)  # steady load, leaving the 2 CPUs to the election
            if time.monotonic() - killed_at > 40:
                break
    finally:
        watcher.join(35)
    assert takeover, f"no standby became active; health {cluster.health()}"
    first_read = reads[0][0] + reads[0][1]
    slowest = max(t for _, t in reads)
    with capsys.disabled():
        print(
            f"\n[{mode}] active node{dead} SIGKILLed: first read by the same agent after "
            f"{first_read:.2f}s, slowest read {slowest:.2f}s ({len(reads)} reads, 0 errors); "
            f"a standby became active after {takeover[0]:.2f}s"
        )
    # sticky: the agent left the dead node and does not go back to it first
    assert agent1.current_addr != cluster.addrs[dead]
    session.per_node.clear()
    assert agent1.get("occlum/1/image_key") == APP1["image_key"].encode()
    assert session.count(cluster.addrs[dead]) == 0, session.per_node
    # the killed node comes back as a standby and serves again
    cluster.start(dead)
    cluster.wait_formed()
    cluster.wait_readable("occlum/2/rsa")
    back = VaultAgent(cluster.addrs[dead], ha.tokens["app2"])
    assert back.get("occlum/2/rsa") == APP2["rsa"].encode()


@pytest.fixture
def silent_node() -> Iterator[str]:
    """A listener that accepts and never answers: a hung node."""
    with SilentListener() as hung:
        yield hung.addr


def test_all_nodes_down_is_unavailable_within_the_deadline(ha: HA, silent_node: str) -> None:
    """Last in the module: leaves every node of this cluster dead."""
    cluster = ha.cluster
    agent = VaultAgent(cluster.addrs, ha.tokens["app1"], timeout=2.0, retries=2, backoff=0.05)
    assert agent.get("occlum/1/image_key") == APP1["image_key"].encode()
    for i in range(len(cluster.nodes)):
        cluster.kill(i)
    # refused everywhere: fast, every node tried in every round
    session = CountingSession()
    refused = VaultAgent(cluster.addrs, ha.tokens["app1"], session=session, retries=2, backoff=0.05)
    began = time.monotonic()
    with pytest.raises(KmsUnavailable, match="all 3 Vault nodes unavailable after 9 attempt") as info:
        refused.get("occlum/1/image_key")
    assert time.monotonic() - began < 1.5
    assert all(session.count(a) == 3 for a in cluster.addrs), session.per_node
    assert_clean(info.value, ha.forbidden)
    # the same agent that worked, now with a hung node first: the deadline bounds it all
    hung = VaultAgent(
        [silent_node, *cluster.addrs], ha.tokens["app1"], timeout=1.0, retries=50, backoff=0.05, deadline=2.5
    )
    began = time.monotonic()
    with pytest.raises(KmsUnavailable, match=r"deadline of 2\.5s reached") as info:
        hung.get("occlum/1/image_key")
    elapsed = time.monotonic() - began
    assert 2.0 <= elapsed < 3.0, elapsed
    assert_clean(info.value, ha.forbidden)
    with pytest.raises(KmsUnavailable, match="all 3 Vault nodes"):
        agent.get("occlum/1/image_key")


def test_addr_forms_are_checked() -> None:
    from kms import KmsConfigError

    assert VaultAgent("http://a:1", "s.x").addrs == ("http://a:1",)
    assert VaultAgent("http://a:1/, http://b:2", "s.x").addrs == ("http://a:1", "http://b:2")
    assert VaultAgent(["http://a:1", "http://a:1/"], "s.x").addrs == ("http://a:1",)
    assert VaultAgent(("http://a:1", "https://b:2"), "s.x").addr == "http://a:1,https://b:2"
    for bad in (
        [],
        "http://a:1,,http://b:2",
        "http://a:1,",
        ["http://a:1", "b:2"],
        [1],
        "http://a:1,ftp://b",
    ):
        with pytest.raises(KmsConfigError):
            VaultAgent(bad, "s.x")  # type: ignore[arg-type]
    with pytest.raises(KmsConfigError, match="deadline"):
        VaultAgent("http://a:1", "s.x", deadline=0)
    assert VaultAgent("http://a:1", "s.x", timeout=2, retries=2, backoff=0.1).deadline == pytest.approx(6.3)
