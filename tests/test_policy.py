"""policy.py: the original's file shapes load; every doubtful policy is refused naming app and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import kms
import policy
import ratls

ENC1 = "11" * 32
ENC2 = "22" * 32
SIGNER = "aa" * 32


def write(tmp_path: Path, doc: object, name: str = "policy.json") -> Path:
    p = tmp_path / name
    p.write_text(doc if isinstance(doc, str) else json.dumps(doc, indent=2))
    return p


def vault_doc(**top) -> dict:
    doc = {
        "kms": "vault",
        "addr": "http://127.0.0.1:8200",
        "auth_method": "token",
        "root_key": "",
        "app_list": [
            {
                "id": 1,
                "mr_enclave": ENC1,
                "app_token": "hvs.app1",
                "secrets": {
                    "master_key": "occlum/1/image_key",
                    "secret1": "occlum/1/rsa_pubkey",
                    "secret2": "occlum/1/rsa_prikey",
                },
            },
            {
                "id": 2,
                "mr_enclave": ENC2,
                "app_token": "hvs.app2",
                "secrets": {"master_key": "occlum/2/image_key"},
            },
        ],
    }
    doc.update(top)
    return doc


def identity(mr_enclave: str = ENC1, mr_signer: str = SIGNER, **kw) -> ratls.Identity:
    """An Identity as ratls.verify_evidence would return it (only its data matters to the policy)."""
    fields = {
        "mr_enclave": bytes.fromhex(mr_enclave),
        "mr_signer": bytes.fromhex(mr_signer),
        "isv_prod_id": 0,
        "isv_svn": 0,
        "debug": False,
        "attributes": bytes(16),
        "tcb_status": "UpToDate",
        "advisory_ids": (),
        "collateral_expiry": 2**40,
        "public_key": None,
        "cert_der": b"",
        "not_before": 0,
        "not_after": 2**40,
        "evidence_format": "cczoo",
    }
    fields.update(kw)
    return ratls.Identity(**fields)


# --- shapes that load ------------------------------------------------------------------------------


def test_original_vault_shape_loads_unchanged(tmp_path):
    pol = policy.load_policy(write(tmp_path, vault_doc()))
    assert pol.kms == "vault"
    assert [a.id for a in pol.apps] == ["1", "2"]
    app1 = pol.apps[0]
    assert app1.names == ("master_key", "secret1", "secret2")
    assert app1.paths["master_key"] == "occlum/1/image_key"
    assert isinstance(app1.agent, kms.VaultAgent)
    assert "hvs.app1" not in repr(pol)  # tokens never in reprs (they end up in logs)
    assert len(pol.digest) == 64


def test_world_readable_vault_policy_is_warned_about(tmp_path):
    path = write(tmp_path, vault_doc())
    path.chmod(0o644)
    assert any("chmod 600" in w for w in policy.load_policy(path).warnings)
    path.chmod(0o600)
    assert not any("chmod 600" in w for w in policy.load_policy(path).warnings)


def test_original_no_kms_shape_with_inline_values(tmp_path):
    doc = {
        "kms": "none",
        "app_list": [
            {"id": 1, "mr_enclave": ENC1, "secrets": {"master_key": "123", "secret1": "", "secret2": ""}},
            {"id": 2, "mr_enclave": ENC2, "secrets": {"master_key": "456", "secret1": "", "secret2": ""}},
        ],
    }
    pol = policy.load_policy(write(tmp_path, doc))
    assert pol.kms == "none"
    assert pol.apps[0].fetch(["master_key"]) == {"master_key": b"123"}
    assert pol.apps[1].fetch(["master_key"]) == {"master_key": b"456"}
    assert any("empty" in w for w in pol.warnings)
    assert "123" not in repr(pol) and "456" not in repr(pol)


def test_readme_single_app_object_with_trailing_comma_and_root_key(tmp_path):
    # The original README's example: one app, a root_key field and a trailing comma in "secrets".
    text = (
        '{\n "kms" : "vault",\n "addr" : "http://127.0.0.1:8200",\n "auth_method" : "token",\n'
        ' "root_key" : "s.root",\n "app_list" : [\n  {\n   "id" : 1,\n'
        f'   "mr_enclave" : "{ENC1}",\n   "app_token" : "hvs.x",\n'
        '   "secrets" : {\n    "master_key" : "occlum/1/image_key",\n   }\n  }\n ]\n}\n'
    )
    pol = policy.load_policy(write(tmp_path, text))
    assert [a.id for a in pol.apps] == ["1"]
    assert any("root_key" in w for w in pol.warnings)  # ignored, with advice to remove it


def test_trailing_comma_inside_string_is_kept(tmp_path):
    doc = {"kms": "none", "app_list": [{"id": 1, "mr_enclave": ENC1, "secrets": {"k": "a,}"}}]}
    text = json.dumps(doc).replace('"a,}"}', '"a,}",}')
    pol = policy.load_policy(write(tmp_path, text))
    assert pol.apps[0].fetch(["k"]) == {"k": b"a,}"}


def test_appraisal_fields_and_comments(tmp_path):
    doc = vault_doc(_comment="example")
    doc["app_list"][0].update(
        {
            "_comment": "app one",
            "mr_signer": SIGNER,
            "isv_prod_id": 3,
            "min_isv_svn": 2,
            "allow_debug": False,
            "allowed_tcb_statuses": ["UpToDate", "SWHardeningNeeded"],
            "refused_advisories": ["INTEL-SA-00615"],
        }
    )
    doc["app_list"][0]["secrets"]["_comment"] = "paths are mount/path#field"
    pol = policy.load_policy(write(tmp_path, doc))
    ref = pol.apps[0].reference
    assert ref.mr_signer == bytes.fromhex(SIGNER) and ref.isv_prod_id == 3 and ref.min_isv_svn == 2
    assert ref.allowed_tcb_statuses == frozenset({"UpToDate", "SWHardeningNeeded"})
    assert "_comment" not in pol.apps[0].names


def test_secrets_file_for_json_backend(tmp_path):
    (tmp_path / "secrets.json").write_text(json.dumps({"app1/master": "v1", "app2/master": {"key": "v2"}}))
    doc = {
        "kms": "json",
        "secrets_file": "secrets.json",
        "app_list": [
            {"id": "a", "mr_enclave": ENC1, "secrets": {"master_key": "app1/master"}},
            {"id": "b", "mr_enclave": ENC2, "secrets": {"master_key": "app2/master"}},
        ],
    }
    pol = policy.load_policy(write(tmp_path, doc))
    assert pol.apps[0].fetch(["master_key"]) == {"master_key": b"v1"}
    assert pol.apps[1].fetch(["master_key"]) == {"master_key": b"v2"}


def test_shipped_example_policies_load(repo_dir):
    assert policy.load_policy(repo_dir / "policy_no_kms.json").apps
    # policy_vault.json ships with placeholder tokens: it loads once write_secrets.sh filled them in
    # (./run.sh demo vault does), and is refused as shipped, naming the app and the field.
    with pytest.raises(policy.PolicyError, match=r"app 1: field 'app_token' is a placeholder"):
        policy.load_policy(repo_dir / "policy_vault.json")
    doc = json.loads((repo_dir / "policy_vault.json").read_text())
    for app in doc["app_list"]:
        app["app_token"] = f"s.filled-in-for-app-{app['id']}"
    assert len(policy.parse_policy(doc).apps) == 2


# --- refusals at load ------------------------------------------------------------------------------


def refused(tmp_path, doc) -> str:
    with pytest.raises(policy.PolicyError) as e:
        policy.load_policy(write(tmp_path, doc))
    return str(e.value)


def test_unknown_top_level_key(tmp_path):
    msg = refused(tmp_path, vault_doc(adr="http://x"))
    assert "'adr'" in msg


def test_unknown_app_key_names_app(tmp_path):
    doc = vault_doc()
    doc["app_list"][1]["mr_enclve"] = ENC2
    msg = refused(tmp_path, doc)
    assert "app 2" in msg and "mr_enclve" in msg


@pytest.mark.parametrize("bad", ["abc", "zz" * 32, "11" * 31, "", 5])
def test_bad_hex_names_app_and_field(tmp_path, bad):
    doc = vault_doc()
    doc["app_list"][0]["mr_enclave"] = bad
    msg = refused(tmp_path, doc)
    assert "app 1" in msg and "mr_enclave" in msg


def test_app_without_identity(tmp_path):
    doc = vault_doc()
    del doc["app_list"][1]["mr_enclave"]
    msg = refused(tmp_path, doc)
    assert "app 2" in msg and "identity" in msg


def test_duplicate_identity(tmp_path):
    doc = vault_doc()
    doc["app_list"][1]["mr_enclave"] = ENC1.upper()  # same bytes, other spelling
    msg = refused(tmp_path, doc)
    assert "app 2" in msg and "same identity" in msg


def test_duplicate_id(tmp_path):
    doc = vault_doc()
    doc["app_list"][1]["id"] = 1
    assert "'id'" in refused(tmp_path, doc)


@pytest.mark.parametrize("token", [None, "", "   "])
def test_vault_app_without_token(tmp_path, token):
    doc = vault_doc()
    if token is None:
        del doc["app_list"][1]["app_token"]
    else:
        doc["app_list"][1]["app_token"] = token
    msg = refused(tmp_path, doc)
    assert "app 2" in msg and "app_token" in msg


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"kms": "ehsm"}, "kms"),
        ({"addr": "127.0.0.1:8200"}, "addr"),
        ({"addr": []}, "addr"),
        ({"addr": ["http://127.0.0.1:8200", "ftp://x"]}, "addr"),
        ({"addr": ["http://127.0.0.1:8200", 8201]}, "addr"),
        ({"auth_method": "approle"}, "auth_method"),
        ({"app_list": []}, "app_list"),
        ({"timeout": 0}, "timeout"),
    ],
)
def test_bad_top_level_fields(tmp_path, change, field):
    assert field in refused(tmp_path, vault_doc(**change))


@pytest.mark.parametrize(
    "addr",
    [
        ["http://127.0.0.1:8200", "http://127.0.0.1:8210/", "http://127.0.0.1:8220"],
        "http://127.0.0.1:8200, http://127.0.0.1:8210/,http://127.0.0.1:8220",
    ],
)
def test_vault_ha_addr_list_reaches_the_agent(tmp_path, addr):
    """An HA cluster's nodes, as a JSON list or a comma-separated string, all reach the KMS agent."""
    pol = policy.load_policy(write(tmp_path, vault_doc(addr=addr)))
    agent = pol.apps[0].agent
    assert agent.addrs == ("http://127.0.0.1:8200", "http://127.0.0.1:8210", "http://127.0.0.1:8220")


def test_bad_secret_path_and_empty_secrets(tmp_path):
    doc = vault_doc()
    doc["app_list"][0]["secrets"]["master_key"] = "no-slash"
    assert "secrets.master_key" in refused(tmp_path, doc)
    doc = vault_doc()
    doc["app_list"][0]["secrets"] = {}
    assert "app 1" in refused(tmp_path, doc)


def test_revoked_tcb_can_never_be_allowed(tmp_path):
    doc = vault_doc()
    doc["app_list"][0]["allowed_tcb_statuses"] = ["UpToDate", "Revoked"]
    msg = refused(tmp_path, doc)
    assert "app 1" in msg and "allowed_tcb_statuses" in msg


def test_not_json_duplicate_keys_and_missing_file(tmp_path):
    assert "not valid JSON" in refused(tmp_path, "{ kms: vault }")
    text = json.dumps(vault_doc()).replace('"kms": "vault"', '"kms": "vault", "kms": "none"')
    assert "duplicate key" in refused(tmp_path, text)
    with pytest.raises(policy.PolicyError, match="cannot read"):
        policy.load_policy(tmp_path / "missing.json")


def test_errors_never_echo_tokens_or_inline_values(tmp_path):
    doc = {
        "kms": "none",
        "app_list": [{"id": 1, "mr_enclave": ENC1, "secrets": {"k": "inline-secret-value"}, "bogus": 1}],
    }
    assert "inline-secret-value" not in refused(tmp_path, doc)


# A unique marker as an inline secret and as a token: no PolicyError and no warning may quote it,
# because the server logs both at startup and on every SIGHUP.
MARKER = "42-cd-4b-MARKERf00d-7e"
TOKEN = "hvs.TOKENMARKERbeef"


def inline_doc() -> dict:
    return {
        "kms": "none",
        "app_list": [
            {"id": 1, "mr_enclave": ENC1, "secrets": {"master_key": MARKER}},
            {"id": 2, "mr_enclave": ENC2, "secrets": {"master_key": "occlum/2/image_key"}},
        ],
    }


def switched_to_vault(**top) -> dict:
    """The inline-values file with "kms" switched to vault, as an operator migrating would leave it."""
    doc = inline_doc()
    doc.update({"kms": "vault", "addr": "http://127.0.0.1:8200", **top})
    for app in doc["app_list"]:
        app["app_token"] = TOKEN
    return doc


def migrated(**top) -> dict:
    """switched_to_vault with paths in place of the values: loading goes on to the tokens."""
    doc = switched_to_vault(**top)
    doc["app_list"][0]["secrets"] = {"master_key": "occlum/1/image_key"}
    return doc


def _app1(doc: dict, **fields) -> dict:
    doc["app_list"][0].update(fields)
    return doc


WRONG_SHAPES = {
    "kms switched to vault, inline value left": lambda: switched_to_vault(),
    "inline value with a space": lambda: _app1(switched_to_vault(), secrets={"master_key": MARKER + " x"}),
    "inline value looking like a path with #s": lambda: _app1(
        switched_to_vault(), secrets={"master_key": f"a/{MARKER}#b#c"}
    ),
    "token pasted into addr": lambda: migrated(addr=TOKEN),
    "token as addr list item": lambda: migrated(addr=["http://127.0.0.1:8200", TOKEN]),
    "token as addr password": lambda: migrated(addr=f"http://u:{TOKEN}@127.0.0.1:8200"),
    "token as addr password, bad port": lambda: migrated(addr=f"http://u:{TOKEN}@h:99999"),
    "secret pasted into kms": lambda: {**inline_doc(), "kms": MARKER},
    "secret pasted into timeout": lambda: migrated(timeout=MARKER),
    "token with a space": lambda: _app1(migrated(), app_token=TOKEN + " x"),
    "token with a newline": lambda: _app1(migrated(), app_token=TOKEN + "\nX-Injected: 1"),
    "token as a list": lambda: _app1(migrated(), app_token=[TOKEN]),
    "inline value as a list": lambda: _app1(inline_doc(), secrets={"master_key": [MARKER]}),
    "inline value as an object": lambda: _app1(inline_doc(), secrets={"master_key": {"key": MARKER}}),
    "inline value as a number beside": lambda: _app1(inline_doc(), secrets={"master_key": MARKER, "n": 5}),
    "secrets wrapper forgotten": lambda: {
        "kms": "none",
        "app_list": [{"id": 1, "mr_enclave": ENC1, "master_key": MARKER, "secrets": {"k": "v"}}],
    },
    "inline value with a lone surrogate": lambda: _app1(
        inline_doc(), secrets={"master_key": MARKER + "\ud800"}
    ),
    "inline value, app without identity": lambda: {
        "kms": "none",
        "app_list": [{"id": 1, "secrets": {"master_key": MARKER}}],
    },
    "inline value, bad mr_enclave": lambda: _app1(inline_doc(), mr_enclave="zz"),
}


@pytest.mark.parametrize("shape", sorted(WRONG_SHAPES))
def test_no_policy_error_quotes_an_inline_secret_or_token(tmp_path, shape):
    doc = WRONG_SHAPES[shape]()
    msg = refused(tmp_path, doc)
    assert "MARKER" not in msg, msg
    assert any(where in msg for where in ("app 1", "app_list[0]", "'kms'", "'addr'", "'timeout'")), msg


def test_kms_switched_to_vault_names_app_and_field_only(tmp_path):
    msg = refused(tmp_path, switched_to_vault())
    assert "app 1" in msg and "secrets.master_key" in msg and "KMS path" in msg
    assert MARKER not in msg and TOKEN not in msg


def test_duplicate_inline_secret_is_refused_without_its_value(tmp_path):
    text = json.dumps(inline_doc()).replace(
        f'"master_key": "{MARKER}"', f'"master_key": "{MARKER}", "master_key": "{MARKER}2"'
    )
    msg = refused(tmp_path, text)
    assert "duplicate key" in msg and "MARKER" not in msg


def test_secrets_file_errors_do_not_quote_values(tmp_path):
    doc = {
        "kms": "json",
        "secrets_file": "s.json",
        "app_list": [{"id": 1, "mr_enclave": ENC1, "secrets": {"k": "a"}}],
    }
    for content in ({"a": [MARKER]}, {"a": {"key": [MARKER]}}, {"a": 5, "b": MARKER}):
        (tmp_path / "s.json").write_text(json.dumps(content))
        msg = refused(tmp_path, doc)
        assert "secrets_file" in msg and "MARKER" not in msg, msg
    (tmp_path / "s.json").write_text(f'{{"a": "{MARKER}", }}')  # trailing comma: not JSON
    msg = refused(tmp_path, doc)
    assert "not valid JSON" in msg and "MARKER" not in msg


def test_warnings_of_loaded_policies_do_not_quote_values(tmp_path):
    doc = _app1(inline_doc(), app_token=TOKEN)
    doc["addr"] = "http://127.0.0.1:8200"
    doc["root_key"] = TOKEN
    path = write(tmp_path, doc)
    path.chmod(0o644)
    pol = policy.load_policy(path)
    assert len(pol.warnings) >= 3  # app_token ignored, root_key ignored, world-readable
    for w in pol.warnings:
        assert "MARKER" not in w, w


# --- world-readable files that hold secrets ------------------------------------------------------


def test_world_readable_policy_with_inline_values_is_warned_about(tmp_path):
    for kind in ("none", "json"):
        path = write(tmp_path, {**inline_doc(), "kms": kind})
        path.chmod(0o644)
        warned = [w for w in policy.load_policy(path).warnings if "chmod 600" in w]
        assert len(warned) == 1 and "secret values" in warned[0] and str(path) in warned[0]
        for private in (0o600, 0o640):
            path.chmod(private)
            assert not any("chmod 600" in w for w in policy.load_policy(path).warnings)


def test_world_readable_policy_without_values_is_not_warned_about(tmp_path):
    doc = inline_doc()
    for app in doc["app_list"]:
        app["secrets"] = {"master_key": "", "_comment": "filled in later"}
    path = write(tmp_path, doc)
    path.chmod(0o644)
    assert not any("chmod 600" in w for w in policy.load_policy(path).warnings)


def test_world_readable_secrets_file_is_warned_about(tmp_path):
    secrets = tmp_path / "secrets.json"
    secrets.write_text(json.dumps({"app1/master": MARKER}))
    doc = {
        "kms": "json",
        "secrets_file": "secrets.json",
        "app_list": [{"id": 1, "mr_enclave": ENC1, "secrets": {"master_key": "app1/master"}}],
    }
    path = write(tmp_path, doc)
    path.chmod(0o644)  # holds only key names: no warning for the policy itself
    secrets.chmod(0o644)
    warned = [w for w in policy.load_policy(path).warnings if "chmod 600" in w]
    assert len(warned) == 1 and "secrets_file" in warned[0] and str(secrets) in warned[0]
    assert "MARKER" not in warned[0]
    secrets.chmod(0o600)
    assert not any("chmod 600" in w for w in policy.load_policy(path).warnings)


# --- choosing the app -----------------------------------------------------------------------------


def test_find_app_by_exact_measurement(tmp_path):
    pol = policy.load_policy(write(tmp_path, vault_doc()))
    assert pol.find_app(identity(ENC1)).id == "1"
    assert pol.find_app(identity(ENC2)).id == "2"
    assert pol.find_app(identity("33" * 32)) is None
    # the original compared a prefix; we don't: a measurement sharing the first bytes is unknown
    assert pol.find_app(identity("11" * 31 + "12")) is None


def test_find_app_prefers_the_most_specific_app(tmp_path):
    doc = {
        "kms": "none",
        "app_list": [
            {"id": "by-signer", "mr_signer": SIGNER, "secrets": {"k": "signer-wide"}},
            {"id": "pinned", "mr_enclave": ENC1, "mr_signer": SIGNER, "secrets": {"k": "pinned"}},
            {"id": "other", "mr_enclave": ENC2, "secrets": {"k": "x"}},
            {"id": "signer-prod-7", "mr_signer": SIGNER, "isv_prod_id": 7, "secrets": {"k": "y"}},
        ],
    }
    pol = policy.load_policy(write(tmp_path, doc))
    assert pol.find_app(identity(ENC1)).id == "pinned"
    assert pol.find_app(identity(ENC2)).id == "other"
    assert pol.find_app(identity("44" * 32)).id == "by-signer"
    assert pol.find_app(identity("44" * 32, isv_prod_id=7)).id == "signer-prod-7"
    assert pol.find_app(identity("44" * 32, mr_signer="bb" * 32)) is None


@pytest.mark.parametrize(
    ("addr", "warned"),
    [
        ("http://vault.example:8200", True),
        ("http://10.0.0.5:8200", True),
        ("http://127.0.0.1:8200", False),
        ("http://localhost:8200", False),
        ("http://[::1]:8200", False),
        ("https://vault.example:8200", False),
    ],
)
def test_plain_http_to_another_host_is_warned_about(tmp_path, addr, warned):
    """Tokens and secret_ids would cross the network in the clear: a load warning (the server logs
    it, check-policy lists it); loopback and https are not warned about."""
    doc = vault_doc()
    doc["addr"] = addr
    warnings = policy.load_policy(write(tmp_path, doc)).warnings
    assert any("plain http to another host" in w for w in warnings) == warned
