"""KMS agents: fetch one secret value by reference, from Vault/OpenBao or from JSON.

The service only needs ``agent.get(path) -> bytes``; everything KMS-specific stays behind that call,
so another KMS is one more class with a ``get`` method (plus a line in ``agent_from_config``).

Errors say what kind of failure happened so the server can map them to a gRPC status in one place:

- ``KmsUnavailable`` - the KMS could not answer (connection refused/reset, timeout, 5xx, sealed,
  rate-limited; with several Vault nodes: none of them could). Retryable: the server reports
  UNAVAILABLE and the client may try again later.
- ``KmsDenied`` - the KMS answered and refused: the token is invalid/expired/revoked
  (``token_invalid`` is True) or valid but its policies don't allow this path.
- ``KmsNotFound`` - no secret at that path, or the secret has no such field.
- ``KmsConfigError`` - the agent or a reference is malformed, or a login's credential files cannot
  be read: the server's configuration is wrong (FAILED_PRECONDITION, not retryable).
- ``KmsError`` - anything else (unexpected answers).

No exception message or log line carries a secret value or a token: messages name the KMS address,
the reference and the HTTP status only.

Vault/OpenBao HA: ``addr`` may list several nodes of one cluster (a list, or one comma-separated
string); ``VaultAgent`` keeps using the node that last answered, moves on to the next one when a node
cannot answer (down, hung, sealed, 5xx, a standby that redirects), and never sends a request Vault
refused (403/400/404) again, to any node. One ``get`` is bounded by the agent's ``deadline``.

Vault credentials: a static token (the original's ``app_token``), or a login (``AppRoleLogin``:
role_id and secret_id files; ``CertLogin``: a TLS client certificate). With a login the agent logs
in at its first request, renews the token past half its TTL, logs in again when renewal is
impossible (max TTL, refused) and once more when a read is refused because the token died.

References are ``"mount/path/to/secret#field"``; the field defaults to ``key`` because the original
cczoo write_secrets.sh stored every secret as ``key=<value>``. For KV v2 the reference is the
logical path (as ``vault kv get`` takes it), without ``data/``.

Who may import it: the tenant side (policy, asps_server) and tests; it imports no other project module.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import urllib3
import urllib3.exceptions

log = logging.getLogger("asps.kms")

DEFAULT_FIELD = "key"


class KmsError(Exception):
    """A KMS lookup failed (base class; also used for unexpected answers)."""


class KmsUnavailable(KmsError):
    """The KMS could not be reached or could not serve now (retryable)."""


class KmsDenied(KmsError):
    """The KMS refused: bad/expired/revoked token (``token_invalid``) or not allowed by its policies."""

    def __init__(self, message: str, *, token_invalid: bool = False) -> None:
        super().__init__(message)
        self.token_invalid = token_invalid


class KmsNotFound(KmsError):
    """No secret at this path, or no such field in it."""


class KmsConfigError(KmsError, ValueError):
    """The agent's configuration or a secret reference is malformed."""


@runtime_checkable
class KmsAgent(Protocol):
    """What the service needs from a KMS: the value of one secret reference, as bytes."""

    def get(self, path: str) -> bytes: ...


# --------------------------------------------------------------------------------------- references
@dataclass(frozen=True)
class SecretRef:
    """A parsed reference: KMS path and the field inside the secret."""

    path: str
    field: str = DEFAULT_FIELD

    def __str__(self) -> str:
        return f"{self.path}#{self.field}"


def parse_ref(ref: str, *, default_field: str = DEFAULT_FIELD) -> SecretRef:
    """Split ``"a/b/c#field"``; refuse empty, ``.``/``..`` or empty segments (no path games)."""
    if not isinstance(ref, str) or not ref.strip():
        raise KmsConfigError("empty secret reference")
    problem = ref_problem(ref)
    if problem:
        raise KmsConfigError(f"secret reference {ref!r}: {problem}")
    path, _, field = ref.partition("#")
    return SecretRef(path.strip("/"), field or default_field)


def ref_problem(ref: str) -> str | None:
    """Why ``parse_ref`` refuses ``ref``, in words that do not repeat it (a policy check may be
    looking at a secret value pasted where a reference belongs); None when it is accepted."""
    if not isinstance(ref, str) or not ref.strip():
        return "empty secret reference"
    path, sep, field = ref.partition("#")
    if sep and not field:
        return "empty field after '#'"
    if "#" in field:
        return "more than one '#'"
    path = path.strip("/")
    segments = path.split("/")
    if not path or any(s in ("", ".", "..") for s in segments):
        return "empty, '.' or '..' path segment (e.g. '//' or '/../')"
    if any(c.isspace() or c in "?%\\" for c in path) or not path.isprintable():
        return "whitespace, a control character or one of ?%\\ (query, escape) in the path"
    return None


def _to_bytes(value: Any, where: str, error: type[KmsError] = KmsError) -> bytes:
    """Secret values are returned as bytes: str as UTF-8, bytes as is, other JSON as compact JSON.

    A str parsed from JSON may hold a lone surrogate (the escape ``\\ud800``), which has no UTF-8
    form: that is `error`, naming ``where`` (the reference), never the value."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError:
            raise error(f"{where}: value is not valid Unicode text (lone surrogate)") from None
    if value is None:
        raise KmsNotFound(f"{where}: value is null")
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode("utf-8")


# --------------------------------------------------------------------------------------- Vault/OpenBao
@dataclass(frozen=True)
class _Mount:
    path: str  # "occlum/1/" (with the trailing slash, as Vault reports it)
    kv_version: int  # 1 or 2


# Vault's KV v2 error text while a mount is upgrading/initialising ("... will resume service when the
# primary is finished"): transient, so a node failure rather than a refusal of the request.
_KV_NOT_READY = ("Waiting for the primary to upgrade",)


@dataclass(frozen=True)
class _Failure:
    """Why one node could not give a verdict for one request (never carries a secret or token)."""

    problem: str
    retryable: bool = True  # worth asking this node again after a pause
    tls: bool = False  # certificate/handshake problem (no retry; KmsError, not KmsUnavailable)
    redirect: str | None = None  # the listed node a standby pointed at, if any


# --------------------------------------------------------------------------------------- Vault login
# A static token is the original's way; a deployment renews nothing and re-issues tokens by hand. A
# login method lets the agent get its own short-lived tokens: AppRole (role_id + secret_id, read from
# files at each login so they can be rotated without a restart) or a TLS client certificate.


@dataclass(frozen=True)
class LoginRequest:
    """One login call: the API path, its JSON body and an optional TLS client (cert, key) pair."""

    path: str
    body: Mapping[str, Any] = field(repr=False)  # holds the secret_id: never printed
    cert: tuple[str, str] | None = None


def _redact_login(text: str, request: LoginRequest) -> str:
    """A node's error text is its own: one that echoes what a login sent (a hostile or broken node)
    must not carry the role_id or secret_id into an exception, and so into a log line."""
    for sent in request.body.values():
        if isinstance(sent, str) and len(sent) >= 4:
            text = text.replace(sent, "<redacted>")
    return text


@runtime_checkable
class VaultLogin(Protocol):
    """How a ``VaultAgent`` obtains a token when it has none, or its token cannot be renewed."""

    method: str

    def validate(self, agent: VaultAgent) -> None:
        """Refuse (KmsConfigError) a configuration that can never log in, e.g. cert auth over http."""
        ...

    def login_request(self) -> LoginRequest:
        """The login call; reads credential files now (KmsConfigError when they cannot be read)."""
        ...


def _mount_name(mount: str, method: str) -> str:
    if not isinstance(mount, str) or ref_problem(mount + "/x") or "#" in mount:
        raise KmsConfigError(f"{method} auth mount must be a plain path such as {method!r}")
    return mount.strip("/")


def read_credential_file(path: str | Path, what: str) -> str:
    """The one-line content of a credential file (role_id, secret_id); never quoted in errors."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise KmsConfigError(f"cannot read the {what} file {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise KmsConfigError(f"the {what} file {path} is not ASCII text") from None
    if not text:
        raise KmsConfigError(f"the {what} file {path} is empty")
    if not text.isprintable() or any(c.isspace() for c in text):
        raise KmsConfigError(f"the {what} file {path} holds more than one word or control characters")
    return text


@dataclass(frozen=True)
class AppRoleLogin:
    """AppRole: ``role_id`` and ``secret_id`` read from files (never inline in a policy)."""

    role_id_file: str
    secret_id_file: str
    mount: str = "approle"
    method: str = field(default="approle", init=False)

    def validate(self, agent: VaultAgent) -> None:
        _mount_name(self.mount, self.method)

    def login_request(self) -> LoginRequest:
        body = {
            "role_id": read_credential_file(self.role_id_file, "AppRole role_id"),
            "secret_id": read_credential_file(self.secret_id_file, "AppRole secret_id"),
        }
        return LoginRequest(f"auth/{_mount_name(self.mount, self.method)}/login", body)


@dataclass(frozen=True)
class CertLogin:
    """TLS certificate auth: the client certificate and key files; ``name`` picks one cert role."""

    cert_file: str
    key_file: str
    name: str | None = None
    mount: str = "cert"
    method: str = field(default="cert", init=False)

    def validate(self, agent: VaultAgent) -> None:
        _mount_name(self.mount, self.method)
        if not all(a.startswith("https://") for a in agent.addrs):
            raise KmsConfigError("cert auth needs https:// Vault addresses (the certificate is sent in TLS)")

    def login_request(self) -> LoginRequest:
        for path, what in ((self.cert_file, "client certificate"), (self.key_file, "client key")):
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise KmsConfigError(f"cannot read the {what} file {path}: {exc.strerror or exc}") from None
        body = {"name": self.name} if self.name else {}
        return LoginRequest(
            f"auth/{_mount_name(self.mount, self.method)}/login", body, (self.cert_file, self.key_file)
        )


@dataclass
class _Lease:
    """When the logged-in token should be renewed and when it dies (monotonic seconds)."""

    renew_at: float = 0.0
    expires_at: float = 0.0
    ttl: float = 0.0  # as granted at login (0: no expiry)
    renewable: bool = False


class VaultAgent:
    """Reads secrets from a Vault or OpenBao KV engine (v1 or v2) with one token, from one node or
    from any node of an HA cluster.

    One pooled HTTP transport (``Urllib3Transport``: urllib3 used directly, about half the CPU per
    read of a ``requests.Session``); each request has a connect and a read timeout; connection
    errors, timeouts and 5xx answers are retried ``retries`` times with exponential backoff; 4xx
    answers never are (a refusal does not improve by asking again). Mount versions are detected
    once per mount with ``GET /v1/sys/internal/ui/mounts/<path>`` and cached.

    Several nodes (HA): ``addr`` may be a list of base URLs or one comma-separated string. A request
    goes first to the node that last gave a verdict (sticky; initially the first listed), and on a
    connection error, timeout, 5xx (sealed, "no active node"), 429 or redirect it goes on at once to
    the next listed node; a *round* is one pass over the nodes, and rounds are retried ``retries``
    times with the same backoff as for one node. A verdict (2xx, 403, 404, 400...) from any node ends
    the request: a refused request is never sent again, neither to the same node nor to another. The
    one 400 treated as "not ready" instead is KV v2's "Waiting for the primary to upgrade ..." which
    a freshly promoted node answers for a moment after a failover.
    Standbys answer for the active node: OpenBao 2.x standbys serve reads from their own replica by
    default (eventually consistent: a mount or secret written milliseconds ago may still be absent
    there) and forward the rest, or forward everything with ``disable_standby_reads``; standbys that
    cannot forward answer 307 with the active node's address, which is followed only when it is one
    of the listed nodes, so the token never goes to an address that is not configured.

    Time: ``deadline`` bounds one ``get`` (mount detection, read and token check together); each
    request's timeouts are cut to the time left. Default: the single-node worst case
    ``(retries + 1) * timeout + backoff * (2**retries - 1)``. Refused connections fail in
    milliseconds plus the backoff pauses.

    Every HTTP exchange goes through ``_send``; redirects are never followed by the transport itself.

    Values: by default every ``get`` reads Vault (a revoked or rotated secret takes effect at once).
    ``cache_ttl`` > 0 keeps each value read in this agent's memory for that many seconds (an
    operator's opt-in: fewer Vault reads, at the cost of serving a rotated value until it expires);
    a new agent (a policy reload) starts empty.
    """

    def __init__(
        self,
        addr: str | Sequence[str],
        token: str | None = None,
        *,
        auth: VaultLogin | None = None,
        ca_file: str | None = None,
        timeout: float = 5.0,
        connect_timeout: float = 2.0,
        retries: int = 2,
        backoff: float = 0.1,
        deadline: float | None = None,
        kv_version: int | None = None,
        session: Any | None = None,
        cache_ttl: float = 0.0,
    ) -> None:
        self.addrs = self._check_addrs(addr)
        self.addr = ",".join(self.addrs)  # the configured form; one URL for one node
        if (token is None) == (auth is None):
            raise KmsConfigError("Vault agent needs either a token or a login method (auth), not both")
        self._auth = auth
        self._token: str | None = self._check_token(token) if token is not None else None
        self._auth_lock = threading.Lock()
        self._lease = _Lease()  # when the logged-in token is due for renewal / expires (auth only)
        if auth is not None:
            auth.validate(self)
        if ca_file is not None and not Path(ca_file).is_file():
            raise KmsConfigError(f"Vault CA file {ca_file!r} not found")
        if ca_file is not None and not any(a.startswith("https://") for a in self.addrs):
            log.warning("Vault CA file given but %s is plain http; the CA file is unused", self.addr)
        if kv_version not in (None, 1, 2):
            raise KmsConfigError(f"kv_version must be 1 or 2, not {kv_version!r}")
        if timeout <= 0 or connect_timeout <= 0 or retries < 0 or backoff < 0:
            raise KmsConfigError("timeouts must be > 0, retries and backoff >= 0")
        if deadline is not None and deadline <= 0:
            raise KmsConfigError("deadline must be > 0 seconds")
        if isinstance(cache_ttl, bool) or not isinstance(cache_ttl, int | float):
            raise KmsConfigError("cache_ttl must be a number of seconds")
        if not 0 <= cache_ttl <= 86400:
            raise KmsConfigError("cache_ttl must be seconds between 0 (off) and 86400")
        self.ca_file = ca_file
        self.timeout = float(timeout)
        self.connect_timeout = min(float(connect_timeout), self.timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.deadline = (
            float(deadline)
            if deadline is not None
            else (self.retries + 1) * self.timeout + self.backoff * (2**self.retries - 1)
        )
        self.kv_version = kv_version
        self._own_session = session is None
        # A caller's own requests.Session (tests count requests with one; a deployment may want its
        # proxies) is still accepted; otherwise urllib3 directly.
        self._transport: HttpTransport = (
            Urllib3Transport(ca_file) if session is None else RequestsTransport(session, ca_file)
        )
        self.cache_ttl = float(cache_ttl)
        self._cache: dict[str, tuple[float, bytes]] = {}  # ref -> (expires at, value); cache_ttl > 0 only
        self._mounts: dict[str, _Mount] = {}
        self._lock = threading.Lock()
        self._current = self.addrs[0]  # sticky: the node that gave the last verdict

    def __repr__(self) -> str:  # never the token
        method = self._auth.method if self._auth is not None else "token"
        return f"VaultAgent(addr={self.addr!r}, auth={method!r})"

    @property
    def auth_method(self) -> str:
        """'token' (a static token from the policy) or the login method ('approle', 'cert')."""
        return self._auth.method if self._auth is not None else "token"

    @property
    def current_addr(self) -> str:
        """The node the next request goes to first (the last one that gave a verdict)."""
        return self._current

    @classmethod
    def _check_addrs(cls, addr: str | Sequence[str]) -> tuple[str, ...]:
        """One URL, a comma-separated string of URLs, or a list of URLs; duplicates dropped."""
        if isinstance(addr, str):
            parts = addr.split(",") if "," in addr else [addr]
        elif isinstance(addr, Sequence) and all(isinstance(a, str) for a in addr):
            parts = list(addr)
        else:
            raise KmsConfigError("Vault addr must be a URL, a comma-separated string or a list of URLs")
        if not parts:
            raise KmsConfigError("Vault addr lists no node")
        if len(parts) > 1 and any(not p.strip() for p in parts):
            raise KmsConfigError("Vault addr has an empty entry in its list of nodes")
        return tuple(dict.fromkeys(cls._check_addr(p) for p in parts))

    @staticmethod
    def _check_addr(addr: str) -> str:
        if not isinstance(addr, str):
            raise KmsConfigError("Vault addr must be a string URL")
        try:
            # urlsplit refuses e.g. "http://[::1" (unclosed IPv6 bracket); .port one out of 0..65535
            parsed = urllib.parse.urlsplit(addr.strip())
            parsed.port  # noqa: B018
        except ValueError as exc:
            raise KmsConfigError(f"Vault addr {addr!r} is not a valid URL ({exc})") from None
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise KmsConfigError(f"Vault addr {addr!r} is not an http(s) URL")
        if parsed.query or parsed.fragment or parsed.username or parsed.password:
            raise KmsConfigError(
                f"Vault addr {parsed.scheme}://{parsed.hostname}: no query, fragment or user"
            )
        return addr.strip().rstrip("/")

    @staticmethod
    def _check_token(token: str) -> str:
        # A header with control characters would make the HTTP client raise an error quoting the value.
        if not isinstance(token, str) or not token.strip():
            raise KmsConfigError("Vault token is empty")
        token = token.strip()
        if not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
            raise KmsConfigError("Vault token contains whitespace, control or non-ASCII characters")
        return token

    def close(self) -> None:
        self._cache.clear()
        if self._own_session:
            self._transport.close()

    def __enter__(self) -> VaultAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public ----------------------------------------------------------------------------------------
    def get(self, path: str) -> bytes:
        """The value of field ``path#field`` (default ``key``) as bytes, within ``deadline`` seconds.

        With a login method (AppRole, cert) the token is renewed past half its TTL, replaced by a
        fresh login when renewal is impossible, and a read refused because the token died (revoked,
        expired early) is retried once after a fresh login."""
        ref = parse_ref(path)
        if self.cache_ttl:
            return self._cached_get(ref)
        return self._get(ref)

    def _cached_get(self, ref: SecretRef) -> bytes:
        """``_get`` through the opt-in value cache (memory only; one entry per reference)."""
        key = str(ref)
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and now < hit[0]:
            return hit[1]
        value = self._get(ref)
        with self._lock:
            self._cache[key] = (now + self.cache_ttl, value)
        return value

    def _get(self, ref: SecretRef) -> bytes:
        deadline = time.monotonic() + self.deadline
        token = self.token_for_request(deadline)
        try:
            return self._read(ref, deadline, token)
        except KmsDenied as exc:
            if self._auth is None or not exc.token_invalid:
                raise
            log.warning(
                "kms: %s refused the %s token as invalid, expired or revoked; logging in again",
                self.addr,
                self._auth.method,
            )
            token = self._relogin(deadline, stale=token)
            return self._read(ref, deadline, token)

    def api_path(self, path: str) -> str:
        """The HTTP API path of a reference (``data/`` inserted for KV v2), e.g. for capability checks."""
        ref = parse_ref(path)
        deadline = time.monotonic() + self.deadline
        return self._api_path(ref, deadline, self.token_for_request(deadline))

    def _api_path(self, ref: SecretRef, deadline: float, token: str) -> str:
        mount = self._mount_for(ref.path, deadline, token)
        rel = ref.path[len(mount.path) :]
        if not rel:
            raise KmsConfigError(f"secret reference {ref.path!r} names the mount itself, not a secret in it")
        return f"{mount.path}data/{rel}" if mount.kv_version == 2 else ref.path

    def _read(self, ref: SecretRef, deadline: float, token: str) -> bytes:
        mount = self._mount_for(ref.path, deadline, token)
        rel = ref.path[len(mount.path) :]
        if not rel:
            raise KmsConfigError(f"secret reference {ref.path!r} names the mount itself, not a secret in it")
        api_path = f"{mount.path}data/{rel}" if mount.kv_version == 2 else ref.path
        reply, node = self._send("GET", api_path, deadline, token=token)
        body = self._json(reply, ref.path)
        if reply.status_code == 404:
            hint = (
                " (KV v2 references omit 'data/')"
                if mount.kv_version == 2 and rel.startswith("data/")
                else ""
            )
            raise KmsNotFound(f"no secret at {ref.path} on {node}{hint}")
        self._raise_for_status(reply, body, ref.path, node, deadline, token)
        data = body.get("data")
        if mount.kv_version == 2:
            data = data.get("data") if isinstance(data, dict) else None
            if data is None:
                raise KmsNotFound(f"secret {ref.path} on {node} is deleted or destroyed")
        if not isinstance(data, dict):
            raise KmsError(f"unexpected answer for {ref.path} from {node}: no data object")
        if ref.field not in data:
            names = ", ".join(sorted(map(str, data))) or "none"
            raise KmsNotFound(f"secret {ref.path} on {node} has no field {ref.field!r} (fields: {names})")
        return _to_bytes(data[ref.field], f"secret {ref}")

    def check_token(self) -> None:
        """Raise ``KmsDenied(token_invalid=True)`` unless the token is alive (lookup-self); for probes."""
        deadline = time.monotonic() + self.deadline
        self._lookup_self(deadline, self.token_for_request(deadline))

    # -- login, renewal -------------------------------------------------------------------------------
    def token_for_request(self, deadline: float) -> str:
        """The token to use now: the static one, or the logged-in one (logging in or renewing first
        when it is missing, past half its TTL or about to expire)."""
        if self._auth is None:
            assert self._token is not None
            return self._token
        with self._auth_lock:
            now = time.monotonic()
            lease = self._lease
            if self._token is None or (lease.ttl and now >= lease.expires_at - 0.2 * lease.ttl):
                return self._login_locked(deadline)
            if lease.ttl and now >= lease.renew_at:
                return self._renew_locked(deadline)
            return self._token

    def _relogin(self, deadline: float, *, stale: str) -> str:
        """A fresh login after ``stale`` was refused, unless another thread already replaced it."""
        with self._auth_lock:
            if self._token is not None and self._token != stale:
                return self._token
            return self._login_locked(deadline)

    def _login_locked(self, deadline: float) -> str:
        assert self._auth is not None
        request = self._auth.login_request()
        method = self._auth.method
        try:
            reply, node = self._send(
                "POST", request.path, deadline, body=request.body, cert=request.cert, anonymous=True
            )
        except KmsError as exc:  # its message may quote a node's error text: see _redact_login
            exc.args = (_redact_login(str(exc), request),)
            raise
        body = self._json(reply, request.path)
        status = reply.status_code
        if status in (400, 401, 403):
            detail = _redact_login("; ".join(self._errors(body)) or f"HTTP {status}", request)
            raise KmsDenied(
                f"{node} refused the {method} login at {request.path}: {detail}", token_invalid=True
            )
        if not 200 <= status < 300:
            raise KmsError(f"{node} answered HTTP {status} to the {method} login at {request.path}")
        token, ttl, renewable = self._auth_block(body, node, request.path)
        self._token = token
        self._set_lease(ttl, renewable)
        log.info(
            "kms: %s login to %s: token TTL %ss, %s",
            method,
            node,
            f"{ttl:g}" if ttl else "unlimited",
            "renewable" if renewable else "not renewable",
        )
        return token

    def _renew_locked(self, deadline: float) -> str:
        """Renew the current token; a fresh login when it cannot be renewed (any more)."""
        assert self._auth is not None and self._token is not None
        lease = self._lease
        if not lease.renewable:
            return self._login_locked(deadline)
        try:
            reply, node = self._send("POST", "auth/token/renew-self", deadline, body={}, token=self._token)
        except KmsError as exc:  # OpenBao answers 500 "past the max TTL, cannot renew", for one
            log.warning("kms: renewing the %s token failed (%s); logging in again", self._auth.method, exc)
            try:
                return self._login_locked(deadline)
            except KmsUnavailable:
                if time.monotonic() < lease.expires_at:
                    log.warning("kms: login failed too; the current token is still valid, kept for now")
                    return self._token
                raise
        body = self._json(reply, "auth/token/renew-self")
        if not 200 <= reply.status_code < 300:
            log.warning(
                "kms: %s refused renewing the %s token (HTTP %d); logging in again",
                node,
                self._auth.method,
                reply.status_code,
            )
            return self._login_locked(deadline)
        _, ttl, renewable = self._auth_block(body, node, "auth/token/renew-self")
        if ttl <= lease.ttl / 2 or not renewable:
            # Capped by the token's max TTL: renewing again would only buy less and less time.
            log.info("kms: %s token is near its max TTL (%gs left); logging in again", self._auth.method, ttl)
            return self._login_locked(deadline)
        self._set_lease(ttl, renewable, keep_ttl=True)
        log.debug("kms: renewed the %s token on %s: TTL %gs", self._auth.method, node, ttl)
        return self._token

    def _set_lease(self, ttl: float, renewable: bool, *, keep_ttl: bool = False) -> None:
        now = time.monotonic()
        granted = self._lease.ttl if keep_ttl else ttl
        self._lease = _Lease(renew_at=now + ttl / 2, expires_at=now + ttl, ttl=granted, renewable=renewable)

    def _auth_block(self, body: Mapping[str, Any], node: str, path: str) -> tuple[str, float, bool]:
        auth = body.get("auth")
        token = auth.get("client_token") if isinstance(auth, dict) else None
        ttl = auth.get("lease_duration") if isinstance(auth, dict) else None
        if (
            not isinstance(token, str)
            or not token
            or isinstance(ttl, bool)
            or not isinstance(ttl, int | float)
        ):
            raise KmsError(f"unexpected answer from {node} to {path}: no auth block with a token and TTL")
        try:
            token = self._check_token(token)
        except KmsConfigError:
            raise KmsError(f"unexpected answer from {node} to {path}: malformed token") from None
        return token, float(max(ttl, 0)), bool(auth.get("renewable"))

    # -- introspection (check-policy) -----------------------------------------------------------------
    def token_info(self) -> dict[str, Any]:
        """lookup-self of the token in use (logging in first if needed): ttl, renewable, policies..."""
        deadline = time.monotonic() + self.deadline
        return self._lookup_self(deadline, self.token_for_request(deadline))

    def capabilities(self, api_paths: Sequence[str]) -> dict[str, list[str]]:
        """What the token in use may do on each API path (``sys/capabilities-self``)."""
        deadline = time.monotonic() + self.deadline
        token = self.token_for_request(deadline)
        reply, node = self._send(
            "POST", "sys/capabilities-self", deadline, body={"paths": list(api_paths)}, token=token
        )
        body = self._json(reply, "sys/capabilities-self")
        self._raise_for_status(reply, body, "sys/capabilities-self", node, deadline, token)
        data = body.get("data") if isinstance(body.get("data"), dict) else body
        result: dict[str, list[str]] = {}
        for path in api_paths:
            caps = data.get(path)
            if caps is None and len(api_paths) == 1:
                caps = data.get("capabilities")
            result[path] = [str(c) for c in caps] if isinstance(caps, list) else []
        return result

    def revoke_self(self) -> None:
        """Revoke a logged-in token (a check's login should not leave tokens behind); no-op for static."""
        if self._auth is None:
            return
        with self._auth_lock:
            token, self._token = self._token, None
            self._lease = _Lease()
        if token is not None:
            deadline = time.monotonic() + self.deadline
            self._send("POST", "auth/token/revoke-self", deadline, body={}, token=token)

    def _lookup_self(self, deadline: float, token: str | None = None) -> dict[str, Any]:
        reply, node = self._send("GET", "auth/token/lookup-self", deadline, token=token)
        body = self._json(reply, "auth/token/lookup-self")
        if reply.status_code == 403:
            raise KmsDenied(f"{node} rejected the token: invalid, expired or revoked", token_invalid=True)
        self._raise_for_status(reply, body, "auth/token/lookup-self", node, deadline, token)
        data = body.get("data")
        return data if isinstance(data, dict) else {}

    # -- mounts ----------------------------------------------------------------------------------------
    def _mount_for(self, path: str, deadline: float, token: str | None = None) -> _Mount:
        with self._lock:
            for prefix, mount in self._mounts.items():
                if f"{path}/".startswith(prefix):
                    return mount
        reply, node = self._send("GET", f"sys/internal/ui/mounts/{path}", deadline, token=token)
        body = self._json(reply, path)
        if reply.status_code == 404:
            # Very old servers lack this endpoint; a configured version lets us read anyway.
            if self.kv_version is None:
                raise KmsError(
                    f"{node} cannot tell the KV version of {path} (no sys/internal/ui/mounts); "
                    "configure kv_version"
                )
            return _Mount(path.split("/", 1)[0] + "/", self.kv_version)
        if reply.status_code == 403 and "preflight" in " ".join(self._errors(body)):
            # OpenBao/Vault say this both for a mount that does not exist and for one the token may not use.
            self._raise_denied(path, node, deadline, token, mount_check=True)
        self._raise_for_status(reply, body, path, node, deadline, token)
        data = body.get("data") or {}
        mount_path = data.get("path")
        if not isinstance(mount_path, str) or not f"{path}/".startswith(mount_path) or not mount_path:
            raise KmsNotFound(f"no secrets engine mounted for {path} on {node}")
        engine = data.get("type")
        if engine not in ("kv", "generic", "cubbyhole"):
            raise KmsError(f"{mount_path} on {node} is a {engine!r} engine, not kv")
        detected = int((data.get("options") or {}).get("version") or 1) if engine == "kv" else 1
        if self.kv_version is not None and detected != self.kv_version:
            raise KmsConfigError(
                f"{mount_path} on {node} is KV v{detected} but the policy says v{self.kv_version}"
            )
        mount = _Mount(mount_path, detected)
        with self._lock:
            self._mounts[mount_path] = mount
        log.debug("kms: %s%s is KV v%d", node, "/" + mount_path, detected)
        return mount

    # -- HTTP ------------------------------------------------------------------------------------------
    def _send(
        self,
        method: str,
        api_path: str,
        deadline: float,
        *,
        token: str | None = None,
        body: Mapping[str, Any] | None = None,
        cert: tuple[str, str] | None = None,
        anonymous: bool = False,
    ) -> tuple[HttpReply, str]:
        """Send one request until a node gives a verdict; return it with that node. The only network call.

        ``token``: the token to send (default: the agent's current one); ``anonymous`` sends none (a
        login); ``body`` is sent as JSON; ``cert`` is a TLS client (cert, key) pair (cert login).

        Order: the sticky node, then the others as listed; a redirect to a listed node is tried next.
        A node that failed retryably is asked again in the next round, after the backoff pause.
        """
        quoted = "/v1/" + urllib.parse.quote(api_path, safe="/")
        rounds = self.retries + 1
        failures: dict[str, _Failure] = {}  # latest failure per node, for the final message
        attempts = 0
        for round_no in range(1, rounds + 1):
            start = self.addrs.index(self._current)
            queue = [
                n
                for n in self.addrs[start:] + self.addrs[:start]
                if n not in failures or failures[n].retryable
            ]
            if not queue:
                break
            asked: set[str] = set()
            while queue:
                node = queue.pop(0)
                asked.add(node)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._unavailable(failures, attempts, deadline_hit=True)
                attempts += 1
                outcome = self._attempt(
                    method,
                    node,
                    quoted,
                    api_path,
                    remaining,
                    token=None if anonymous else (token or self._token),
                    body=body,
                    cert=cert,
                )
                if isinstance(outcome, HttpReply):
                    if node != self._current:
                        log.warning("kms: now using %s (was %s)", node, self._current)
                        self._current = node
                    return outcome, node
                failures[node] = outcome
                target = outcome.redirect
                if target and target not in asked and failures.get(target, outcome).retryable:
                    if target in queue:
                        queue.remove(target)
                    queue.insert(0, target)
                if queue:
                    log.warning(
                        "kms: %s %s failed (%s); trying %s", node, api_path, outcome.problem, queue[0]
                    )
            if round_no < rounds and any(f.retryable for f in failures.values()):
                delay = self.backoff * (2 ** (round_no - 1))
                if time.monotonic() + delay >= deadline:
                    raise self._unavailable(failures, attempts, deadline_hit=True)
                log.warning(
                    "kms: %s %s failed (%s), attempt %d/%d, retrying in %.2fs",
                    self.addr,
                    api_path,
                    self._summary(failures),
                    round_no,
                    rounds,
                    delay,
                )
                time.sleep(delay)
        raise self._unavailable(failures, attempts, deadline_hit=False)

    def _attempt(
        self,
        method: str,
        node: str,
        quoted: str,
        api_path: str,
        remaining: float,
        *,
        token: str | None = None,
        body: Mapping[str, Any] | None = None,
        cert: tuple[str, str] | None = None,
    ) -> HttpReply | _Failure:
        """One HTTP exchange with one node: its verdict (a Response) or why it gave none."""
        headers = {"Accept": "application/json"}
        if token is not None:
            headers["X-Vault-Token"] = token
        outcome = self._transport.request(
            method,
            node + quoted,
            headers=headers,
            body=body,
            cert=cert,
            timeout=(min(self.connect_timeout, remaining), min(self.timeout, remaining)),
        )
        if isinstance(outcome, _Failure):
            return outcome
        reply = outcome
        status = reply.status_code
        if status >= 500:
            errors = "; ".join(self._errors(self._json(reply, api_path)))
            return _Failure(f"HTTP {status}" + (f" ({errors})" if errors else ""))
        if status == 400 and reply.content:
            # The one 400 that is not a refusal: KV v2 answers it while its mount is still being set up
            # on a node that just became active (seen on OpenBao 2.7 right after a failover).
            errors = "; ".join(self._errors(self._json(reply, api_path)))
            if any(marker in errors for marker in _KV_NOT_READY):
                return _Failure(f"HTTP 400 (KV mount not ready yet: {errors})")
        if status == 429:
            # Rate-limited (a quota): asking this node again at once would not help; another may answer.
            return _Failure("HTTP 429 (rate-limited)", retryable=False)
        if 300 <= status < 400:
            # A standby that does not forward points at the active node (which may be the dead one).
            target = self._listed_node(reply.headers.get("Location", ""))
            where = target or "an address not in the configured list (not followed)"
            return _Failure(f"HTTP {status} redirect to {where}", redirect=target)
        return reply

    def _listed_node(self, location: str) -> str | None:
        """The configured node a redirect points at, or None (never follow to an unlisted address)."""
        try:
            parts = urllib.parse.urlsplit(location)
            port = parts.port
        except ValueError:  # a malformed Location (bad IPv6 literal, port out of range)
            return None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return None
        for node in self.addrs:
            known = urllib.parse.urlsplit(node)
            if (known.scheme, known.hostname, known.port) == (parts.scheme, parts.hostname, port):
                return node
        return None

    def _summary(self, failures: Mapping[str, _Failure]) -> str:
        if len(self.addrs) == 1:
            return next(iter(failures.values())).problem if failures else "no attempt"
        return "; ".join(f"{n}: {failures[n].problem}" for n in self.addrs if n in failures) or "no attempt"

    def _unavailable(
        self, failures: Mapping[str, _Failure], attempts: int, *, deadline_hit: bool
    ) -> KmsError:
        """The error for a request no node gave a verdict on (never names the token or a value)."""
        where = self.addr if len(self.addrs) == 1 else f"all {len(self.addrs)} Vault nodes"
        summary = self._summary(failures)
        if failures and all(f.tls for f in failures.values()):
            return KmsError(f"TLS error talking to {where}: {summary}")
        if deadline_hit:
            return KmsUnavailable(
                f"{where} unavailable: deadline of {self.deadline:g}s reached after {attempts} "
                f"attempt(s): {summary}"
            )
        return KmsUnavailable(f"{where} unavailable after {attempts} attempt(s): {summary}")

    @staticmethod
    def _json(reply: HttpReply, where: str) -> dict[str, Any]:
        if not reply.content:
            return {}
        try:
            body = reply.json()
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than the stack
            if reply.status_code < 300:
                raise KmsError(f"malformed (non-JSON) answer for {where}: HTTP {reply.status_code}") from None
            return {}
        return body if isinstance(body, dict) else {}

    @staticmethod
    def _errors(body: Mapping[str, Any]) -> list[str]:
        errors = body.get("errors")
        if not isinstance(errors, list):
            return []
        # Vault's own error strings (e.g. "permission denied"); bounded, whitespace flattened.
        return [" ".join(str(e).split())[:200] for e in errors[:3] if str(e).strip()]

    def _raise_for_status(
        self,
        reply: HttpReply,
        body: Mapping[str, Any],
        path: str,
        node: str,
        deadline: float,
        token: str | None = None,
    ) -> None:
        status = reply.status_code
        if 200 <= status < 300:
            return
        detail = "; ".join(self._errors(body))
        suffix = f": {detail}" if detail else ""
        if status == 403:
            self._raise_denied(path, node, deadline, token)
        if status == 404:
            raise KmsNotFound(f"no secret at {path} on {node}")
        raise KmsError(f"{node} answered HTTP {status} reading {path}{suffix}")

    def _raise_denied(
        self, path: str, node: str, deadline: float, token: str | None = None, *, mount_check: bool = False
    ) -> None:
        """Tell a dead token from a live one that lacks permission (Vault says 403 for both)."""
        if path == "auth/token/lookup-self":  # the token check itself was refused: the token is dead
            raise KmsDenied(f"{node} rejected the token: invalid, expired or revoked", token_invalid=True)
        try:
            self._lookup_self(deadline, token)
        except KmsDenied:
            raise
        except KmsError as exc:  # the 403 came from a live server; say what the token check hit
            raise KmsDenied(f"{node} refused reading {path} (HTTP 403; token check failed: {exc})") from None
        if mount_check:
            raise KmsDenied(
                f"{node} refused reading {path}: no secrets engine there, or the token's policies "
                "grant nothing on it (HTTP 403)"
            )
        raise KmsDenied(f"{node} refused reading {path}: the token's policies do not allow it (HTTP 403)")


def _short(exc: BaseException) -> str:
    """The innermost cause of a transport error, e.g. 'Connection refused' or 'Read timed out'."""
    text = str(exc)
    for marker in (
        "Connection refused",
        "Read timed out",
        "timed out",
        "Connection reset",
        "Name or service",
    ):
        if marker in text:
            return marker
    return " ".join(text.split())[:160]


# --------------------------------------------------------------------------------------- HTTP transport
# One Vault read is a few small HTTP exchanges; the client's CPU per exchange bounds how many
# attestations a server process can serve (bench/bench_kms.py: requests about 630 us of CPU per
# read, urllib3 directly about 310 us). So the agent talks to urllib3 itself, behind a seam that
# still takes a requests.Session when one is given.


@dataclass(frozen=True)
class HttpReply:
    """One HTTP answer, read whole: what ``VaultAgent`` looks at (status, headers, body)."""

    status_code: int
    headers: Mapping[str, str] = field(repr=False)
    content: bytes = field(repr=False)  # may hold a secret value: never printed

    def json(self) -> Any:
        return json.loads(self.content)


class HttpTransport(Protocol):
    """Sends one request, never following redirects: its answer, or why no answer came (``_Failure``).

    Raises ``KmsError`` only for what is neither an answer nor a network failure."""

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        body: Mapping[str, Any] | None,
        cert: tuple[str, str] | None,
        timeout: tuple[float, float],
    ) -> HttpReply | _Failure: ...

    def close(self) -> None: ...


class Urllib3Transport:
    """urllib3 connection pools used directly: one per node and TLS client certificate (none for
    reads, the cert login's own), each keeping up to ``maxsize`` connections. Verifies TLS against
    ``ca_file``, else the bundle requests used (certifi's, when installed), else the system's trust
    store; reads no proxy or CA settings from the environment (secret traffic is not re-routed).
    A pool per node rather than a PoolManager: the manager's URL parsing and pool-key building
    cost more CPU per request than the rest of the client."""

    def __init__(self, ca_file: str | None = None, *, maxsize: int = 32) -> None:
        self.ca_file = ca_file
        self._maxsize = maxsize
        self._pools: dict[tuple[str, tuple[str, str] | None], urllib3.HTTPConnectionPool] = {}
        self._lock = threading.Lock()

    def _pool(self, origin: str, cert: tuple[str, str] | None) -> urllib3.HTTPConnectionPool:
        pool = self._pools.get((origin, cert))
        if pool is None:
            with self._lock:
                pool = self._pools.get((origin, cert))
                if pool is None:
                    tls: dict[str, Any] = {}
                    if origin.startswith("https://"):
                        tls["cert_reqs"] = "CERT_REQUIRED"
                        ca_certs = self.ca_file or _default_ca_bundle()
                        if ca_certs:
                            tls["ca_certs"] = ca_certs
                        if cert is not None:
                            tls["cert_file"], tls["key_file"] = cert
                    pool = urllib3.connection_from_url(
                        origin, maxsize=self._maxsize, block=False, retries=False, **tls
                    )
                    self._pools[(origin, cert)] = pool
        return pool

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        body: Mapping[str, Any] | None,
        cert: tuple[str, str] | None,
        timeout: tuple[float, float],
    ) -> HttpReply | _Failure:
        scheme, _, rest = url.partition("://")
        netloc, _, path = rest.partition("/")
        fields = dict(headers)
        payload = None
        if body is not None:
            payload = json.dumps(dict(body)).encode("utf-8")
            fields["Content-Type"] = "application/json"
        try:
            reply = self._pool(f"{scheme}://{netloc}", cert).urlopen(
                method,
                "/" + path,
                body=payload,
                headers=fields,
                timeout=urllib3.Timeout(connect=timeout[0], read=timeout[1]),
                retries=False,
                redirect=False,
                assert_same_host=False,
            )
        except urllib3.exceptions.SSLError as exc:
            return _tls_failure(exc)
        except (urllib3.exceptions.TimeoutError, urllib3.exceptions.ProtocolError) as exc:
            # NewConnectionError (refused, unresolvable) is a TimeoutError subclass in urllib3 2.
            return _Failure(f"{_failure_kind(exc)}: {_short(exc)}")
        except urllib3.exceptions.HTTPError as exc:
            raise _request_error(url, exc) from None
        except OSError as exc:  # e.g. a client certificate or key that ssl cannot load
            return _Failure(f"{type(exc).__name__}: {_short(exc)}", retryable=False, tls=True)
        return HttpReply(reply.status, reply.headers, reply.data)

    def close(self) -> None:
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.close()


class RequestsTransport:
    """A caller's ``requests.Session`` (its adapters, headers and hooks apply), redirects not followed."""

    def __init__(self, session: Any, ca_file: str | None = None) -> None:
        self.session = session
        self.ca_file = ca_file

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        body: Mapping[str, Any] | None,
        cert: tuple[str, str] | None,
        timeout: tuple[float, float],
    ) -> HttpReply | _Failure:
        import requests  # only for a caller that brought a Session

        try:
            reply = self.session.request(
                method,
                url,
                headers=dict(headers),
                json=dict(body) if body is not None else None,
                cert=cert,
                timeout=timeout,
                verify=self.ca_file if self.ca_file else True,
                allow_redirects=False,
            )
        except requests.exceptions.SSLError as exc:
            return _tls_failure(exc)
        except (
            requests.ConnectionError,
            requests.Timeout,
            requests.exceptions.ChunkedEncodingError,
        ) as exc:
            return _Failure(f"{type(exc).__name__}: {_short(exc)}")
        except requests.RequestException as exc:
            raise _request_error(url, exc) from None
        except ValueError as exc:
            # requests parses a redirect's Location even when not following it, and urlsplit refuses
            # e.g. "http://[::1": the node answered, but with a redirect that leads nowhere.
            return _Failure(f"malformed redirect ({_short(exc)}), not followed")
        return HttpReply(reply.status_code, reply.headers, reply.content)

    def close(self) -> None:
        self.session.close()


def _tls_failure(exc: BaseException) -> _Failure:
    """A TLS error from either transport: a handshake that timed out may be retried elsewhere."""
    if "timed out" not in str(exc):
        # A certificate problem will not fix itself: no retry, and it is not "unavailable".
        return _Failure(_short(exc), retryable=False, tls=True)
    return _Failure(f"TLS handshake: {_short(exc)}")


def _request_error(url: str, exc: BaseException) -> KmsError:
    """A client-library error that is neither an answer nor a network failure (a bad URL, say)."""
    return KmsError(f"request to {_origin(url)} failed: {type(exc).__name__}: {_short(exc)}")


def _default_ca_bundle() -> str | None:
    """certifi's CA bundle, which requests trusted by default (an image may lack a system store)."""
    try:
        import certifi
    except ImportError:
        return None
    return certifi.where()


def _failure_kind(exc: BaseException) -> str:
    """A transport failure in requests' words (ConnectionError, ReadTimeout), as logs said before."""
    if isinstance(exc, urllib3.exceptions.ReadTimeoutError):
        return "ReadTimeout"
    if isinstance(exc, urllib3.exceptions.NewConnectionError):
        return "ConnectionError"
    if isinstance(exc, urllib3.exceptions.ConnectTimeoutError):
        return "ConnectTimeout"
    return "ConnectionError"


def _origin(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


# --------------------------------------------------------------------------------------- JSON
class JsonAgent:
    """Secrets held in memory: from the policy itself (``"kms": "none"``) or a separate JSON file.

    ``values`` maps a reference to either a value (str or bytes) or an object of fields
    (``{"occlum/1/image_key": {"key": "..."}}``, Vault's layout, so one policy's ``secrets`` map
    works against both backends). ``get(ref)`` first looks ``ref`` up as a whole; otherwise it
    splits ``path#field`` (field default ``key``).
    """

    def __init__(self, values: Mapping[str, Any], *, source: str = "inline") -> None:
        if not isinstance(values, Mapping):
            raise KmsConfigError(f"JSON secrets ({source}) must be an object")
        checked: dict[str, bytes | dict[str, bytes]] = {}
        for name, value in values.items():
            if not isinstance(name, str) or not name:
                raise KmsConfigError(f"JSON secrets ({source}): empty or non-string name")
            if isinstance(value, str | bytes):
                checked[name] = _to_bytes(value, f"JSON secrets ({source}): {name!r}", KmsConfigError)
            elif isinstance(value, Mapping):
                fields: dict[str, bytes] = {}
                for field, fv in value.items():
                    if not isinstance(field, str) or not isinstance(fv, str | bytes):
                        raise KmsConfigError(f"JSON secrets ({source}): {name!r}#{field!r} must be a string")
                    where = f"JSON secrets ({source}): {name!r}#{field!r}"
                    fields[field] = _to_bytes(fv, where, KmsConfigError)
                checked[name] = fields
            else:
                raise KmsConfigError(
                    f"JSON secrets ({source}): {name} must be a string or an object of strings, "
                    f"not {type(value).__name__}"
                )
        self._values = checked
        self.source = source

    def __repr__(self) -> str:
        return f"JsonAgent(source={self.source!r}, names={len(self._values)})"

    @classmethod
    def from_file(cls, path: str | Path) -> JsonAgent:
        try:
            values = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise KmsConfigError(f"cannot read JSON secrets file {path}: {exc.strerror}") from None
        except ValueError as exc:
            # json's message has line/column only, never the document text
            raise KmsConfigError(f"JSON secrets file {path} is not valid JSON: {exc}") from None
        except RecursionError:
            raise KmsConfigError(f"JSON secrets file {path} is not valid JSON: nested too deeply") from None
        return cls(values, source=str(path))

    def get(self, path: str) -> bytes:
        value = self._values.get(path)
        field = DEFAULT_FIELD
        if value is None:
            base, sep, f = path.partition("#")
            if sep:
                value, field = self._values.get(base), f or DEFAULT_FIELD
            else:
                base = path
            if value is None:
                raise KmsNotFound(f"no secret named {base!r} in JSON secrets ({self.source})")
            path = base
        if isinstance(value, bytes):
            if field != DEFAULT_FIELD:
                raise KmsNotFound(
                    f"{path} in JSON secrets ({self.source}) is a plain value, has no field {field!r}"
                )
            return value
        if field not in value:
            raise KmsNotFound(f"{path} in JSON secrets ({self.source}) has no field {field!r}")
        return value[field]


# --------------------------------------------------------------------------------------- factory
def agent_from_config(kms: str, **cfg: Any) -> KmsAgent:
    """Build an agent from policy-file settings: the one KMS factory (policy.py checks the file's
    fields, then calls this for each app).

    - ``"vault"`` / ``"openbao"``: ``addr`` (one URL, or several nodes as a list or a comma-separated
      string), ``token`` (or ``app_token``) or ``auth`` (a ``VaultLogin``), optional ``ca_file``,
      ``timeout``, ``connect_timeout``, ``retries``, ``backoff``, ``deadline``, ``kv_version``, ``session``,
      ``cache_ttl`` (seconds a value read is kept in memory; default 0: every ``get`` reads Vault).
    - ``"json"``: ``file`` (path of a JSON secrets file) or ``values`` (a mapping, with an optional
      ``source`` naming where it came from in error messages).
    - ``"none"``: ``values`` - the original's policy_no_kms.json with values inline.
    Unknown options are refused so that a typo is not silently ignored.
    """
    kind = (kms or "").strip().lower()
    if kind in ("vault", "openbao"):
        allowed = {
            "addr",
            "token",
            "app_token",
            "ca_file",
            "timeout",
            "connect_timeout",
            "retries",
            "backoff",
            "deadline",
            "kv_version",
            "session",
            "auth",
            "cache_ttl",
        }
        _refuse_unknown(kind, cfg, allowed)
        token = cfg.get("token", cfg.get("app_token"))
        if "addr" not in cfg or (token is None and cfg.get("auth") is None):
            raise KmsConfigError(f"kms {kind!r} needs 'addr' and a token or a login (auth)")
        options = {k: v for k, v in cfg.items() if k not in ("addr", "token", "app_token")}
        return VaultAgent(cfg["addr"], token, **options)
    if kind in ("json", "none"):
        _refuse_unknown(kind, cfg, {"file", "values", "source"})
        if ("file" in cfg) == ("values" in cfg) or ("file" in cfg and "source" in cfg):
            raise KmsConfigError(f"kms {kind!r} needs exactly one of 'file' or 'values' (and 'source')")
        if "file" in cfg:
            return JsonAgent.from_file(cfg["file"])
        return JsonAgent(cfg["values"], source=str(cfg.get("source", "inline")))
    raise KmsConfigError(f"unknown kms {kms!r} (expected vault, openbao, json or none)")


def _refuse_unknown(kind: str, cfg: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise KmsConfigError(f"kms {kind!r}: unknown option(s) {', '.join(unknown)}")
