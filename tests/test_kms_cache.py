"""VaultAgent's urllib3 transport and its opt-in value cache, against a real OpenBao.

Off by default: every get reads Vault. With cache_ttl a value is read once per TTL, errors are never
kept, and a policy reload (new agents) starts empty. Requests are counted by a transport that wraps
the agent's own (real urllib3, real HTTP): no mock stands in for Vault.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from openbao import OpenBao, openbao_server  # noqa: F401  (fixture)

import kms
import policy
from kms import HttpReply, KmsConfigError, KmsNotFound, Urllib3Transport, VaultAgent

VALUE = "cache-v1-" + secrets.token_hex(8)


class CountingTransport:
    """The agent's real transport, counting the URLs it sends (to tell a Vault read from a cache hit)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.urls: list[str] = []

    def request(self, method: str, url: str, **kw: Any) -> Any:
        self.urls.append(url)
        return self.inner.request(method, url, **kw)

    def close(self) -> None:
        self.inner.close()

    def reads(self, path: str) -> int:
        return sum(u.endswith("/v1/" + path) for u in self.urls)


def counted(agent: kms.KmsAgent) -> CountingTransport:
    assert isinstance(agent, VaultAgent)
    counter = CountingTransport(agent._transport)
    agent._transport = counter
    return counter


@pytest.fixture(scope="module")
def bao(openbao_server: OpenBao) -> OpenBao:  # noqa: F811
    b = openbao_server
    b.enable_kv("cache", version=1)
    b.kv_put("cache/image_key", {"key": VALUE})
    b.read_policy("cacheapp", "cache/*")
    return b


@pytest.fixture(scope="module")
def token(bao: OpenBao) -> str:
    return bao.create_token(["cacheapp"])


def test_default_transport_is_urllib3_and_kms_does_not_import_requests() -> None:
    agent = VaultAgent("http://127.0.0.1:1", "s.tok")
    assert isinstance(agent._transport, Urllib3Transport) and agent.cache_ttl == 0
    code = "import sys, kms; kms.VaultAgent('http://127.0.0.1:1', 's.tok'); print('requests' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_off_by_default_every_get_reads_vault(bao: OpenBao, token: str) -> None:
    agent = VaultAgent(bao.addr, token)
    counter = counted(agent)
    for _ in range(3):
        assert agent.get("cache/image_key") == VALUE.encode()
    assert counter.reads("cache/image_key") == 3, counter.urls


def test_on_reads_within_ttl_hit_the_cache_and_expire(bao: OpenBao, token: str) -> None:
    agent = VaultAgent(bao.addr, token, cache_ttl=3600)
    counter = counted(agent)
    for _ in range(3):
        assert agent.get("cache/image_key") == VALUE.encode()
    assert agent.get("cache/image_key#key") == VALUE.encode()  # the same reference, spelled out
    assert counter.reads("cache/image_key") == 1, counter.urls
    # a rotated value is served from the cache until the TTL ends, then read again
    first, rotated = "rot-1-" + secrets.token_hex(8), "rot-2-" + secrets.token_hex(8)
    bao.kv_put("cache/rotating", {"key": first})
    short = VaultAgent(bao.addr, token, cache_ttl=0.05)
    counter = counted(short)
    assert agent.get("cache/rotating") == first.encode() and short.get("cache/rotating") == first.encode()
    bao.kv_put("cache/rotating", {"key": rotated})
    time.sleep(0.1)
    assert agent.get("cache/rotating") == first.encode()
    assert short.get("cache/rotating") == rotated.encode()
    assert counter.reads("cache/rotating") == 2, counter.urls


def test_errors_are_never_cached(bao: OpenBao, token: str) -> None:
    agent = VaultAgent(bao.addr, token, cache_ttl=3600)
    counter = counted(agent)
    for _ in range(2):
        with pytest.raises(KmsNotFound):
            agent.get("cache/absent")
    assert counter.reads("cache/absent") == 2, counter.urls
    agent.close()  # close empties the cache
    assert agent._cache == {}


def test_cache_ttl_is_checked() -> None:
    for bad in (-1, True, "60", 86401):
        with pytest.raises(KmsConfigError, match="cache_ttl"):
            VaultAgent("http://127.0.0.1:1", "s.tok", cache_ttl=bad)
    assert kms.agent_from_config("vault", addr="http://127.0.0.1:1", token="s.t", cache_ttl=5).cache_ttl == 5


def write_policy(path: Path, bao: OpenBao, token: str, **top: Any) -> Path:
    doc = {
        "kms": "vault",
        "addr": bao.addr,
        **top,
        "app_list": [
            {"id": 1, "mr_enclave": "ab" * 32, "app_token": token, "secrets": {"k": "cache/image_key"}}
        ],
    }
    path.write_text(json.dumps(doc))
    path.chmod(0o600)
    return path


def test_policy_cache_ttl_off_by_default_on_when_set_and_dropped_on_reload(
    bao: OpenBao, token: str, tmp_path: Path
) -> None:
    plain = policy.load_policy(write_policy(tmp_path / "plain.json", bao, token))
    agent = plain.apps[0].agent
    assert isinstance(agent, VaultAgent) and agent.cache_ttl == 0
    counter = counted(agent)
    plain.apps[0].fetch(["k"])
    plain.apps[0].fetch(["k"])
    assert counter.reads("cache/image_key") == 2

    file = write_policy(tmp_path / "cached.json", bao, token, cache_ttl=600)
    first = policy.load_policy(file)
    counter = counted(first.apps[0].agent)
    assert first.apps[0].fetch(["k"]) == {"k": VALUE.encode()}
    assert first.apps[0].fetch(["k"]) == {"k": VALUE.encode()}
    assert counter.reads("cache/image_key") == 1
    # a reload (SIGHUP loads the file again) makes new agents: nothing carried over
    again = policy.load_policy(file)
    counter = counted(again.apps[0].agent)
    assert again.apps[0].fetch(["k"]) == {"k": VALUE.encode()}
    assert counter.reads("cache/image_key") == 1

    for bad in (-1, "60", True, 10**6):
        with pytest.raises(policy.PolicyError, match="cache_ttl"):
            policy.load_policy(write_policy(tmp_path / "bad.json", bao, token, cache_ttl=bad))


def test_reply_repr_never_shows_the_body() -> None:
    reply = HttpReply(200, {"X": "y"}, json.dumps({"data": {"key": VALUE}}).encode())
    assert VALUE not in repr(reply) and reply.json()["data"]["key"] == VALUE


def test_urllib3_transport_failures_are_named(tmp_path: Path) -> None:
    """A refused connection is a retryable failure in requests' words; a bad CA a TLS one."""
    transport = Urllib3Transport()
    headers: Mapping[str, str] = {"Accept": "application/json"}
    url = "http://127.0.0.1:1/v1/x"
    out = transport.request("GET", url, headers=headers, body=None, cert=None, timeout=(1, 1))
    assert isinstance(out, kms._Failure) and out.retryable and "Connection refused" in out.problem
    transport.close()


def test_urllib3_transport_trusts_what_requests_trusted(tmp_path: Path) -> None:
    """No ca_file: certifi's bundle, as requests' verify=True; with one: only that file."""
    certifi = pytest.importorskip("certifi")
    assert Urllib3Transport()._pool("https://127.0.0.1:1", None).ca_certs == certifi.where()
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    pool = Urllib3Transport(str(ca))._pool("https://127.0.0.1:1", None)
    assert pool.ca_certs == str(ca) and pool.cert_reqs == "CERT_REQUIRED"
