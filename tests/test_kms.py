"""KMS agents against a real OpenBao (KV v1 and v2, tokens, policies, outages) and the JSON backend."""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import requests
from asps_testkit import HttpStandIn, send_reply
from openbao import OpenBao, SilentListener, openbao_server  # noqa: F401  (openbao_server is a fixture)

import kms
from kms import (
    JsonAgent,
    KmsAgent,
    KmsConfigError,
    KmsDenied,
    KmsError,
    KmsNotFound,
    KmsUnavailable,
    VaultAgent,
    agent_from_config,
    parse_ref,
)

V1 = {"key": "v1-image-" + secrets.token_hex(8), "other": "v1-other-" + secrets.token_hex(8)}
V2 = {"key": "v2-image-" + secrets.token_hex(8), "pem": "-----BEGIN X-----\nv2-ü-" + secrets.token_hex(8)}
APP2 = {"key": "app2-only-" + secrets.token_hex(8)}


class CountingSession(requests.Session):
    """A real Session that records which URLs it was asked for (to check retries and caching)."""

    def __init__(self) -> None:
        super().__init__()
        self.trust_env = False
        self.urls: list[str] = []

    def request(self, method, url, *args, **kwargs):  # type: ignore[override]
        self.urls.append(url)
        return super().request(method, url, *args, **kwargs)


@pytest.fixture(scope="module")
def bao(openbao_server: OpenBao) -> OpenBao:  # noqa: F811
    """Two apps' mounts like write_secrets.sh makes them: occlum/1 KV v1, occlum/2 KV v2."""
    b = openbao_server
    b.enable_kv("occlum/1", version=1)
    b.enable_kv("occlum/2", version=2)
    b.kv_put("occlum/1/image_key", V1)
    b.kv_put("occlum/1/dir/nested", {"key": "nested-" + secrets.token_hex(4)})
    b.kv_put("occlum/2/image_key", V2)
    b.kv_put("occlum/2/app2_secret", APP2)
    b.read_policy("app1", "occlum/1/*")
    b.read_policy("app2", "occlum/2/data/*")
    return b


@pytest.fixture(scope="module")
def tokens(bao: OpenBao) -> dict[str, str]:
    return {"app1": bao.create_token(["app1"]), "app2": bao.create_token(["app2"])}


@pytest.fixture
def running(bao: OpenBao) -> Iterator[OpenBao]:
    """The server, guaranteed up and unsealed again after a test that stops or seals it."""
    yield bao
    if not bao.running:
        bao.start()
    bao.unseal()
    bao.wait_active()


def all_secret_values(tokens: dict[str, str], bao: OpenBao) -> list[str]:
    return [
        *V1.values(),
        *V2.values(),
        *APP2.values(),
        *tokens.values(),
        bao.root_token or "",
        bao.unseal_key or "",
    ]


def assert_clean(exc: BaseException, forbidden: list[str]) -> None:
    text = f"{exc!s} {exc!r} {exc.args!r}"
    for value in forbidden:
        assert value and value not in text, "a secret value or token leaked into an exception message"


# ------------------------------------------------------------------------------------------ reads
def test_kv_v1_default_field_and_field_selection(bao: OpenBao, tokens: dict[str, str]) -> None:
    agent = VaultAgent(bao.addr, tokens["app1"])
    assert agent.get("occlum/1/image_key") == V1["key"].encode()
    assert agent.get("occlum/1/image_key#other") == V1["other"].encode()
    assert agent.get("occlum/1/dir/nested").startswith(b"nested-")
    assert isinstance(agent, KmsAgent)


def test_kv_v2_default_field_field_selection_and_utf8(bao: OpenBao, tokens: dict[str, str]) -> None:
    agent = VaultAgent(bao.addr, tokens["app2"])
    assert agent.get("occlum/2/image_key") == V2["key"].encode()
    value = agent.get("occlum/2/image_key#pem")
    assert value == V2["pem"].encode("utf-8") and "ü".encode() in value


def test_mount_version_detected_once_per_mount(bao: OpenBao) -> None:
    session = CountingSession()
    agent = VaultAgent(bao.addr, bao.root_token or "", session=session)
    for _ in range(3):
        agent.get("occlum/1/image_key")
        agent.get("occlum/2/image_key")
    detections = [u for u in session.urls if "/sys/internal/ui/mounts/" in u]
    assert len(detections) == 2, session.urls
    assert sum("/v1/occlum/2/data/image_key" in u for u in session.urls) == 3


def test_configured_kv_version_must_match_the_mount(bao: OpenBao) -> None:
    assert (
        VaultAgent(bao.addr, bao.root_token or "", kv_version=2).get("occlum/2/image_key")
        == V2["key"].encode()
    )
    with pytest.raises(KmsConfigError, match="KV v2"):
        VaultAgent(bao.addr, bao.root_token or "", kv_version=1).get("occlum/2/image_key")


# ------------------------------------------------------------------------------------------ not found
def test_missing_path_and_field_are_not_found(bao: OpenBao, tokens: dict[str, str]) -> None:
    forbidden = all_secret_values(tokens, bao)
    a1, a2 = VaultAgent(bao.addr, tokens["app1"]), VaultAgent(bao.addr, tokens["app2"])
    cases = [
        (a1, "occlum/1/nothing", "no secret at occlum/1/nothing"),
        (a2, "occlum/2/nothing", "no secret at occlum/2/nothing"),
        (a1, "occlum/1/image_key#nope", "no field 'nope'"),
        (a2, "occlum/2/image_key#nope", "no field 'nope'"),
        (a2, "occlum/2/data/image_key", "omit 'data/'"),
    ]
    for agent, ref, message in cases:
        with pytest.raises(KmsNotFound, match=message) as info:
            agent.get(ref)
        assert_clean(info.value, forbidden)
    # field names are listed to help, values never
    with pytest.raises(KmsNotFound, match="fields: key, other"):
        a1.get("occlum/1/image_key#nope")


def test_deleted_kv_v2_secret_is_not_found(bao: OpenBao) -> None:
    bao.kv_put("occlum/2/short_lived", {"key": "gone-soon"})
    agent = VaultAgent(bao.addr, bao.root_token or "")
    assert agent.get("occlum/2/short_lived") == b"gone-soon"
    bao.kv_delete("occlum/2/short_lived")
    with pytest.raises(KmsNotFound, match="occlum/2/short_lived"):
        agent.get("occlum/2/short_lived")


def test_reference_naming_the_mount_itself_is_a_config_error(bao: OpenBao) -> None:
    with pytest.raises(KmsConfigError, match="names the mount itself"):
        VaultAgent(bao.addr, bao.root_token or "").get("occlum/1")


# ------------------------------------------------------------------------------------------ denied
def test_wrong_token_is_denied_as_invalid(bao: OpenBao, tokens: dict[str, str]) -> None:
    wrong = "s." + secrets.token_urlsafe(18)
    with pytest.raises(KmsDenied, match="invalid, expired or revoked") as info:
        VaultAgent(bao.addr, wrong).get("occlum/1/image_key")
    assert info.value.token_invalid
    assert_clean(info.value, [*all_secret_values(tokens, bao), wrong])


def test_app1_token_cannot_read_app2_secrets(bao: OpenBao, tokens: dict[str, str]) -> None:
    agent = VaultAgent(bao.addr, tokens["app1"])
    for ref in ("occlum/2/app2_secret", "occlum/2/image_key#pem"):
        with pytest.raises(KmsDenied, match="occlum/2/") as info:
            agent.get(ref)
        assert not info.value.token_invalid
        assert_clean(info.value, all_secret_values(tokens, bao))
    # and the other way round, on a path inside a mount app 2 can use but outside its policy
    bao.read_policy("app2-narrow", "occlum/2/data/image_key")
    narrow = VaultAgent(bao.addr, bao.create_token(["app2-narrow"]))
    assert narrow.get("occlum/2/image_key") == V2["key"].encode()
    with pytest.raises(KmsDenied, match="policies do not allow") as info:
        narrow.get("occlum/2/app2_secret")
    assert not info.value.token_invalid


def test_denial_is_not_retried(bao: OpenBao, tokens: dict[str, str]) -> None:
    session = CountingSession()
    agent = VaultAgent(bao.addr, tokens["app1"], session=session, retries=5)
    agent.get("occlum/1/image_key")  # mount detection cached
    session.urls.clear()
    with pytest.raises(KmsDenied):
        agent.get("occlum/2/app2_secret")
    # one detection for occlum/2 (403) and one token check: no repetition of a refused request
    assert len(session.urls) == 2, session.urls
    assert sum("lookup-self" in u for u in session.urls) == 1


def test_expired_and_revoked_tokens_are_denied_as_invalid(bao: OpenBao, tokens: dict[str, str]) -> None:
    short = bao.create_token(["app1"], ttl="1s")
    revoked = bao.create_token(["app1"])
    a_short, a_revoked = VaultAgent(bao.addr, short), VaultAgent(bao.addr, revoked)
    assert a_short.get("occlum/1/image_key") == V1["key"].encode()
    assert a_revoked.get("occlum/1/image_key") == V1["key"].encode()
    bao.revoke_token(revoked)
    time.sleep(1.3)
    for agent, token in ((a_short, short), (a_revoked, revoked)):
        with pytest.raises(KmsDenied, match="invalid, expired or revoked") as info:
            agent.get("occlum/1/image_key")
        assert info.value.token_invalid
        assert_clean(info.value, [*all_secret_values(tokens, bao), token])


# ------------------------------------------------------------------------------------------ outages
def test_server_stopped_is_unavailable_fast_and_same_agent_recovers(
    running: OpenBao, tokens: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    bao = running
    agent = VaultAgent(bao.addr, tokens["app2"], timeout=2.0, retries=2, backoff=0.05)
    assert agent.get("occlum/2/image_key") == V2["key"].encode()
    bao.stop()
    caplog.set_level(logging.DEBUG, logger="asps.kms")
    start = time.monotonic()
    with pytest.raises(KmsUnavailable, match="unavailable after 3 attempt") as info:
        agent.get("occlum/2/image_key")
    elapsed = time.monotonic() - start
    assert elapsed < 1.5, f"refused connections must fail fast, took {elapsed:.2f}s"
    assert_clean(info.value, all_secret_values(tokens, bao))
    assert "retrying" in caplog.text
    for value in all_secret_values(tokens, bao):
        assert value not in caplog.text
    bao.start()
    assert agent.get("occlum/2/image_key") == V2["key"].encode()
    assert agent.get("occlum/2/app2_secret") == APP2["key"].encode()


def test_sealed_server_is_unavailable_and_retried(running: OpenBao, tokens: dict[str, str]) -> None:
    bao = running
    session = CountingSession()
    agent = VaultAgent(bao.addr, tokens["app1"], retries=2, backoff=0.01, session=session)
    assert agent.get("occlum/1/image_key") == V1["key"].encode()
    bao.seal()
    session.urls.clear()
    with pytest.raises(KmsUnavailable, match="sealed") as info:
        agent.get("occlum/1/image_key")
    assert len(session.urls) == 3, "a 503 is retried (retries=2 -> 3 attempts)"
    assert_clean(info.value, all_secret_values(tokens, bao))
    bao.unseal()
    bao.wait_active()
    assert agent.get("occlum/1/image_key") == V1["key"].encode()


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A TCP listener that accepts connections and never answers (a hung KMS)."""
    with SilentListener() as hung:
        yield hung.addr


def test_hung_server_is_unavailable_by_timeout(silent_server: str) -> None:
    agent = VaultAgent(silent_server, "s.whatever", timeout=0.4, retries=1, backoff=0.05)
    start = time.monotonic()
    with pytest.raises(KmsUnavailable, match="ReadTimeout"):
        agent.get("occlum/1/image_key")
    elapsed = time.monotonic() - start
    # two attempts of 0.4 s plus a 0.05 s pause: bounded, no hang
    assert 0.8 <= elapsed < 2.0, elapsed


@pytest.fixture
def odd_vault() -> Iterator[tuple[str, dict[str, tuple[int, dict[str, str], bytes]]]]:
    """An HTTP server answering each path (query ignored) as told in the returned dict:
    (status, headers, body); 404 otherwise.  Stands in for a broken or hostile Vault."""
    answers: dict[str, tuple[int, dict[str, str], bytes]] = {}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            status, headers, body = answers.get(self.path.split("?")[0], (404, {}, b""))
            send_reply(self, status, headers, body)

    vault = HttpStandIn(Handler)
    try:
        yield vault.url, answers
    finally:
        vault.close()


def test_odd_vault_answers_are_kms_errors(odd_vault: tuple[str, dict]) -> None:
    """Regressions: a redirect to a malformed Location raised ValueError (urlsplit / .port), a body
    nested deeper than the stack RecursionError (reply.json())."""
    url, answers = odd_vault
    mounts = "/v1/sys/internal/ui/mounts/kv/x"
    for location in ("http://[::1", "http://127.0.0.1:99999/v1/x"):
        answers[mounts] = (307, {"Location": location}, b"")
        with pytest.raises(KmsUnavailable, match="redirect"):
            VaultAgent(url, "s.tok", retries=0).get("kv/x")
    answers[mounts] = (200, {"Content-Type": "application/json"}, b"[" * 100_000)
    with pytest.raises(KmsError, match="malformed"):
        VaultAgent(url, "s.tok", retries=0).get("kv/x")
    # a value with a lone surrogate (JSON escape) cannot become bytes: KmsError naming the reference
    answers[mounts] = (200, {}, json.dumps({"data": {"path": "kv/", "type": "kv"}}).encode())
    answers["/v1/kv/x"] = (200, {}, b'{"data": {"key": "v\\ud800"}}')
    with pytest.raises(KmsError, match="kv/x#key") as info:
        VaultAgent(url, "s.tok", retries=0).get("kv/x")
    assert "\ud800" not in str(info.value)


def test_https_with_ca_file(tmp_path: Path) -> None:
    with OpenBao(tmp_path / "tls", tls=True) as bao:
        bao.enable_kv("occlum/1", version=1)
        bao.kv_put("occlum/1/image_key", {"key": "over-tls"})
        token = bao.create_token(["root"])
        assert bao.addr.startswith("https://")
        assert VaultAgent(bao.addr, token, ca_file=bao.ca_file).get("occlum/1/image_key") == b"over-tls"
        # without the CA the certificate is not trusted: a TLS error, not "unavailable", no retry
        with pytest.raises(KmsError, match="TLS error") as info:
            VaultAgent(bao.addr, token).get("occlum/1/image_key")
        assert not isinstance(info.value, KmsUnavailable)
        assert_clean(info.value, [token, "over-tls"])


# ------------------------------------------------------------------------------------------ config
def test_agent_configuration_is_checked_without_echoing_the_token() -> None:
    token = "s.secret\ntoken"
    with pytest.raises(KmsConfigError) as info:
        VaultAgent("http://127.0.0.1:8200", token)
    assert_clean(info.value, [token, "s.secret"])
    for addr in ("127.0.0.1:8200", "ftp://x", "http://u:p@host:1", ""):
        with pytest.raises(KmsConfigError):
            VaultAgent(addr, "s.tok")
    with pytest.raises(KmsConfigError):
        VaultAgent("http://127.0.0.1:8200", " ")
    with pytest.raises(KmsConfigError, match="CA file"):
        VaultAgent("https://127.0.0.1:8200", "s.tok", ca_file="/nonexistent/ca.pem")
    agent = VaultAgent("http://127.0.0.1:8200/", "  s.tok-value  ")
    assert agent.addr == "http://127.0.0.1:8200"
    assert "s.tok-value" not in repr(agent)
    # regressions: urlsplit / .port raised ValueError for these
    for addr in (
        "http://[::1",
        "http://[::1]:8200,http://[::1",
        "http://h:99999",
        ["http://h:1", "http://h:-1"],
    ):
        with pytest.raises(KmsConfigError, match="not a valid URL"):
            VaultAgent(addr, "s.tok")


def test_parse_ref() -> None:
    assert parse_ref("occlum/1/image_key") == kms.SecretRef("occlum/1/image_key", "key")
    assert parse_ref("/occlum/1/rsa#pem") == kms.SecretRef("occlum/1/rsa", "pem")
    for bad in ("", "#key", "a//b", "a/../sys/x", "a/./b", "a/b#", "a#b#c", "a b/c", "a/b?x=1"):
        with pytest.raises(KmsConfigError):
            parse_ref(bad)


# ------------------------------------------------------------------------------------------ JSON
def test_json_agent_inline_like_policy_no_kms() -> None:
    agent = JsonAgent({"master_key": "123", "blob": b"\x00\x01", "occlum/1/rsa": {"key": "k", "pem": "p"}})
    assert isinstance(agent, KmsAgent)
    assert agent.get("master_key") == b"123"
    assert agent.get("blob") == b"\x00\x01"
    assert agent.get("occlum/1/rsa") == b"k"
    assert agent.get("occlum/1/rsa#pem") == b"p"
    with pytest.raises(KmsNotFound, match="'nothing'"):
        agent.get("nothing")
    with pytest.raises(KmsNotFound, match="no field 'x'"):
        agent.get("occlum/1/rsa#x")
    with pytest.raises(KmsNotFound, match="plain value"):
        agent.get("master_key#other")
    with pytest.raises(KmsConfigError, match="n must be a string"):
        JsonAgent({"n": 5})


def test_json_agent_refuses_values_with_lone_surrogates(tmp_path: Path) -> None:
    """Regression: a value with a lone surrogate (no UTF-8 form) raised UnicodeEncodeError.  Now a
    KmsConfigError at construction that names the secret, not the value."""
    value = "secret-" + secrets.token_hex(6)
    for values, name in (({"a": value + "\ud800"}, "'a'"), ({"a": {"f": value + "\udc00"}}, "'a'#'f'")):
        with pytest.raises(KmsConfigError, match=name) as info:
            JsonAgent(values)
        assert_clean(info.value, [value])
    path = tmp_path / "surrogate.json"
    path.write_text('{"occlum/1/k": "' + value + '\\ud800"}')  # the JSON escape, as a file holds it
    with pytest.raises(KmsConfigError, match="occlum/1/k") as info:
        JsonAgent.from_file(path)
    assert_clean(info.value, [value])


def test_json_agent_from_file(tmp_path: Path) -> None:
    value = "file-secret-" + secrets.token_hex(6)
    path = tmp_path / "secrets.json"
    path.write_text(json.dumps({"occlum/1/image_key": {"key": value}, "plain": "ü"}))
    agent = JsonAgent.from_file(path)
    assert agent.get("occlum/1/image_key") == value.encode()
    assert agent.get("plain") == "ü".encode()
    assert value not in repr(agent)
    broken = tmp_path / "broken.json"
    broken.write_text('{"a": "' + value + '",,}')
    with pytest.raises(KmsConfigError, match="not valid JSON") as info:
        JsonAgent.from_file(broken)
    assert_clean(info.value, [value])
    with pytest.raises(KmsConfigError, match="cannot read"):
        JsonAgent.from_file(tmp_path / "missing.json")
    # regression: nesting deeper than the stack raised RecursionError
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000)
    with pytest.raises(KmsConfigError, match="nested too deeply"):
        JsonAgent.from_file(deep)


def test_agent_from_config(tmp_path: Path) -> None:
    vault = agent_from_config("vault", addr="http://127.0.0.1:8200", app_token="s.x", timeout=1)
    assert isinstance(vault, VaultAgent) and vault.timeout == 1.0
    assert isinstance(agent_from_config("OpenBao", addr="http://h:1", token="s.x"), VaultAgent)
    assert agent_from_config("none", values={"master_key": "123"}).get("master_key") == b"123"
    (tmp_path / "s.json").write_text('{"a": "b"}')
    assert agent_from_config("json", file=str(tmp_path / "s.json")).get("a") == b"b"
    for kind, cfg in (
        ("ehsm", {}),
        ("vault", {"addr": "http://h:1"}),
        ("vault", {"addr": "http://h:1", "token": "s.x", "tokn": "typo"}),
        ("json", {}),
        ("none", {"values": {}, "file": "x"}),
    ):
        with pytest.raises(KmsConfigError):
            agent_from_config(kind, **cfg)


def test_helper_add_app_matches_write_secrets_layout(bao: OpenBao) -> None:
    value = "app3-" + secrets.token_hex(6)
    token = bao.add_app(3, {"image_key": value}, kv_version=2)
    agent = VaultAgent(bao.addr, token)
    assert agent.get("occlum/3/image_key") == value.encode()
    with pytest.raises(KmsDenied):
        agent.get("occlum/1/image_key")


@pytest.mark.parametrize("status", [403, 500])
def test_a_node_that_echoes_a_login_never_puts_the_credentials_into_an_error(tmp_path, status) -> None:
    """A broken or hostile node quoting the login body back in its error text: the KmsError (and so
    any log line made of it) names the refusal, never the role_id or secret_id."""
    import json as json_mod

    role_id, secret_id = "role-" + "r" * 20, "sid-" + "s" * 28
    (tmp_path / "role_id").write_text(role_id)
    (tmp_path / "secret_id").write_text(secret_id)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            sent = json_mod.loads(self.rfile.read(int(self.headers["Content-Length"])))
            body = json_mod.dumps({"errors": [f"bad login {sent}"]}).encode()
            send_reply(self, status, {"Content-Type": "application/json"}, body)

    vault = HttpStandIn(Handler)
    try:
        agent = kms.VaultAgent(
            vault.url,
            auth=kms.AppRoleLogin(str(tmp_path / "role_id"), str(tmp_path / "secret_id")),
            retries=0,
            deadline=5,
        )
        with pytest.raises(kms.KmsError) as e:
            agent.get("kv/app#key")
        text = str(e.value) + repr(e.value)
        assert "<redacted>" in text
        assert secret_id not in text and role_id not in text
    finally:
        vault.close()
