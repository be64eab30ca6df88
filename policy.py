"""Which enclave gets which secrets, from which KMS: the tenant's policy file.

The file format is the one confidential-computing-zoo's ASPS used (`policy_vault.json`,
`policy_no_kms.json`), read strictly: a typo in a key, a measurement that is not hex, or an app
that would match any enclave is a load error naming the app and the field, never a silent
"allow". Each app may add the appraisal fields of `ratls.ReferenceValues` (mr_signer,
isv_prod_id, min_isv_svn, allow_debug, allowed_tcb_statuses, refused/accepted advisories).

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

Who may import it: the tenant side (asps_server) and tests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kms
import ratls

__all__ = ["AmbiguousApp", "AppPolicy", "Policy", "PolicyError", "load_policy", "parse_policy"]

# The appraisal keys belong to ratls.ReferenceValues; the others are the policy's own.
APPRAISAL_KEYS = frozenset(ratls.REFERENCE_VALUE_KEYS)
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
    reference: ratls.ReferenceValues
    # name -> KMS path (vault) or key of the JSON agent. Paths are not secret, values are never here.
    paths: Mapping[str, str] = field(repr=False)
    agent: kms.KmsAgent = field(repr=False, compare=False)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.paths)

    @property
    def specificity(self) -> tuple[bool, bool, bool]:
        """How narrowly the app's identity is pinned: mr_enclave beats mr_signer(+prod id)."""
        r = self.reference
        return (
            getattr(r, "mr_enclave", None) is not None,
            getattr(r, "mr_signer", None) is not None,
            getattr(r, "isv_prod_id", None) is not None,
        )

    @property
    def identity_key(self) -> tuple[object, object, object]:
        r = self.reference
        return (
            getattr(r, "mr_enclave", None),
            getattr(r, "mr_signer", None),
            getattr(r, "isv_prod_id", None),
        )

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
                f"{where}: app {app.id}: same identity (mr_enclave/mr_signer/isv_prod_id) as app "
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


def _agent_factory(kind: str, data: Mapping[str, Any], where: str, base_dir: Path, warnings: list[str]):
    """(function (app where, app dict, inline name->value) -> KmsAgent, whether secrets name KMS keys)."""
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
            if not isinstance(ca_file, str) or not ca_file:
                raise PolicyError(f"{where}: field 'ca_file' must be a file name")
            ca_path = base_dir / ca_file
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
                return kms.VaultAgent(
                    nodes,
                    token,
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
        if not isinstance(secrets_file, str) or not secrets_file:
            raise PolicyError(f"{where}: field 'secrets_file' must be a file name")
        path = base_dir / secrets_file
        try:
            shared = kms.JsonAgent.from_file(str(path))
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
            return kms.JsonAgent(dict(inline), source=app_where)
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

    appraisal = {k: v for k, v in raw.items() if k in APPRAISAL_KEYS}
    if not any(appraisal.get(k) not in (None, "") for k in ("mr_enclave", "mr_signer")):
        raise PolicyError(
            f"{aw}: no identity: give 'mr_enclave' (and/or 'mr_signer'); an app without one "
            "would match every enclave"
        )
    try:
        reference = ratls.ReferenceValues.from_dict(appraisal, where=aw)
    except ratls.ReferenceValuesError as e:
        msg = str(e)
        raise PolicyError(msg if app_id in msg else f"{aw}: {msg}") from None

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
