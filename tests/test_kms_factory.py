"""One KMS factory: kms.agent_from_config builds every agent, the policy's included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import kms
import policy


def test_inline_values_name_their_source_and_a_file_names_itself(tmp_path: Path) -> None:
    agent = kms.agent_from_config("none", values={"k": "v"}, source="policy.json: app 7")
    assert agent.get("k") == b"v"
    with pytest.raises(kms.KmsNotFound, match=r"policy\.json: app 7"):
        agent.get("missing")
    (tmp_path / "s.json").write_text('{"a": "b"}')
    with pytest.raises(kms.KmsConfigError, match="exactly one"):
        kms.agent_from_config("json", file=str(tmp_path / "s.json"), source="x")


def _load(tmp_path: Path, doc: dict) -> policy.Policy:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    return policy.load_policy(str(path))


def test_the_policy_builds_its_agents_through_the_factory(tmp_path: Path, monkeypatch) -> None:
    made: list[tuple[str, tuple[str, ...]]] = []
    real = kms.agent_from_config

    def recording(kind: str, **cfg):
        made.append((kind, tuple(sorted(cfg))))
        return real(kind, **cfg)

    monkeypatch.setattr(kms, "agent_from_config", recording)
    inline = _load(tmp_path, {"kms": "none",
                              "app_list": [{"id": 7, "mr_enclave": "ab" * 32, "secrets": {"k": "v"}}]})
    with pytest.raises(kms.KmsNotFound, match="app 7"):
        inline.apps[0].agent.get("missing")
    (tmp_path / "s.json").write_text('{"k": "v"}')
    _load(tmp_path, {"kms": "none", "secrets_file": "s.json",
                     "app_list": [{"id": 8, "mr_enclave": "cd" * 32, "secrets": {"k": "k"}}]})
    vault = _load(tmp_path, {"kms": "vault", "addr": "http://127.0.0.1:1",
                             "app_list": [{"id": 9, "mr_enclave": "ef" * 32, "app_token": "hvs.x" + "y" * 20,
                                           "secrets": {"k": "kv/data/k"}}]})
    assert isinstance(vault.apps[0].agent, kms.VaultAgent)
    assert [kind for kind, _ in made] == ["none", "json", "vault"]
    assert made[2][1] == ("addr", "auth", "ca_file", "cache_ttl", "deadline", "timeout", "token")
