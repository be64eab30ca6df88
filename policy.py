"""Which enclave gets which secrets, from which KMS: the tenant's policy file.

The file format is the one confidential-computing-zoo's ASPS used (`policy_vault.json`,
`policy_no_kms.json`), read strictly: a typo in a key, a measurement that is not hex, or an app
that would match any enclave is a load error naming the app and the field, never a silent
"allow". Each app may add the appraisal fields of `ReferenceValues` (mr_signer, isv_prod_id,
min_isv_svn, allow_debug, allowed_tcb_statuses, refused/accepted advisories).  A TD's app is keyed
by `mr_td` instead and may pin the other TD report fields (`TdReferenceValues`); one policy may hold
both kinds, and an enclave never matches a TD's app nor a TD an enclave's.

Appraisal lives here too (policy decides; ratls only says what a certificate proves): each check is
a small object with one verify() returning Success or a Failure with its reason, composed by AllOf.

    {"kms": "vault", "addr": "http://127.0.0.1:8200", "auth_method": "token",
     "app_list": [{"id": 1, "mr_enclave": "<64 hex>", "app_token": "<vault token>",
                   "secrets": {"master_key": "occlum/1/image_key"}}]}

Instead of `app_token` a Vault app may log in with `"auth": {"method": "approle", "role_id_file",
"secret_id_file"}` or `{"method": "cert", "cert_file", "key_file", "name"}` (files relative to the
policy; credentials are never inline). Vault references are parsed here exactly as kms.parse_ref
parses them, and the example's placeholder tokens are refused, so the server never starts with a
policy its first request would fail on.

`"kms": "none"` (alias `"json"`) carries the secret values inline, or, with a top-level
`"secrets_file"`, names keys of that JSON file. Keys named `"_comment"` are allowed anywhere.

Who may import it: the tenant side (asps_server, policy_check, ratls's command line) and tests.
It imports kms and dcap (TCB status names), never ratls: appraisal reads an Identity through the
AppraisedIdentity Protocol, so ratls's `verify` command may import this module.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import dcap
import kms

__all__ = ["AllOf", "AmbiguousApp", "AppPolicy", "Decision", "Failure", "Policy", "PolicyError",
           "ReferenceValues", "ReferenceValuesError", "Success", "TdReferenceValues", "load_policy",
           "parse_policy"]

# The appraisal keys belong to ReferenceValues (an enclave's app) or TdReferenceValues (a TD's app,
# keyed by mr_td); the others are the policy's own.
SGX_APPRAISAL_KEYS = frozenset({"mr_enclave", "mr_signer", "isv_prod_id", "min_isv_svn", "allow_debug",
                                "allowed_tcb_statuses", "refused_advisories", "accepted_advisories"})
TD_APPRAISAL_KEYS = frozenset({"mr_td", "mr_config_id", "mr_owner", "mr_owner_config", "rtmr0", "rtmr1",
                               "rtmr2", "rtmr3", "xfam", "td_attributes", "min_tee_tcb_svn", "allow_debug",
                               "allowed_tcb_statuses", "refused_advisories", "accepted_advisories"})
APPRAISAL_KEYS = SGX_APPRAISAL_KEYS | TD_APPRAISAL_KEYS
# Upper bound on one Vault read (all retries and nodes), unless the policy's own timeout is longer.
VAULT_DEADLINE = 8.0
APP_KEYS = frozenset({"_comment", "id", "app_token", "auth", "secrets"}) | APPRAISAL_KEYS
# Vault login methods besides a static "app_token", and the fields of an app's "auth" object for each.
AUTH_METHODS = ("token", "approle", "cert")
AUTH_KEYS = {
    "approle": frozenset({"_comment", "method", "role_id_file", "secret_id_file", "mount"}),
    "cert": frozenset({"_comment", "method", "cert_file", "key_file", "name", "mount"}),
}
# Tokens as the shipped example and the docs spell them before write_secrets.sh fills in real ones.
_PLACEHOLDER_TOKEN = re.compile(
    r"(?i)(.*write_secrets.*|app\d*_token.*|<.*>|changeme|change-me|placeholder|todo|token|xxx+|\.\.\.)"
)
TOP_KEYS = frozenset(
    {
        "_comment",
        "kms",
        "addr",
        "auth_method",
        "root_key",
        "unseal_key",
        "app_list",
        "ca_file",
        "timeout",
        "cache_ttl",
        "secrets_file",
    }
)
KMS_KINDS = {"vault": "vault", "openbao": "vault", "none": "none", "json": "none"}
MAX_NAME_BYTES = 256  # same bound the server puts on requested names
MAX_POLICY_BYTES = 4 * 1024 * 1024


class PolicyError(ValueError):
    """The policy file cannot be used; the message names the file, app and field."""


class AmbiguousApp(Exception):
    """Several apps match one enclave equally well: refuse rather than guess."""

    def __init__(self, app_ids: Iterable[str]) -> None:
        self.app_ids = tuple(app_ids)
        super().__init__("enclave matches apps " + ", ".join(self.app_ids) + " equally; fix the policy")


@dataclass(frozen=True)
class AppPolicy:
    """One app: how to recognise its enclave, and where each of its secrets lives."""

    id: str
    reference: ReferenceValues | TdReferenceValues
    # name -> KMS path (vault) or key of the JSON agent. Paths are not secret, values are never here.
    paths: Mapping[str, str] = field(repr=False)
    agent: kms.KmsAgent = field(repr=False, compare=False)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.paths)

    @property
    def tee(self) -> str:
        return self.reference.tee

    @property
    def specificity(self) -> tuple[int, ...]:
        """How narrowly the app's identity is pinned: mr_enclave beats mr_signer(+prod id); for a
        TD, more pinned TD report fields beat fewer."""
        return self.reference.specificity

    @property
    def identity_key(self) -> tuple[object, ...]:
        return self.reference.identity_key

    def fetch(self, names: Iterable[str]) -> dict[str, bytes]:
        """Values of the given (already granted) names from this app's KMS agent."""
        return {name: self.agent.get(self.paths[name]) for name in names}


@dataclass(frozen=True)
class Policy:
    kms: str
    apps: tuple[AppPolicy, ...]
    source: str = ""
    digest: str = ""  # sha256 of the file, so logs say which policy was in force
    warnings: tuple[str, ...] = ()

    def find_app(self, identity: Any) -> AppPolicy | None:
        """The app whose measurements exactly match the identity; None for an unknown enclave.

        When an mr_signer-wide app and an mr_enclave-pinned app both match, the pinned one wins;
        a tie between equally specific apps raises AmbiguousApp.
        """
        matches = [a for a in self.apps if a.reference.matches_identity(identity)]
        if not matches:
            return None
        best = max(a.specificity for a in matches)
        top = [a for a in matches if a.specificity == best]
        if len(top) > 1:
            raise AmbiguousApp(a.id for a in top)
        return top[0]

    def app_by_id(self, app_id: str) -> AppPolicy | None:
        return next((a for a in self.apps if a.id == app_id), None)


# --- loading -----------------------------------------------------------------------------------


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy file; PolicyError on anything doubtful."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise PolicyError(f"{p}: cannot read policy file: {e.strerror or e}") from None
    if len(raw) > MAX_POLICY_BYTES:
        raise PolicyError(f"{p}: policy file larger than {MAX_POLICY_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError(f"{p}: policy file is not UTF-8") from None
    try:
        data = _loads_relaxed(text)
    except json.JSONDecodeError as e:
        raise PolicyError(f"{p}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except PolicyError as e:
        raise PolicyError(f"{p}: {e}") from None
    except RecursionError:
        raise PolicyError(f"{p}: JSON nested too deeply") from None
    except ValueError as e:  # e.g. an integer literal longer than Python's conversion limit
        raise PolicyError(f"{p}: not usable JSON: {str(e)[:120]}") from None
    pol = parse_policy(data, source=str(p), base_dir=p.parent, digest=hashlib.sha256(raw).hexdigest())
    try:
        world_readable = bool(p.stat().st_mode & 0o004)
    except OSError:
        world_readable = False
    held = "Vault tokens" if pol.kms == "vault" else "secret values" if _has_inline_values(data) else ""
    if world_readable and held:
        extra = f"{p}: readable by every local user but holds {held}; chmod 600 (or 640 for a group)"
        pol = dataclasses.replace(pol, warnings=(*pol.warnings, extra))
    return pol


def _has_inline_values(data: Mapping[str, Any]) -> bool:
    """Whether a (valid) "kms": "none" policy carries secret values itself, not a secrets_file's keys."""
    if KMS_KINDS.get(data.get("kms")) != "none" or data.get("secrets_file") is not None:
        return False
    return any(
        isinstance(value, str) and value and name != "_comment"
        for app in data.get("app_list") or ()
        if isinstance(app, dict) and isinstance(app.get("secrets"), dict)
        for name, value in app["secrets"].items()
    )


def _shape(value: Any) -> str:
    """What kind of JSON value was found, never the value: a misplaced secret or token must not
    reach an error message (the server logs them at startup and on SIGHUP)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string" if value else "an empty string"
    if isinstance(value, list):
        return f"a list of {len(value)} item(s)"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _loads_relaxed(text: str) -> Any:
    """json.loads that also accepts trailing commas (the original README's example has one)."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as first:
        stripped = _strip_trailing_commas(text)
        if stripped == text:
            raise
        try:
            return json.loads(stripped, object_pairs_hook=_no_duplicate_keys)
        except json.JSONDecodeError:
            raise first from None


# A JSON string (kept as is) or a comma directly before a closing bracket (dropped).
_STRING_OR_TRAILING_COMMA = re.compile(r'("(?:[^"\\]|\\.)*")|,(?=\s*[}\]])', re.S)


def _strip_trailing_commas(text: str) -> str:
    return _STRING_OR_TRAILING_COMMA.sub(lambda m: m.group(1) or "", text)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for k, v in pairs:
        if k in d:
            raise PolicyError(f"duplicate key {k!r} in one JSON object")
        d[k] = v
    return d


def parse_policy(
    data: Any, *, source: str = "<policy>", base_dir: str | Path = ".", digest: str = ""
) -> Policy:
    """Validate a decoded policy document and build each app's reference values and KMS agent."""
    where = source
    if not isinstance(data, dict):
        raise PolicyError(f"{where}: top level must be a JSON object, got {type(data).__name__}")
    _check_text(data, where, "")
    _unknown_keys(data, TOP_KEYS, where)
    warnings: list[str] = []

    kind_raw = data.get("kms")
    if not isinstance(kind_raw, str) or kind_raw not in KMS_KINDS:
        raise PolicyError(f"{where}: field 'kms' must be one of {sorted(KMS_KINDS)}, got {_shape(kind_raw)}")
    kind = KMS_KINDS[kind_raw]
    for k in ("root_key", "unseal_key"):
        if data.get(k):
            warnings.append(
                f"{where}: field {k!r} is ignored: ASPS only uses per-app tokens; keep Vault's root "
                "token and unseal keys out of this file"
            )

    apps_raw = data.get("app_list")
    if not isinstance(apps_raw, list) or not apps_raw:
        raise PolicyError(f"{where}: field 'app_list' must be a non-empty list of apps")

    make_agent, values_are_keys = _agent_factory(kind, data, where, Path(base_dir), warnings)
    apps: list[AppPolicy] = []
    seen_ids: dict[str, int] = {}
    seen_identity: dict[tuple[object, object, object], str] = {}
    for i, app_raw in enumerate(apps_raw):
        app = _parse_app(app_raw, i, kind, where, make_agent, values_are_keys, warnings)
        if app.id in seen_ids:
            raise PolicyError(
                f"{where}: app_list[{i}]: field 'id' {app.id!r} is already used by app_list"
                f"[{seen_ids[app.id]}]"
            )
        seen_ids[app.id] = i
        if app.identity_key in seen_identity:
            raise PolicyError(
                f"{where}: app {app.id}: same identity ({_identity_fields(app)}) as app "
                f"{seen_identity[app.identity_key]}; one enclave must map to one app"
            )
        seen_identity[app.identity_key] = app.id
        apps.append(app)
    return Policy(kind, tuple(apps), source=source, digest=digest, warnings=tuple(warnings))


def _check_text(value: Any, where: str, path: str, depth: int = 0) -> None:
    """Every string must be encodable UTF-8 (JSON escapes can produce lone surrogates)."""
    if depth > 32:
        raise PolicyError(f"{where}: {path or 'document'} nested too deeply")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise PolicyError(f"{where}: {path or 'document'}: string is not valid Unicode") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(k, where, f"{path}.<key>" if path else "<key>", depth + 1)
            _check_text(v, where, f"{path}.{k}" if path else str(k), depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_text(v, where, f"{path}[{i}]", depth + 1)


def _unknown_keys(d: Mapping[str, Any], allowed: frozenset[str], where: str) -> None:
    unknown = sorted(k for k in d if k not in allowed)
    if unknown:
        raise PolicyError(
            f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(sorted(allowed))}"
        )


def _plain_http_off_host(url: str) -> bool:
    """http:// to anything but this machine's loopback (where TLS would protect nothing)."""
    import ipaddress
    import urllib.parse

    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
    except ValueError:  # not a URL: the agent refuses it, naming the field
        return False
    if parts.scheme != "http":
        return False
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


def _named_file(value: Any, field_name: str, where: str, base_dir: Path) -> Path:
    """A policy field naming a file, relative to the policy's directory."""
    if not isinstance(value, str) or not value:
        raise PolicyError(f"{where}: field {field_name!r} must be a file name")
    return base_dir / value


def _agent_factory(kind: str, data: Mapping[str, Any], where: str, base_dir: Path, warnings: list[str]):
    """(function (app where, app dict, inline name->value) -> KmsAgent, whether secrets name KMS keys).

    Checks the policy's KMS fields; the agents themselves come from kms.agent_from_config."""
    if kind == "vault":
        addr = data.get("addr")
        # One node, or several (a JSON list or a comma-separated string) of one HA cluster. No
        # user:password@ (a credential that error messages further down would quote).
        nodes = addr.split(",") if isinstance(addr, str) else addr
        if (
            not isinstance(nodes, list)
            or not nodes
            or not all(isinstance(n, str) and re.match(r"^https?://[^\s/@]+(/|$)", n.strip()) for n in nodes)
        ):
            raise PolicyError(
                f"{where}: field 'addr' must be the Vault URL (http[s]://host:port, no user:password), "
                f"or a list of them for an HA cluster; got {_shape(addr)}"
            )
        nodes = [n.strip().rstrip("/") for n in nodes]
        for node in nodes:
            if _plain_http_off_host(node):
                warnings.append(
                    f"{where}: field 'addr': {node} is plain http to another host: each app's token "
                    "(and an AppRole's secret_id) crosses the network unencrypted; use https and ca_file"
                )
        method = data.get("auth_method", "token")
        if method not in AUTH_METHODS:
            raise PolicyError(
                f"{where}: field 'auth_method' must be one of {', '.join(AUTH_METHODS)} (the apps' "
                "default; an app's own 'auth' object overrides it)"
            )
        if "secrets_file" in data:
            raise PolicyError(f'{where}: field \'secrets_file\' only applies to "kms": "none"')
        ca_file = data.get("ca_file")
        if ca_file is not None:
            ca_path = _named_file(ca_file, "ca_file", where, base_dir)
            try:
                found = ca_path.is_file()
            except OSError as e:  # e.g. a name too long for the file system
                raise PolicyError(f"{where}: field 'ca_file': {e.strerror or e}") from None
            if not found:
                raise PolicyError(f"{where}: field 'ca_file': {ca_path} does not exist")
            ca_file = str(ca_path)
        timeout = data.get("timeout", 5.0)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 120:
            raise PolicyError(f"{where}: field 'timeout' must be seconds between 0 and 120")
        cache_ttl = data.get("cache_ttl", 0)  # seconds a value read is kept in memory; 0: never
        ttl_ok = isinstance(cache_ttl, int | float) and not isinstance(cache_ttl, bool)
        if not ttl_ok or not 0 <= cache_ttl <= 86400:
            raise PolicyError(f"{where}: field 'cache_ttl' must be seconds between 0 (off) and 86400")

        def vault_agent(app_where: str, app: Mapping[str, Any], _inline: Mapping[str, str]) -> kms.KmsAgent:
            login = _vault_login(app_where, app, method, nodes, base_dir, warnings)
            token = None
            if login is None:
                token = app.get("app_token")
                if not isinstance(token, str) or not token.strip():
                    raise PolicyError(
                        f"{app_where}: field 'app_token' is missing or empty; a Vault app needs "
                        "its own read-only token (write_secrets.sh prints one per app) or an 'auth' "
                        "login (approle, cert)"
                    )
                problem = token_problem(token)
                if problem:
                    raise PolicyError(f"{app_where}: field 'app_token' {problem}")
                token = token.strip()
            try:
                # One get() must end before a client's default 10 s deadline, so that a hanging Vault
                # reaches the enclave as UNAVAILABLE (retryable), not as DEADLINE_EXCEEDED.
                deadline = max(float(timeout), VAULT_DEADLINE)
                return kms.agent_from_config(
                    "vault",
                    addr=nodes,
                    token=token,
                    auth=login,
                    ca_file=ca_file,
                    timeout=float(timeout),
                    deadline=deadline,
                    cache_ttl=float(cache_ttl),
                )
            except (kms.KmsError, ValueError) as e:  # ValueError: an address urllib cannot split
                field_name = "'auth'" if login is not None else "'app_token'"
                raise PolicyError(f"{app_where}: field 'addr' or {field_name}: {e}") from None

        return vault_agent, True

    for k in ("addr", "ca_file", "timeout"):
        if data.get(k):
            warnings.append(f'{where}: field {k!r} is ignored with "kms": "none"')
    secrets_file = data.get("secrets_file")
    if secrets_file is not None:
        path = _named_file(secrets_file, "secrets_file", where, base_dir)
        try:
            shared = kms.agent_from_config("json", file=str(path))
            world_readable = bool(path.stat().st_mode & 0o004)
        except kms.KmsError as e:
            raise PolicyError(f"{where}: field 'secrets_file': {e}") from None
        except (ValueError, RecursionError):  # a lone surrogate or absurd nesting in that file
            raise PolicyError(f"{where}: field 'secrets_file': {path} holds unusable JSON") from None
        except OSError as e:
            raise PolicyError(
                f"{where}: field 'secrets_file': cannot read {path}: {e.strerror or e}"
            ) from None

        if world_readable:
            warnings.append(
                f"{where}: field 'secrets_file': {path} is readable by every local user but holds "
                "secret values; chmod 600 (or 640 for a group)"
            )

        def file_agent(app_where: str, app: Mapping[str, Any], _inline: Mapping[str, str]) -> kms.KmsAgent:
            return shared

        return file_agent, True

    def inline_agent(app_where: str, app: Mapping[str, Any], inline: Mapping[str, str]) -> kms.KmsAgent:
        try:
            return kms.agent_from_config("none", values=dict(inline), source=app_where)
        except kms.KmsError as e:
            raise PolicyError(f"{app_where}: {e}") from None

    return inline_agent, False


def _parse_app(
    raw: Any, i: int, kind: str, where: str, make_agent, values_are_keys: bool, warnings: list[str]
) -> AppPolicy:
    if not isinstance(raw, dict):
        raise PolicyError(f"{where}: app_list[{i}] must be an object")
    app_id_raw = raw.get("id")
    if isinstance(app_id_raw, bool) or not isinstance(app_id_raw, int | str) or str(app_id_raw).strip() == "":
        raise PolicyError(f"{where}: app_list[{i}]: field 'id' must be a number or a non-empty string")
    app_id = str(app_id_raw)
    aw = f"{where}: app {app_id}"
    _unknown_keys(raw, APP_KEYS, aw)
    if kind != "vault" and raw.get("app_token"):
        warnings.append(f'{aw}: field \'app_token\' is ignored with "kms": "none"')
    if kind != "vault" and raw.get("auth"):
        warnings.append(f'{aw}: field \'auth\' is ignored with "kms": "none"')

    reference = _parse_reference(raw, aw, app_id)

    secrets = raw.get("secrets")
    if not isinstance(secrets, dict) or not secrets:
        raise PolicyError(
            f"{aw}: field 'secrets' must be a non-empty object of name -> "
            + ("KMS path" if kind == "vault" else "value")
        )
    paths: dict[str, str] = {}
    inline: dict[str, str] = {}
    for name, value in secrets.items():
        if name == "_comment":
            continue
        if not name or len(name.encode("utf-8")) > MAX_NAME_BYTES:
            raise PolicyError(f"{aw}: secret names must be 1..{MAX_NAME_BYTES} bytes")
        if not isinstance(value, str):
            raise PolicyError(f"{aw}: field 'secrets.{name}' must be a string")
        if kind == "vault":
            if not re.fullmatch(r"[^\s#]+(/[^\s#]+)+(#[^\s#]+)?", value):
                # The value is not quoted: after "kms" was switched to vault it may be an inline secret.
                raise PolicyError(
                    f"{aw}: field 'secrets.{name}' must be a KMS path 'mount/path[#field]' (the value is "
                    'not shown: it may be a secret left from "kms": "none")'
                )
            problem = kms.ref_problem(value)
            if problem:  # exactly what the agent would refuse at request time, refused now
                raise PolicyError(f"{aw}: field 'secrets.{name}': Vault reference refused: {problem}")
            paths[name] = value
        elif values_are_keys:
            if not value:
                raise PolicyError(f"{aw}: field 'secrets.{name}' must name a key of the secrets file")
            paths[name] = value
        else:
            if value == "":
                warnings.append(f"{aw}: secret {name!r} is empty")
            paths[name] = name
            inline[name] = value
    if not paths:
        raise PolicyError(f"{aw}: field 'secrets' has no secrets")
    agent = make_agent(aw, raw, inline)
    return AppPolicy(app_id, reference, paths, agent)


def _parse_reference(raw: Mapping[str, Any], aw: str, app_id: str) -> ReferenceValues | TdReferenceValues:
    """An enclave's reference values, or a TD's when the app names mr_td; an app with no identity to
    match is a load error, never "matches everything"."""
    appraisal = {k: v for k, v in raw.items() if k in APPRAISAL_KEYS}
    td = "mr_td" in appraisal
    if td:
        sgx_only = sorted(set(appraisal) - TD_APPRAISAL_KEYS)
        if sgx_only:
            raise PolicyError(f"{aw}: field {sgx_only[0]!r} is an enclave's, but the app names 'mr_td' "
                              "(a TD); "
                              "an app is either an enclave's or a TD's")
    else:
        td_only = sorted(set(appraisal) - SGX_APPRAISAL_KEYS)
        if td_only:
            raise PolicyError(f"{aw}: field {td_only[0]!r} pins a TD, but the app has no 'mr_td'")
    if td and appraisal.get("mr_td") in (None, ""):
        raise PolicyError(f"{aw}: no identity: 'mr_td' is empty; an app without one would match every TD")
    if not td and not any(appraisal.get(k) not in (None, "") for k in ("mr_enclave", "mr_signer")):
        raise PolicyError(
            f"{aw}: no identity: give 'mr_enclave' (and/or 'mr_signer'), or 'mr_td' for a TD; an app "
            "without one would match every enclave"
        )
    try:
        if td:
            return TdReferenceValues.from_dict(appraisal, where=aw)
        return ReferenceValues.from_dict(appraisal, where=aw)
    except ReferenceValuesError as e:
        msg = str(e)
        raise PolicyError(msg if app_id in msg else f"{aw}: {msg}") from None


def _identity_fields(app: AppPolicy) -> str:
    if app.tee == "tdx":
        return "mr_td and the same pinned TD fields"
    return "mr_enclave/mr_signer/isv_prod_id"


# --- Vault credentials ----------------------------------------------------------------------------


def token_problem(token: str) -> str | None:
    """Why a static token cannot be a real one (the shipped example's placeholder), or None.
    The message never repeats the token."""
    if _PLACEHOLDER_TOKEN.fullmatch(token.strip()):
        return (
            "is a placeholder from the example, not a Vault token: run write_secrets.sh --policy FILE "
            "(it fills in each app's read-only token) or paste the app's own token"
        )
    return None


def _vault_login(
    app_where: str,
    app: Mapping[str, Any],
    default_method: str,
    nodes: list[str],
    base_dir: Path,
    warnings: list[str],
) -> kms.VaultLogin | None:
    """The app's login method from its 'auth' object (or the top-level auth_method); None for a
    static 'app_token'. Credential files must exist now; their content is read again at each login."""
    raw = app.get("auth")
    if raw is not None and not isinstance(raw, dict):
        raise PolicyError(f"{app_where}: field 'auth' must be an object, got {_shape(raw)}")
    method = raw.get("method", default_method) if raw is not None else default_method
    if method not in AUTH_METHODS:
        raise PolicyError(f"{app_where}: field 'auth.method' must be one of {', '.join(AUTH_METHODS)}")
    if method == "token":
        if raw is not None:
            raise PolicyError(
                f"{app_where}: field 'auth': a static token goes in 'app_token'; 'auth' is for "
                "approle or cert logins"
            )
        return None
    if raw is None:
        raise PolicyError(
            f"{app_where}: field 'auth' is missing: auth_method {method!r} needs the app's own "
            + ("role_id_file and secret_id_file" if method == "approle" else "cert_file and key_file")
        )
    for inline in ("role_id", "secret_id", "token", "client_token", "key", "cert"):
        if inline in raw:
            raise PolicyError(
                f"{app_where}: field 'auth.{inline}': credentials are never written inline in the policy "
                f"(the value is not shown); put it in a file (mode 0600) and name that file in "
                f"'auth.{inline}_file'"
            )
    _unknown_keys(raw, AUTH_KEYS[method], f"{app_where}: field 'auth' ({method})")
    if isinstance(app.get("app_token"), str) and app["app_token"].strip():
        raise PolicyError(f"{app_where}: give either 'app_token' or an 'auth' login, not both")
    mount = raw.get("mount", method)
    if not isinstance(mount, str) or kms.ref_problem(mount + "/x") or "#" in mount:
        raise PolicyError(f"{app_where}: field 'auth.mount' must be an auth mount path such as {method!r}")

    def credential_file(key: str, what: str, private: bool, read: bool) -> str:
        name = raw.get(key)
        if not isinstance(name, str) or not name.strip():
            raise PolicyError(f"{app_where}: field 'auth.{key}' must name the {what} file")
        path = base_dir / name
        try:
            if read:
                kms.read_credential_file(path, what)
            else:
                with open(path, "rb"):
                    pass
            mode = path.stat().st_mode
        except kms.KmsConfigError as e:
            raise PolicyError(f"{app_where}: field 'auth.{key}': {e}") from None
        except OSError as e:
            raise PolicyError(
                f"{app_where}: field 'auth.{key}': cannot read {path}: {e.strerror or e}"
            ) from None
        if private and mode & 0o077:
            warnings.append(
                f"{app_where}: field 'auth.{key}': {path} is readable by other users but holds the "
                f"{what}; chmod 600"
            )
        return str(path)

    if method == "approle":
        return kms.AppRoleLogin(
            credential_file("role_id_file", "AppRole role_id", False, True),
            credential_file("secret_id_file", "AppRole secret_id", True, True),
            mount=mount.strip("/"),
        )
    if not all(n.startswith("https://") for n in nodes):
        raise PolicyError(
            f"{app_where}: field 'auth': cert auth needs https Vault addresses in 'addr' (the client "
            "certificate is presented in the TLS handshake)"
        )
    name = raw.get("name")
    if name is not None and (not isinstance(name, str) or not re.fullmatch(r"[\w.-]{1,128}", name)):
        raise PolicyError(f"{app_where}: field 'auth.name' must be the cert role's name")
    return kms.CertLogin(
        credential_file("cert_file", "client certificate", False, False),
        credential_file("key_file", "client key", True, False),
        name=name,
        mount=mount.strip("/"),
    )


# --- appraisal: what an app's enclave or TD must be ------------------------------------------------
#
# Policy decides: ratls says what a certificate proves (an Identity), and the checks below say
# whether that identity is the app's.  Each check is one small object whose verify() returns
# Success or a Failure carrying its own reason, composed with AllOf (which refuses to be built
# empty: no checks would mean "everything passes").  Reasons are stable: tests and audit logs
# quote them.

TCB_UP_TO_DATE = "UpToDate"
TCB_REVOKED = "Revoked"
# Statuses a policy may opt in to. Revoked is deliberately absent: it can never be allowed.
ALLOWABLE_TCB_STATUSES = tuple(s for s in dcap.TCB_STATUSES if s != TCB_REVOKED)
# A TD app may also accept a TD relaunch advice (the platform was updated while the TD ran).
ALLOWABLE_TD_TCB_STATUSES = (*ALLOWABLE_TCB_STATUSES, *dcap.TD_RELAUNCH_STATUSES)
RTMR_NAMES = ("rtmr0", "rtmr1", "rtmr2", "rtmr3")
# TD report fields a TD app may pin, with their sizes (bytes); mr_td is required.
TD_MEASUREMENTS = {"mr_td": 48, "mr_config_id": 48, "mr_owner": 48, "mr_owner_config": 48,
                   **dict.fromkeys(RTMR_NAMES, 48), "xfam": 8, "td_attributes": 8}
TEE_TCB_SVN_SIZE = 16


class ReferenceValuesError(ValueError):
    """Reference values that cannot be used (raised at load time, naming the field)."""


class AppraisedIdentity(Protocol):
    """What appraisal reads from ratls.Identity (a TD's SGX fields, and an enclave's TD fields, are
    empty)."""

    tee: str
    mr_enclave: bytes
    mr_signer: bytes
    isv_prod_id: int
    isv_svn: int
    debug: bool
    tcb_status: str
    advisory_ids: tuple[str, ...]
    not_before: int
    not_after: int
    mr_td: bytes
    rtmrs: tuple[bytes, ...]
    tee_tcb_svn: bytes


@dataclass(frozen=True)
class Decision:
    accepted: bool
    reason: str | None = None


@dataclass(frozen=True)
class Success:
    """A check passed."""

    success: ClassVar[bool] = True


@dataclass(frozen=True)
class Failure:
    """A check failed, and says why in words the tenant can act on."""

    reason: str
    success: ClassVar[bool] = False


CheckResult = Success | Failure
SUCCESS = Success()


class Check(Protocol):
    def verify(self, identity: AppraisedIdentity) -> CheckResult: ...


def _tee_of(identity: AppraisedIdentity) -> str:
    return getattr(identity, "tee", "sgx")


def _measured(identity: AppraisedIdentity, name: str) -> bytes:
    """The identity's value of a measurement field; rtmrN from the rtmrs tuple ("" when absent)."""
    if name in RTMR_NAMES:
        rtmrs = getattr(identity, "rtmrs", ())
        index = RTMR_NAMES.index(name)
        return bytes(rtmrs[index]) if index < len(rtmrs) else b""
    return bytes(getattr(identity, name, b""))


_TEE_WORDS = {"sgx": "an SGX enclave", "tdx": "a TD"}
_APP_WORDS = {"sgx": "an SGX app", "tdx": "a TD app"}


@dataclass(frozen=True)
class TeeIs:
    """An SGX app is never matched by a TD, nor a TD app by an enclave."""

    tee: str

    def verify(self, identity: AppraisedIdentity) -> CheckResult:
        tee = _tee_of(identity)
        if tee != self.tee:
            return Failure(f"{_TEE_WORDS.get(tee, tee)} cannot be {_APP_WORDS[self.tee]}")
        return SUCCESS


@dataclass(frozen=True)
class Measurement:
    """One measurement, compared in full (never a prefix)."""

    name: str
    expected: bytes

    def verify(self, identity: AppraisedIdentity) -> CheckResult:
        got = _measured(identity, self.name)
        if got != self.expected:
            return Failure(f"{self.name} {got.hex()} not in policy")
        return SUCCESS


@dataclass(frozen=True)
class IsvProdId:
    expected: int

    def verify(self, identity: AppraisedIdentity) -> CheckResult:
        if identity.isv_prod_id != self.expected:
            return Failure(f"isv_prod_id {identity.isv_prod_id} is not the policy's {self.expected}")
        return SUCCESS


@dataclass(frozen=True)
class MinIsvSvn:
    minimum: int

    def verify(self, identity: AppraisedIdentity) -> CheckResult:
        if identity.isv_svn < self.minimum:
            return Failure(f"isv_svn {identity.isv_svn} below the policy's minimum {self.minimum}")
        return SUCCESS


@dataclass(frozen=True)
class MinTeeTcbSvn:
    """Each of the 16 TEE TCB SVN components at least the policy's (as Intel compares them)."""

    minimum: bytes

    def verify(self, identity: AppraisedIdentity) -> CheckResult:
        got = bytes(getattr(identity, "tee_tcb_svn", b""))
        if len(got) != len(self.minimum) or any(g < m for g, m in zip(got, self.minimum, strict=True)):
            return Failure(f"tee_tcb_svn {got.hex()} below the policy's minimum {self.minimum.hex()}")
        return SUCCESS


@dataclass(frozen=True)
class NotDebug:
    """A debug enclave (or a TD with TUD.DEBUG) can be read and changed by its host."""

    what: str = "enclave"

    def verify(self, identity: AppraisedIdentity) -> CheckResult:
        if identity.debug:
            return Failure(f"debug {self.what} refused")
        return SUCCESS


@dataclass(frozen=True)
class TcbStatusAllowed:
    allowed: frozenset[str]

    def verify(self, identity: AppraisedIdentity) -> CheckResult:
        if identity.tcb_status == TCB_REVOKED:
            return Failure("TCB status Revoked is never allowed")
        if identity.tcb_status not in self.allowed:
            return Failure(f"TCB status {identity.tcb_status} not allowed")
        return SUCCESS


@dataclass(frozen=True)
class Advisories:
    """refused: listed advisory IDs refuse; accepted: any ID not listed refuses; None: not checked."""

    refused: frozenset[str] | None
    accepted: frozenset[str] | None

    def verify(self, identity: AppraisedIdentity) -> CheckResult:
        ids = [a.upper() for a in identity.advisory_ids]
        if self.refused is not None:
            bad = sorted(a for a in ids if a in self.refused)
            if bad:
                return Failure(f"advisory {', '.join(bad)} refused by policy")
        if self.accepted is not None:
            bad = sorted(a for a in ids if a not in self.accepted)
            if bad:
                return Failure(f"advisory {', '.join(bad)} not in the policy's accepted advisories")
        return SUCCESS


@dataclass(frozen=True)
class CertificateValid:
    """The RA-TLS certificate is within its dates at `now`."""

    now: int

    def verify(self, identity: AppraisedIdentity) -> CheckResult:
        if self.now < identity.not_before:
            return Failure(f"certificate not yet valid (notBefore {_iso(identity.not_before)})")
        if self.now > identity.not_after:
            return Failure(f"certificate expired (notAfter {_iso(identity.not_after)})")
        return SUCCESS


@dataclass(frozen=True)
class AllOf:
    """Every check passes; the first failure is the result.  Built from no checks it would accept
    anything, so that is refused when it is built."""

    checks: tuple[Check, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "checks", tuple(self.checks))
        if not self.checks:
            raise ReferenceValuesError("AllOf: no checks (that would accept every identity)")

    def verify(self, identity: AppraisedIdentity) -> CheckResult:
        for check in self.checks:
            result = check.verify(identity)
            if not result.success:
                return result
        return SUCCESS


def _iso(t: int) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- reference values: parsing (strict, naming the field) ----------------------------------------

_HEX = re.compile(r"[0-9a-fA-F]*")


def _field(where: str, name: str) -> str:
    return f"{where}: {name}" if where else name


def parse_hex(value: object, name: str, size: int = 32) -> bytes:
    """Exactly 2*size hex characters (either case): anything else is a policy error, never a partial
    match."""
    chars = 2 * size
    if isinstance(value, bytes | bytearray):
        if len(value) != size:
            raise ReferenceValuesError(f"{name}: must be {size} bytes, got {len(value)}")
        return bytes(value)
    if not isinstance(value, str):
        raise ReferenceValuesError(f"{name}: must be a hex string, got {type(value).__name__}")
    if value == "":
        raise ReferenceValuesError(f"{name}: is empty ({chars} hex characters required)")
    if _HEX.fullmatch(value) is None:
        raise ReferenceValuesError(f"{name}: contains non-hex characters")
    if len(value) % 2:
        raise ReferenceValuesError(f"{name}: odd-length hex ({len(value)} characters, {chars} required)")
    if len(value) != chars:
        raise ReferenceValuesError(f"{name}: must be {chars} hex characters ({size} bytes), got {len(value)}")
    return bytes.fromhex(value)


def _parse_u16(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ReferenceValuesError(f"{name}: must be an integer, got {type(value).__name__}")
    if not 0 <= value <= 0xFFFF:
        raise ReferenceValuesError(f"{name}: must be 0..65535, got {value}")
    return value


def _parse_strings(value: object, name: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list | tuple | set | frozenset):
        raise ReferenceValuesError(f"{name}: must be a list of strings, got {type(value).__name__}")
    out = []
    for i, v in enumerate(value):
        if not isinstance(v, str) or not v.strip() or v != v.strip():
            raise ReferenceValuesError(f"{name}[{i}]: must be a non-empty string without surrounding spaces")
        out.append(v)
    return tuple(out)


def _parse_tcb_statuses(value: object, name: str,
                        allowable: tuple[str, ...] = ALLOWABLE_TCB_STATUSES) -> frozenset[str]:
    statuses = _parse_strings(value, name)
    if not statuses:
        raise ReferenceValuesError(f"{name}: empty (omit it to allow only UpToDate)")
    for s in statuses:
        if s == TCB_REVOKED:
            raise ReferenceValuesError(f"{name}: Revoked can never be allowed")
        if s not in allowable:
            raise ReferenceValuesError(f"{name}: unknown TCB status {s!r} (allowed: {', '.join(allowable)})")
    return frozenset(statuses)


def _parse_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise ReferenceValuesError(f"{name}: must be true or false")
    return value


def _parse_advisories(obj: Any) -> None:
    """Normalise refused/accepted advisories in place (upper case), refusing both at once."""
    if obj.refused_advisories is not None and obj.accepted_advisories is not None:
        raise ReferenceValuesError("refused_advisories/accepted_advisories: give one of them, not both")
    for name in ("refused_advisories", "accepted_advisories"):
        value = getattr(obj, name)
        if value is not None:
            object.__setattr__(obj, name, frozenset(a.upper() for a in _parse_strings(value, name)))


def _common_from_dict(d: Mapping[str, Any], where: str, allowable: tuple[str, ...]) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if "allow_debug" in d:
        kw["allow_debug"] = _parse_bool(d["allow_debug"], _field(where, "allow_debug"))
    if "allowed_tcb_statuses" in d:
        kw["allowed_tcb_statuses"] = _parse_tcb_statuses(
            d["allowed_tcb_statuses"], _field(where, "allowed_tcb_statuses"), allowable
        )
    for name in ("refused_advisories", "accepted_advisories"):
        if name in d:
            kw[name] = frozenset(_parse_strings(d[name], _field(where, name)))
    return kw


def _common_to_dict(rv: Any, out: dict[str, Any]) -> dict[str, Any]:
    out["allow_debug"] = rv.allow_debug
    out["allowed_tcb_statuses"] = sorted(rv.allowed_tcb_statuses)
    if rv.refused_advisories is not None:
        out["refused_advisories"] = sorted(rv.refused_advisories)
    if rv.accepted_advisories is not None:
        out["accepted_advisories"] = sorted(rv.accepted_advisories)
    return out


def _parse_common(rv: Any, allowable: tuple[str, ...]) -> None:
    """Validate (and normalise in place) what an enclave's and a TD's reference values share."""
    _parse_bool(rv.allow_debug, "allow_debug")
    statuses = _parse_tcb_statuses(rv.allowed_tcb_statuses, "allowed_tcb_statuses", allowable)
    object.__setattr__(rv, "allowed_tcb_statuses", statuses)
    _parse_advisories(rv)


_RV = TypeVar("_RV")


def _construct(cls: type[_RV], kw: dict[str, Any], where: str) -> _RV:
    """``cls(**kw)``, its error prefixed with where in the policy the values stand."""
    try:
        return cls(**kw)
    except ReferenceValuesError as e:
        raise ReferenceValuesError(f"{where}: {e}" if where else str(e)) from None


def _common_checks(rv: Any, checks: list[Check], what: str) -> list[Check]:
    """``checks``, then debug (unless allowed; ``what`` names the TEE), TCB status and advisories."""
    if not rv.allow_debug:
        checks.append(NotDebug(what))
    return [*checks, TcbStatusAllowed(rv.allowed_tcb_statuses),
            Advisories(rv.refused_advisories, rv.accepted_advisories)]


def _check_keys(d: object, keys: tuple[str, ...], where: str) -> Mapping[str, Any]:
    if not isinstance(d, dict):
        raise ReferenceValuesError(f"{where or 'reference values'}: must be an object")
    unknown = sorted(set(d) - set(keys), key=str)
    if unknown:
        raise ReferenceValuesError(f"{_field(where, str(unknown[0]))}: unknown key")
    return d


def _appraise(identity_checks: list[Check], other: list[Check], identity: AppraisedIdentity,
              now: int | None, app: str) -> Decision:
    t = int(time.time()) if now is None else int(now)
    result = AllOf((CertificateValid(t), *identity_checks, *other)).verify(identity)
    if isinstance(result, Failure):
        return Decision(False, f"{result.reason} for app {app}" if app else result.reason)
    return Decision(True, None)


REFERENCE_VALUE_KEYS = (
    "mr_enclave",
    "mr_signer",
    "isv_prod_id",
    "min_isv_svn",
    "allow_debug",
    "allowed_tcb_statuses",
    "refused_advisories",
    "accepted_advisories",
)
TD_REFERENCE_VALUE_KEYS = (
    *TD_MEASUREMENTS,
    "min_tee_tcb_svn",
    "allow_debug",
    "allowed_tcb_statuses",
    "refused_advisories",
    "accepted_advisories",
)


class _Appraisable:
    """What an enclave's and a TD's reference values do alike with their ``identity_checks`` (which
    pick the app) and ``other_checks``."""

    def identity_checks(self) -> list[Check]:
        raise NotImplementedError

    def other_checks(self) -> list[Check]:
        raise NotImplementedError

    def matches_identity(self, identity: AppraisedIdentity) -> bool:
        """Identity match only (the TEE and the pinned measurements/ids): used to pick the app."""
        return AllOf(tuple(self.identity_checks())).verify(identity).success

    def appraise(self, identity: AppraisedIdentity, *, now: int | None = None, app: str = "") -> Decision:
        """Accept only when every check passes; the first refusal is the reason."""
        return _appraise(self.identity_checks(), self.other_checks(), identity, now, app)


@dataclass(frozen=True)
class ReferenceValues(_Appraisable):
    """What one app's enclave must be. Constructed values are validated just like loaded ones.

    ``mr_enclave``/``mr_signer``: the exact 32-byte values (None: not checked; at least one is set).
    Revoked can never be allowed: asking for it is a load error, and appraise refuses it regardless.
    ``refused_advisories`` refuses listed advisory IDs; ``accepted_advisories`` refuses any ID not
    listed. Neither given: advisories never refuse (Intel reports them even for UpToDate platforms).
    """

    mr_enclave: bytes | None = None
    mr_signer: bytes | None = None
    isv_prod_id: int | None = None
    min_isv_svn: int | None = None
    allow_debug: bool = False
    allowed_tcb_statuses: frozenset[str] = field(default_factory=lambda: frozenset({TCB_UP_TO_DATE}))
    refused_advisories: frozenset[str] | None = None
    accepted_advisories: frozenset[str] | None = None

    tee: ClassVar[str] = "sgx"

    def __post_init__(self) -> None:
        for name in ("mr_enclave", "mr_signer"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, parse_hex(getattr(self, name), name))
        if self.mr_enclave is None and self.mr_signer is None:
            raise ReferenceValuesError("mr_enclave/mr_signer: at least one is required")
        for name in ("isv_prod_id", "min_isv_svn"):
            if getattr(self, name) is not None:
                _parse_u16(getattr(self, name), name)
        _parse_common(self, ALLOWABLE_TCB_STATUSES)

    @classmethod
    def from_dict(cls, d: object, *, where: str = "") -> ReferenceValues:
        """Strict loader: unknown keys, wrong types and malformed hex are errors naming the field."""
        d = _check_keys(d, REFERENCE_VALUE_KEYS, where)
        kw = {n: parse_hex(d[n], _field(where, n)) for n in ("mr_enclave", "mr_signer") if n in d}
        kw |= {n: _parse_u16(d[n], _field(where, n)) for n in ("isv_prod_id", "min_isv_svn") if n in d}
        kw |= _common_from_dict(d, where, ALLOWABLE_TCB_STATUSES)
        return _construct(cls, kw, where)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.mr_enclave is not None:
            out["mr_enclave"] = self.mr_enclave.hex()
        if self.mr_signer is not None:
            out["mr_signer"] = self.mr_signer.hex()
        if self.isv_prod_id is not None:
            out["isv_prod_id"] = self.isv_prod_id
        if self.min_isv_svn is not None:
            out["min_isv_svn"] = self.min_isv_svn
        return _common_to_dict(self, out)

    def identity_checks(self) -> list[Check]:
        """What picks the app: the TEE, mr_enclave, mr_signer, isv_prod_id (those pinned)."""
        checks: list[Check] = [TeeIs("sgx")]
        checks += [Measurement(n, v) for n in ("mr_enclave", "mr_signer")
                   if (v := getattr(self, n)) is not None]
        if self.isv_prod_id is not None:
            checks.append(IsvProdId(self.isv_prod_id))
        return checks

    def other_checks(self) -> list[Check]:
        checks: list[Check] = [] if self.min_isv_svn is None else [MinIsvSvn(self.min_isv_svn)]
        return _common_checks(self, checks, "enclave")

    @property
    def specificity(self) -> tuple[int, ...]:
        """How narrowly the identity is pinned: mr_enclave beats mr_signer(+prod id)."""
        return (self.mr_enclave is not None, self.mr_signer is not None, self.isv_prod_id is not None)

    @property
    def identity_key(self) -> tuple[object, ...]:
        return (self.mr_enclave, self.mr_signer, self.isv_prod_id)


@dataclass(frozen=True)
class TdReferenceValues(_Appraisable):
    """What one app's TD must be: mr_td exactly, and each other pinned TD report field exactly
    (mr_config_id, mr_owner, mr_owner_config, rtmr0-3, xfam, td_attributes); tee_tcb_svn at least
    ``min_tee_tcb_svn`` component-wise.  ``allow_debug`` (TUD.DEBUG), TCB statuses (the TD relaunch
    ones included) and advisories as for an enclave."""

    mr_td: bytes
    mr_config_id: bytes | None = None
    mr_owner: bytes | None = None
    mr_owner_config: bytes | None = None
    rtmr0: bytes | None = None
    rtmr1: bytes | None = None
    rtmr2: bytes | None = None
    rtmr3: bytes | None = None
    xfam: bytes | None = None
    td_attributes: bytes | None = None
    min_tee_tcb_svn: bytes | None = None
    allow_debug: bool = False
    allowed_tcb_statuses: frozenset[str] = field(default_factory=lambda: frozenset({TCB_UP_TO_DATE}))
    refused_advisories: frozenset[str] | None = None
    accepted_advisories: frozenset[str] | None = None

    tee: ClassVar[str] = "tdx"

    def __post_init__(self) -> None:
        if self.mr_td is None:
            raise ReferenceValuesError("mr_td: is required for a TD app")
        for name, size in TD_MEASUREMENTS.items():
            if getattr(self, name) is not None:
                object.__setattr__(self, name, parse_hex(getattr(self, name), name, size))
        if self.min_tee_tcb_svn is not None:
            object.__setattr__(self, "min_tee_tcb_svn",
                               parse_hex(self.min_tee_tcb_svn, "min_tee_tcb_svn", TEE_TCB_SVN_SIZE))
        _parse_common(self, ALLOWABLE_TD_TCB_STATUSES)

    @classmethod
    def from_dict(cls, d: object, *, where: str = "") -> TdReferenceValues:
        d = _check_keys(d, TD_REFERENCE_VALUE_KEYS, where)
        if d.get("mr_td") in (None, ""):
            raise ReferenceValuesError(f"{_field(where, 'mr_td')}: is required for a TD app "
                                       "(96 hex characters)")
        kw: dict[str, Any] = {n: parse_hex(d[n], _field(where, n), size)
                              for n, size in TD_MEASUREMENTS.items() if n in d}
        if "min_tee_tcb_svn" in d:
            kw["min_tee_tcb_svn"] = parse_hex(d["min_tee_tcb_svn"], _field(where, "min_tee_tcb_svn"),
                                              TEE_TCB_SVN_SIZE)
        kw |= _common_from_dict(d, where, ALLOWABLE_TD_TCB_STATUSES)
        return _construct(cls, kw, where)

    def to_dict(self) -> dict[str, Any]:
        out = {n: v.hex() for n in (*TD_MEASUREMENTS, "min_tee_tcb_svn")
               if (v := getattr(self, n)) is not None}
        return _common_to_dict(self, out)

    def _pinned(self) -> list[str]:
        return [n for n in TD_MEASUREMENTS if getattr(self, n) is not None]

    def identity_checks(self) -> list[Check]:
        """What picks the app: the TEE, mr_td and every other pinned TD report field."""
        return [TeeIs("tdx"), *(Measurement(n, getattr(self, n)) for n in self._pinned())]

    def other_checks(self) -> list[Check]:
        checks: list[Check] = [] if self.min_tee_tcb_svn is None else [MinTeeTcbSvn(self.min_tee_tcb_svn)]
        return _common_checks(self, checks, "TD")

    @property
    def specificity(self) -> tuple[int, ...]:
        """More pinned TD report fields beat fewer (mr_td is always pinned)."""
        return (True, len(self._pinned()))

    @property
    def identity_key(self) -> tuple[object, ...]:
        return ("tdx", *((n, getattr(self, n)) for n in self._pinned()))
