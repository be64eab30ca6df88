"""ASPS server: attests enclaves and hands each exactly the secrets its policy grants.

One GetSecrets request goes through these steps, each a plain function below so it can be
tested without gRPC:

    check_sizes -> check_token -> check_signature -> verify_evidence -> sealing_suite
        -> decide (policy) -> fetch (KMS) -> seal (HPKE to the evidence key)

Every refusal is a `Refusal` carrying its kind, step and reason; `STATUS_OF` is the single table
that turns a kind into a gRPC status, and `classify` the single place that turns another module's
exception into a kind. One JSON audit line is written per decision, never with a secret value.
"""

from __future__ import annotations

import argparse
import datetime
import enum
import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import signal
import struct
import sys
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, hpke, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import asps_pb2
import asps_pb2_grpc
import dcap
import kms
import policy as policy_mod
import ratls
import secretmanager_pb2
import secretmanager_pb2_grpc

log = logging.getLogger("asps")
audit_log = logging.getLogger("asps.audit")

# --- protocol constants (README "Protocol"; asps_client.py repeats them, it cannot import us) ---
TRANSCRIPT_LABEL = b"asps/v1 get-secrets"
SEAL_INFO_LABEL = b"asps/v1 sealed-secrets"
TOKEN_LABEL = b"asps/v1 token"
TOKEN_VERSION = 1
NONCE_BYTES = 16
TOKEN_MAC_BYTES = 32
TOKEN_BYTES = 1 + NONCE_BYTES + 8 + TOKEN_MAC_BYTES
SERVICE_NAME = "asps.v1.SecretProvision"
LEGACY_SERVICE_NAME = "secretmanager.SecretManger"


@dataclass(frozen=True)
class Limits:
    """Bounds on every request field, checked before anything is parsed."""

    evidence: int = 64 * 1024
    token: int = 128
    names: int = 64
    name: int = policy_mod.MAX_NAME_BYTES
    signature: int = 1024
    request: int = 256 * 1024  # whole message, enforced by gRPC
    reply: int = 4 * 1024 * 1024


# --- refusals: the one place where kinds become gRPC statuses ----------------------------------------


class Kind(enum.Enum):
    BAD_INPUT = "bad_input"  # malformed or oversized field
    UNAUTHENTICATED = "unauthenticated"  # evidence not genuine, bad signature, bad/expired/reused token
    DENIED = "denied"  # genuine, but the policy refuses it
    NOT_GRANTED = "not_granted"  # a requested name this enclave is not granted
    UNAVAILABLE = "unavailable"  # KMS or collateral source unreachable: retry later
    TOO_LARGE = "too_large"  # the reply would exceed its bound
    DISABLED = "disabled"  # legacy protocol not enabled
    CANNOT_CARRY = "cannot_carry"  # the legacy protocol cannot carry this (binary) secret


STATUS_OF: dict[Kind, grpc.StatusCode] = {
    Kind.BAD_INPUT: grpc.StatusCode.INVALID_ARGUMENT,
    Kind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Kind.DENIED: grpc.StatusCode.PERMISSION_DENIED,
    Kind.NOT_GRANTED: grpc.StatusCode.NOT_FOUND,
    Kind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Kind.TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Kind.DISABLED: grpc.StatusCode.UNIMPLEMENTED,
    Kind.CANNOT_CARRY: grpc.StatusCode.FAILED_PRECONDITION,
}


class Refusal(Exception):
    """A request refused at `step`; `reason` goes to the client, `detail` only to the audit log."""

    def __init__(self, kind: Kind, step: str, reason: str, detail: str | None = None) -> None:
        super().__init__(f"{step}: {reason}")
        self.kind = kind
        self.step = step
        self.reason = reason
        self.detail = detail

    @property
    def status(self) -> grpc.StatusCode:
        return STATUS_OF[self.kind]


def classify(exc: BaseException, step: str) -> Refusal:
    """Map an exception from dcap/ratls/kms/policy to a Refusal (the only such mapping)."""
    if isinstance(exc, Refusal):
        return exc
    if isinstance(exc, kms.KmsUnavailable):
        return Refusal(Kind.UNAVAILABLE, step, "the KMS is unreachable; retry later", str(exc))
    if isinstance(exc, kms.KmsDenied):
        return Refusal(Kind.DENIED, step, "the KMS refused this app's credentials", str(exc))
    if isinstance(exc, kms.KmsNotFound):
        return Refusal(Kind.NOT_GRANTED, step, "a granted secret is missing from the KMS", str(exc))
    if isinstance(exc, kms.KmsError):
        return Refusal(Kind.UNAVAILABLE, step, "the KMS failed; retry later", str(exc))
    if _caused_by(exc, dcap.CollateralUnavailable):
        return Refusal(Kind.UNAVAILABLE, step, "collateral source unreachable; retry later", str(exc))
    if isinstance(exc, ratls.EvidenceError | dcap.DcapError):
        return Refusal(Kind.UNAUTHENTICATED, step, f"evidence rejected: {exc}")
    if isinstance(exc, policy_mod.AmbiguousApp):
        return Refusal(Kind.DENIED, step, str(exc))
    raise exc


def _caused_by(exc: BaseException | None, cls: type[BaseException]) -> bool:
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, cls):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


# --- step: token --------------------------------------------------------------------------------------


class TokenBook:
    """Mints challenges and redeems each at most once on this replica.

    token = version(1) || nonce(16) || expires_at u64be(8) || HMAC-SHA256(key, label || the above).
    Any replica holding the same key accepts it; only the redeeming replica remembers the nonce,
    until it expires, in a bounded cache (full cache -> UNAVAILABLE, never a forgotten nonce).
    The first key mints; every key verifies (rotation window).
    """

    def __init__(
        self,
        keys: Sequence[bytes],
        *,
        ttl: int = 60,
        cache_size: int = 200_000,
        max_ttl: int = 3600,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not keys:
            raise ValueError("at least one token key is needed")
        self._keys = tuple(keys)
        self.ttl = ttl
        self.max_ttl = max(max_ttl, ttl)
        self._clock = clock
        self._used: OrderedDict[bytes, int] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def mint(self) -> tuple[bytes, int]:
        expires_at = int(self._clock()) + self.ttl
        body = bytes([TOKEN_VERSION]) + secrets.token_bytes(NONCE_BYTES) + struct.pack(">Q", expires_at)
        return body + self._mac(self._keys[0], body), expires_at

    @staticmethod
    def _mac(key: bytes, body: bytes) -> bytes:
        return hmac.new(key, TOKEN_LABEL + body, hashlib.sha256).digest()

    def redeem(self, token: bytes) -> None:
        """Accept the token once; Refusal(UNAUTHENTICATED) for forged, expired or reused tokens."""
        step = "token"
        if len(token) != TOKEN_BYTES or token[0] != TOKEN_VERSION:
            raise Refusal(Kind.UNAUTHENTICATED, step, "malformed token; call GetChallenge")
        body, mac = token[:-TOKEN_MAC_BYTES], token[-TOKEN_MAC_BYTES:]
        if not any(hmac.compare_digest(self._mac(k, body), mac) for k in self._keys):
            raise Refusal(Kind.UNAUTHENTICATED, step, "token was not issued by this service (unknown key)")
        nonce = body[1 : 1 + NONCE_BYTES]
        (expires_at,) = struct.unpack(">Q", body[1 + NONCE_BYTES :])
        now = int(self._clock())
        if now >= expires_at:
            raise Refusal(
                Kind.UNAUTHENTICATED, step, f"token expired {now - expires_at} s ago; call GetChallenge"
            )
        if expires_at > now + self.max_ttl:
            raise Refusal(Kind.UNAUTHENTICATED, step, "token lifetime exceeds this replica's maximum")
        with self._lock:
            self._forget_expired(now)
            if nonce in self._used:
                raise Refusal(Kind.UNAUTHENTICATED, step, "token already used; call GetChallenge again")
            if len(self._used) >= self._cache_size:
                raise Refusal(Kind.UNAVAILABLE, step, "too many outstanding challenges; retry shortly")
            self._used[nonce] = expires_at

    def _forget_expired(self, now: int) -> None:
        # Entries go in roughly in expiry order; sweep from the oldest.
        while self._used:
            _nonce, exp = next(iter(self._used.items()))
            if exp > now:
                break
            self._used.popitem(last=False)

    def __len__(self) -> int:
        return len(self._used)


def check_token(tokens: TokenBook, token: bytes) -> None:
    """The challenge is authentic (HMAC), fresh, and used for the first time on this replica."""
    tokens.redeem(token)


# --- step: sizes, evidence encoding, signature ---------------------------------------------------------


def check_sizes(
    evidence: bytes, token: bytes, names: Sequence[str], signature: bytes, limits: Limits
) -> None:
    step = "request"
    if not evidence:
        raise Refusal(Kind.BAD_INPUT, step, "field 'evidence' is empty")
    if len(evidence) > limits.evidence:
        raise Refusal(Kind.BAD_INPUT, step, f"field 'evidence' exceeds {limits.evidence} bytes")
    if not token:
        raise Refusal(Kind.BAD_INPUT, step, "field 'token' is empty; call GetChallenge first")
    if len(token) > limits.token:
        raise Refusal(Kind.BAD_INPUT, step, f"field 'token' exceeds {limits.token} bytes")
    if not signature:
        raise Refusal(Kind.BAD_INPUT, step, "field 'signature' is empty")
    if len(signature) > limits.signature:
        raise Refusal(Kind.BAD_INPUT, step, f"field 'signature' exceeds {limits.signature} bytes")
    if len(names) > limits.names:
        raise Refusal(Kind.BAD_INPUT, step, f"field 'names' has more than {limits.names} entries")
    for n in names:
        if not n or len(n.encode("utf-8")) > limits.name:
            raise Refusal(Kind.BAD_INPUT, step, f"each name must be 1..{limits.name} bytes of UTF-8")
    if len(set(names)) != len(names):
        raise Refusal(Kind.BAD_INPUT, step, "field 'names' repeats a name")


def evidence_der(evidence: bytes) -> bytes:
    """The certificate's DER (the transcript hashes DER even when PEM was sent)."""
    try:
        if evidence.lstrip().startswith(b"-----BEGIN"):
            cert = x509.load_pem_x509_certificate(evidence)
        else:
            cert = x509.load_der_x509_certificate(evidence)
        return cert.public_bytes(serialization.Encoding.DER)
    except (ValueError, x509.InvalidVersion):
        raise Refusal(Kind.BAD_INPUT, "evidence", "field 'evidence' is not an X.509 certificate") from None


def transcript(token: bytes, evidence: bytes, names: Sequence[str]) -> bytes:
    """The bytes the client signs (evidence in DER)."""
    out = [TRANSCRIPT_LABEL, struct.pack(">I", len(token)), token, hashlib.sha256(evidence).digest()]
    out.append(struct.pack(">I", len(names)))
    for name in names:
        raw = name.encode("utf-8")
        out += [struct.pack(">I", len(raw)), raw]
    return b"".join(out)


def check_signature(der: bytes, token: bytes, names: Sequence[str], signature: bytes) -> Any:
    """Proof that the caller holds the evidence key now; returns that public key."""
    step = "signature"
    try:
        public_key = x509.load_der_x509_certificate(der).public_key()
    except (ValueError, UnsupportedAlgorithm, x509.InvalidVersion):
        raise Refusal(Kind.BAD_INPUT, step, "evidence public key cannot be read") from None
    data = transcript(token, der, names)
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public_key, rsa.RSAPublicKey):
            pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
            public_key.verify(signature, data, pss, hashes.SHA256())
        else:
            raise Refusal(Kind.UNAUTHENTICATED, step, "evidence key type is not EC or RSA")
    except (InvalidSignature, ValueError):
        raise Refusal(Kind.UNAUTHENTICATED, step, "signature does not verify with the evidence key") from None
    return public_key


# --- step: evidence -----------------------------------------------------------------------------------


def verify_evidence(der: bytes, verifier: dcap.Verifier, now: int | None = None) -> ratls.Identity:
    """Quote genuine, collateral valid, report_data bound to the certificate's key."""
    try:
        return ratls.verify_evidence(der, verifier, now=now)
    except (ratls.EvidenceError, dcap.DcapError) as e:
        raise classify(e, "evidence") from None
    except Exception:
        # A parser bug must not turn hostile input into INTERNAL: refuse, and log it loudly.
        log.exception("unexpected error while verifying evidence (refused as not genuine)")
        raise Refusal(Kind.UNAUTHENTICATED, "evidence", "evidence could not be processed") from None


def sealing_suite(public_key: Any) -> hpke.Suite:
    """The HPKE suite for the evidence key; RSA keys cannot receive sealed secrets."""
    step = "sealing_key"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if isinstance(public_key.curve, ec.SECP256R1):
            return hpke.Suite(hpke.KEM.P256, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
        if isinstance(public_key.curve, ec.SECP384R1):
            return hpke.Suite(hpke.KEM.P384, hpke.KDF.HKDF_SHA384, hpke.AEAD.AES_256_GCM)
        raise Refusal(
            Kind.BAD_INPUT, step, f"EC curve {public_key.curve.name} is not supported; use P-256 or P-384"
        )
    if isinstance(public_key, rsa.RSAPublicKey):
        raise Refusal(
            Kind.BAD_INPUT,
            step,
            "RSA evidence keys cannot receive sealed secrets; make the RA-TLS certificate with an EC "
            "P-256 or P-384 key (RSA certificates only work with the legacy cczoo service)",
        )
    raise Refusal(Kind.BAD_INPUT, step, "evidence key type cannot receive sealed secrets")


# --- step: policy -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grant:
    app: policy_mod.AppPolicy
    names: tuple[str, ...]


def decide(
    policy: policy_mod.Policy, identity: ratls.Identity, names: Sequence[str], now: int | None = None
) -> Grant:
    """Which app this enclave is, whether its appraisal passes, and which names it gets."""
    step = "policy"
    try:
        app = policy.find_app(identity)
    except policy_mod.AmbiguousApp as e:
        raise classify(e, step) from None
    if app is None:
        raise Refusal(
            Kind.DENIED,
            step,
            f"unknown enclave: no app in the policy has mr_enclave {identity.mr_enclave.hex()} "
            f"(mr_signer {identity.mr_signer.hex()})",
        )
    decision = app.reference.appraise(identity, now=now, app=app.id)
    if not decision.accepted:
        raise Refusal(
            Kind.DENIED, step, f"app {app.id}: {decision.reason or 'refused by the reference values'}"
        )
    if not names:
        return Grant(app, app.names)
    for name in names:
        if name not in app.paths:
            raise Refusal(Kind.NOT_GRANTED, step, f"secret {name!r} is not granted to this enclave")
    return Grant(app, tuple(names))


# --- step: fetch and seal -----------------------------------------------------------------------------


def fetch(grant: Grant) -> dict[str, bytes]:
    try:
        return grant.app.fetch(grant.names)
    except kms.KmsError as e:
        raise classify(e, "kms") from None


def seal(suite: hpke.Suite, public_key: Any, values: dict[str, bytes], token: bytes) -> bytes:
    bundle = asps_pb2.SecretBundle(secrets=values).SerializeToString(deterministic=True)
    return suite.encrypt(bundle, public_key, info=SEAL_INFO_LABEL + token)


def open_sealed(suite: hpke.Suite, private_key: Any, sealed: bytes, token: bytes) -> dict[str, bytes]:
    """The client's inverse of `seal` (used by tests; asps_client.py has its own copy)."""
    bundle = asps_pb2.SecretBundle.FromString(
        suite.decrypt(sealed, private_key, info=SEAL_INFO_LABEL + token)
    )
    return dict(bundle.secrets)


# --- the pipeline, without gRPC -----------------------------------------------------------------------


class Provisioner:
    """Runs the steps for one request and writes its audit line. Thread-safe."""

    def __init__(
        self,
        policy: policy_mod.Policy,
        verifier: dcap.Verifier,
        tokens: TokenBook,
        *,
        limits: Limits | None = None,
        legacy: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.policy = policy  # replaced whole on reload; each request reads it once
        self.verifier = verifier
        self.tokens = tokens
        self.limits = limits or Limits()
        self.legacy = legacy
        self._clock = clock

    def get_challenge(self) -> tuple[bytes, int]:
        return self.tokens.mint()

    def get_secrets(
        self, evidence: bytes, token: bytes, names: Sequence[str], signature: bytes, *, peer: str = ""
    ) -> tuple[str, bytes]:
        rec = _AuditRecord("get_secrets", peer, list(names))
        try:
            check_sizes(evidence, token, names, signature, self.limits)
            check_token(self.tokens, token)
            der = evidence_der(evidence)
            public_key = check_signature(der, token, names, signature)
            now = int(self._clock())
            identity = verify_evidence(der, self.verifier, now)
            rec.identity(identity)
            suite = sealing_suite(public_key)
            policy = self.policy
            grant = decide(policy, identity, names, now)
            rec.app_id, rec.names = grant.app.id, list(grant.names)
            values = fetch(grant)
            sealed = seal(suite, public_key, values, token)
            if len(sealed) > self.limits.reply - 1024:
                raise Refusal(Kind.TOO_LARGE, "seal", "the granted secrets exceed the reply size limit")
        except Refusal as r:
            rec.refused(r)
            raise
        except Exception:
            rec.failed()
            raise
        rec.granted()
        return grant.app.id, sealed

    def get_secret_legacy(self, key: str, ctx: str, *, peer: str = "") -> str:
        """The cczoo protocol: one name, PEM certificate, value as text; replayable by design."""
        rec = _AuditRecord("legacy_get_secret", peer, [key])
        try:
            if not self.legacy:
                raise Refusal(
                    Kind.DISABLED,
                    "legacy",
                    "the legacy cczoo protocol is disabled on this server (it is replayable); use "
                    "asps.v1.SecretProvision or start the server with --legacy-cczoo",
                )
            if not key or len(key.encode("utf-8")) > self.limits.name:
                raise Refusal(Kind.BAD_INPUT, "request", f"field 'key' must be 1..{self.limits.name} bytes")
            if not ctx or len(ctx) > self.limits.evidence:
                raise Refusal(
                    Kind.BAD_INPUT, "request", f"field 'ctx' must be 1..{self.limits.evidence} bytes"
                )
            der = evidence_der(ctx.encode("utf-8", "surrogateescape"))
            now = int(self._clock())
            identity = verify_evidence(der, self.verifier, now)
            rec.identity(identity)
            grant = decide(self.policy, identity, [key], now)
            rec.app_id = grant.app.id
            value = fetch(grant)[key]
            try:
                text = value.decode("utf-8")
            except UnicodeDecodeError:
                raise Refusal(
                    Kind.CANNOT_CARRY,
                    "legacy",
                    f"secret {key!r} is binary; the legacy protocol only carries text (use asps.v1)",
                ) from None
        except Refusal as r:
            rec.refused(r)
            raise
        except Exception:
            rec.failed()
            raise
        rec.granted()
        return text


@dataclass
class _AuditRecord:
    event: str
    peer: str
    names: list[str]
    app_id: str | None = None
    mr_enclave: str | None = None
    mr_signer: str | None = None
    tcb_status: str | None = None
    start: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        # Request names are attacker-controlled: bound what reaches the log before they are checked.
        self.names = [n[:256] for n in self.names[:64]]

    def identity(self, ident: ratls.Identity) -> None:
        self.mr_enclave, self.mr_signer = ident.mr_enclave.hex(), ident.mr_signer.hex()
        self.tcb_status = ident.tcb_status

    def _emit(
        self, verdict: str, status: str, step: str | None, reason: str | None, detail: str | None
    ) -> None:
        line = {
            "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
            "event": self.event,
            "peer": self.peer,
            "mr_enclave": self.mr_enclave,
            "mr_signer": self.mr_signer,
            "tcb_status": self.tcb_status,
            "app_id": self.app_id,
            "names": self.names,
            "verdict": verdict,
            "status": status,
            "step": step,
            "reason": reason,
            "ms": round((time.monotonic() - self.start) * 1000, 1),
        }
        if detail:
            line["detail"] = detail
        audit_log.info(json.dumps(line, sort_keys=False), extra={"audit": line})

    def granted(self) -> None:
        self._emit("granted", "OK", None, None, None)

    def refused(self, r: Refusal) -> None:
        self._emit("refused", r.status.name, r.step, r.reason, r.detail)

    def failed(self) -> None:
        self._emit("refused", "INTERNAL", None, "internal error (see the server log)", None)


# --- gRPC glue ----------------------------------------------------------------------------------------


def _abort(context: grpc.ServicerContext, r: Refusal) -> None:
    context.abort(r.status, f"{r.step}: {r.reason}")


def _guarded(fn):
    """Refusal -> its status; anything else is a bug: log it (no values) and answer INTERNAL."""

    @functools.wraps(fn)
    def wrapper(self, request, context):
        try:
            return fn(self, request, context)
        except Refusal as r:
            _abort(context, r)
        except Exception:
            log.exception("internal error in %s", fn.__name__)
            context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")

    return wrapper


class SecretProvisionServicer(asps_pb2_grpc.SecretProvisionServicer):
    def __init__(self, provisioner: Provisioner) -> None:
        self.p = provisioner

    @_guarded
    def GetChallenge(self, request, context):
        token, expires_at = self.p.get_challenge()
        return asps_pb2.Challenge(token=token, expires_at=expires_at)

    @_guarded
    def GetSecrets(self, request, context):
        app_id, sealed = self.p.get_secrets(
            request.evidence, request.token, list(request.names), request.signature, peer=context.peer()
        )
        return asps_pb2.SecretsReply(app_id=app_id, sealed=sealed)


class LegacyServicer(secretmanager_pb2_grpc.SecretMangerServicer):
    def __init__(self, provisioner: Provisioner) -> None:
        self.p = provisioner

    @_guarded
    def GetSecret(self, request, context):
        value = self.p.get_secret_legacy(request.key, request.ctx, peer=context.peer())
        return secretmanager_pb2.SecretReply(value=value)


# --- configuration and lifecycle ----------------------------------------------------------------------


@dataclass(frozen=True)
class ServerConfig:
    host: str = "localhost:50051"
    cert: str | None = None
    key: str | None = None
    policy: str = "policy_vault.json"
    collateral: str | None = None
    pccs: str | None = None
    root_ca: str | None = None
    token_keys: tuple[bytes, ...] = ()  # empty: a random key for this process
    token_ttl: int = 60
    legacy_cczoo: bool = False
    reflection: bool = False
    threads: int = 16  # request threads of this process
    grace: float = 10.0
    limits: Limits = field(default_factory=Limits)


class StartupError(Exception):
    """The server cannot start with this configuration; the message says what to fix."""


@dataclass
class ServerHandle:
    """A running server: its bound port, and the operations signals trigger."""

    server: grpc.Server
    provisioner: Provisioner
    health: health.HealthServicer
    config: ServerConfig
    port: int
    _stopped: threading.Event = field(default_factory=threading.Event)

    @property
    def address(self) -> str:
        host = self.config.host.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    def reload_policy(self) -> bool:
        """Re-read the policy file; on any error keep the current one and log why."""
        old = self.provisioner.policy
        try:
            new = policy_mod.load_policy(self.config.policy)
        except Exception as e:  # a broken file must never take the service down
            log.error("policy reload failed, keeping policy sha256 %s: %s", old.digest[:16], e)
            return False
        for w in new.warnings:
            log.warning("%s", w)
        self.provisioner.policy = new
        log.info("policy reloaded from %s: sha256 %s, %d app(s)", new.source, new.digest[:16], len(new.apps))
        # Requests already holding the old policy may still use its agents for a while.
        closer = threading.Timer(RETIRED_AGENT_GRACE, _close_agents, args=(old,))
        closer.daemon = True
        closer.start()
        return True

    def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let in-flight ones finish within `grace` seconds."""
        for service in ("", SERVICE_NAME, LEGACY_SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.server.stop(self.config.grace if grace is None else grace).wait()
        self._stopped.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)


RETIRED_AGENT_GRACE = 60.0


def _close_agents(pol: policy_mod.Policy) -> None:
    """Release the connection pools of a policy that is no longer in force."""
    for app in pol.apps:
        close = getattr(app.agent, "close", None)
        if callable(close):
            try:
                close()
            except Exception:  # closing is best effort
                log.debug("closing a retired KMS agent failed", exc_info=True)


def load_token_keys(key_file: str | None, env_value: str | None) -> tuple[bytes, ...]:
    """Token keys from a file (one per line, first one mints) or ASPS_TOKEN_KEY (comma-separated)."""
    lines: list[str] = []
    if key_file:
        path = Path(key_file)
        try:
            text = path.read_text()
        except OSError as e:
            raise StartupError(f"--token-key-file {key_file}: {e.strerror or e}") from None
        if path.stat().st_mode & 0o077:
            log.warning("token key file %s is readable by group/others; chmod 600 it", key_file)
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        if not lines:
            raise StartupError(f"--token-key-file {key_file}: no key in the file")
    elif env_value:
        lines = [p.strip() for p in env_value.split(",") if p.strip()]
    keys = tuple(ln.encode("utf-8") for ln in lines)
    for k in keys:
        if len(k) < 16:
            raise StartupError("each token key must be at least 16 bytes (try: openssl rand -hex 32)")
    return keys


def pccs_url(value: str | None) -> str | None:
    """A PCCS URL; a bare host or IP (the original's pccs_service_ip) means https://HOST:8081."""
    if not value or "://" in value:
        return value
    host = value.strip().rstrip("/")
    try:
        has_port = urllib.parse.urlsplit("//" + host).port is not None
    except ValueError:
        raise StartupError(f"--pccs {value!r} is neither a URL nor HOST[:PORT]") from None
    return f"https://{host}" if has_port else f"https://{host}:8081"


def build_verifier(config: ServerConfig) -> dcap.Verifier:
    try:
        root = dcap.load_root_ca(config.root_ca)
    except dcap.DcapError as e:
        raise StartupError(f"--root-ca: {e}") from None
    if not dcap.is_intel_root(root):
        log.warning(
            "!!! TRUSTED ROOT IS NOT INTEL'S: %s — quotes from a simulated or test platform will be "
            "accepted as genuine. Never run like this in production. !!!",
            config.root_ca,
        )
    try:
        source = dcap.open_collateral_source(config.collateral, pccs_url(config.pccs))
    except dcap.DcapError as e:
        raise StartupError(f"collateral: {e}") from None
    return dcap.Verifier(source, root_ca=root)


def serve(config: ServerConfig) -> ServerHandle:
    """Start the server (non-blocking); raises StartupError with what to fix."""
    if not 1 <= config.token_ttl <= 3600:
        raise StartupError("--token-ttl must be 1..3600 seconds")
    if config.threads < 1 or config.grace < 0:
        raise StartupError("--threads must be at least 1 and --grace not negative")
    if not config.cert or not config.key:
        raise StartupError("TLS is required: give --cert and --key (./run.sh gen-certs makes demo ones)")
    try:
        cert_pem, key_pem = Path(config.cert).read_bytes(), Path(config.key).read_bytes()
    except OSError as e:
        raise StartupError(f"TLS files: {e.filename}: {e.strerror}") from None
    try:
        pol = policy_mod.load_policy(config.policy)
    except policy_mod.PolicyError as e:
        raise StartupError(f"policy: {e}") from None
    for w in pol.warnings:
        log.warning("%s", w)
    verifier = build_verifier(config)
    keys = config.token_keys
    if not keys:
        keys = (secrets.token_bytes(32),)
        log.info(
            "no token key given (--token-key-file / ASPS_TOKEN_KEY): using a random one; "
            "replicas will not accept each other's challenges"
        )
    tokens = TokenBook(keys, ttl=config.token_ttl)
    provisioner = Provisioner(pol, verifier, tokens, limits=config.limits, legacy=config.legacy_cczoo)

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.threads, thread_name_prefix="asps"),
        options=[
            ("grpc.max_receive_message_length", config.limits.request),
            ("grpc.max_send_message_length", config.limits.reply),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=max(64, config.threads * 16),
    )
    asps_pb2_grpc.add_SecretProvisionServicer_to_server(SecretProvisionServicer(provisioner), server)
    # Always registered so that a disabled legacy call gets a clear reason instead of "unknown method".
    secretmanager_pb2_grpc.add_SecretMangerServicer_to_server(LegacyServicer(provisioner), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [SERVICE_NAME, health.SERVICE_NAME]
    if config.legacy_cczoo:
        names.append(LEGACY_SERVICE_NAME)
        log.warning(
            "--legacy-cczoo: also serving %s/GetSecret. That protocol is REPLAYABLE: anyone who "
            "captures one enclave's certificate can fetch its secrets again. Turn it off once clients "
            "have moved to asps.v1.",
            LEGACY_SERVICE_NAME,
        )
    if config.reflection:
        from grpc_reflection.v1alpha import reflection

        names.append(reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
    creds = grpc.ssl_server_credentials([(key_pem, cert_pem)])
    try:
        port = server.add_secure_port(config.host, creds)
    except RuntimeError as e:
        raise StartupError(f"cannot listen on {config.host}: {e}") from None
    if not port:
        raise StartupError(f"cannot listen on {config.host}")
    server.start()
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set(
        LEGACY_SERVICE_NAME,
        health_pb2.HealthCheckResponse.SERVING
        if config.legacy_cczoo
        else health_pb2.HealthCheckResponse.NOT_SERVING,
    )
    log.info(
        "listening on %s (TLS), policy %s sha256 %s with %d app(s), kms %s, token lifetime %d s",
        config.host.rsplit(":", 1)[0] + f":{port}",
        pol.source,
        pol.digest[:16],
        len(pol.apps),
        pol.kms,
        config.token_ttl,
    )
    return ServerHandle(server, provisioner, health_servicer, config, port)


# --- logging ------------------------------------------------------------------------------------------


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        audit = getattr(record, "audit", None)
        if audit is not None:
            return json.dumps(audit)
        out = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


class _TextFormatter(logging.Formatter):
    """Human lines; audit records stay pure JSON lines so they can be shipped as they are."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        audit = getattr(record, "audit", None)
        if audit is not None:
            return json.dumps(audit)
        return super().format(record)


def setup_logging(fmt: str = "text", audit_file: str | None = None, level: int = logging.INFO) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    if audit_file:
        fh = logging.FileHandler(audit_file)
        fh.setFormatter(_JsonFormatter())
        audit_log.addHandler(fh)  # in addition to stderr


# --- demo certificates (./run.sh gen-certs) --------------------------------------------------------------


def generate_demo_certs(directory: str | Path, hostnames: Sequence[str] = ("localhost", "127.0.0.1")) -> Path:
    """A demo CA (ca.crt) and a server certificate (server.crt/server.key) for `hostnames`."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    pem = serialization.Encoding.PEM

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("ASPS demo CA"))
        .issuer_name(name("ASPS demo CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    sans: list[x509.GeneralName] = []
    for h in hostnames:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name(hostnames[0]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    nocrypt = serialization.NoEncryption()
    for fname, data, mode in (
        ("ca.key", ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, nocrypt), 0o600),
        ("server.key", key.private_bytes(pem, serialization.PrivateFormat.PKCS8, nocrypt), 0o600),
        ("ca.crt", ca.public_bytes(pem), 0o644),
        ("server.crt", cert.public_bytes(pem), 0o644),
    ):
        p = d / fname
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(p, mode)
    return d


# --- command line -------------------------------------------------------------------------------------

HELP = """\
Attestation and Secret Provision Service (ASPS) server.

Enclaves call GetChallenge, then GetSecrets with their RA-TLS certificate and a signature over
the challenge; the server verifies the SGX quote (DCAP), finds the enclave's app in the policy,
reads the granted secrets from the app's KMS and returns them sealed (HPKE) to the enclave's key.

Every option can also be set through the environment variable in brackets; options win.
"""

EPILOG = """\
signals:
  SIGHUP   re-read the policy file; a broken file keeps the current policy (the log says why)
  SIGTERM  stop accepting calls, let in-flight calls finish (--grace seconds), exit 0

examples:
  asps_server.py --cert certs/server.crt --key certs/server.key --policy policy_vault.json \\
      --pccs https://pccs.example:8081
  asps_server.py ... --collateral sim/collateral.json --root-ca sim/root_ca.pem   (demo platform)
  asps_server.py gen-certs DIR [HOST...]    demo CA + server certificate for HOSTs (default localhost)
"""


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name, default)


def _env_flag(name: str) -> bool:
    return (os.environ.get(name) or "").lower() in ("1", "true", "yes", "on")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="asps_server.py",
        description=HELP,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--host",
        "-host",
        default=_env("ASPS_HOST", "localhost:50051"),
        help="address to listen on, HOST:PORT [ASPS_HOST] (default %(default)s)",
    )
    p.add_argument(
        "--cert",
        "-cert",
        default=_env("ASPS_CERT", "server.crt"),
        help="TLS certificate chain, PEM [ASPS_CERT]",
    )
    p.add_argument(
        "--key", "-key", default=_env("ASPS_KEY", "server.key"), help="TLS private key, PEM [ASPS_KEY]"
    )
    p.add_argument(
        "-p",
        "--policy",
        default=_env("ASPS_POLICY", "policy_vault.json"),
        help="policy file: which enclave gets which secrets, from which KMS [ASPS_POLICY] "
        "(default %(default)s)",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--collateral",
        default=_env("ASPS_COLLATERAL"),
        help="collateral bundle file (JSON) [ASPS_COLLATERAL]",
    )
    src.add_argument(
        "--pccs",
        default=_env("ASPS_PCCS"),
        help="PCCS or Intel PCS base URL to fetch collateral from (the original's pccs_service_ip) "
        "[ASPS_PCCS]",
    )
    p.add_argument(
        "--root-ca",
        default=_env("ASPS_ROOT_CA"),
        help="trusted root for quotes, PEM or DER [ASPS_ROOT_CA]; default the shipped Intel SGX Root CA. "
        "Anything else (a simulated platform's root) is logged as a loud warning",
    )
    p.add_argument(
        "--token-key-file",
        default=_env("ASPS_TOKEN_KEY_FILE"),
        help="file with the challenge HMAC key(s), one per line, first one signs [ASPS_TOKEN_KEY_FILE]. "
        "Or put the key in ASPS_TOKEN_KEY (never on the command line). Replicas sharing a key accept "
        "each other's challenges; without one a random per-process key is used",
    )
    p.add_argument(
        "--token-ttl",
        type=int,
        default=_env("ASPS_TOKEN_TTL", "60"),
        help="challenge lifetime in seconds [ASPS_TOKEN_TTL] (default %(default)s)",
    )
    p.add_argument(
        "--legacy-cczoo",
        action="store_true",
        default=_env_flag("ASPS_LEGACY_CCZOO"),
        help="also serve the original secretmanager.SecretManger/GetSecret protocol for existing "
        "confidential-computing-zoo clients [ASPS_LEGACY_CCZOO=1]. It is replayable: off by default",
    )
    p.add_argument(
        "--reflection",
        action="store_true",
        default=_env_flag("ASPS_REFLECTION"),
        help="enable gRPC server reflection [ASPS_REFLECTION=1]",
    )
    p.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=_env("ASPS_LOG_FORMAT", "text"),
        help="operational log format on stderr [ASPS_LOG_FORMAT]; audit lines are JSON either way",
    )
    p.add_argument(
        "--audit-log",
        default=_env("ASPS_AUDIT_LOG"),
        help="also write audit lines to this file [ASPS_AUDIT_LOG]",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=_env("ASPS_THREADS", "16"),
        help="request threads [ASPS_THREADS] (default %(default)s)",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=_env("ASPS_GRACE", "10"),
        help="seconds in-flight calls get to finish on SIGTERM [ASPS_GRACE] (default %(default)s)",
    )
    return p


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        host=args.host,
        cert=args.cert,
        key=args.key,
        policy=args.policy,
        collateral=args.collateral,
        pccs=args.pccs,
        root_ca=args.root_ca,
        token_keys=load_token_keys(args.token_key_file, os.environ.get("ASPS_TOKEN_KEY")),
        token_ttl=args.token_ttl,
        legacy_cczoo=args.legacy_cczoo,
        reflection=args.reflection,
        threads=args.threads,
        grace=args.grace,
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["gen-certs"]:
        if len(argv) < 2:
            print("usage: asps_server.py gen-certs DIR [HOST...]", file=sys.stderr)
            return 2
        d = generate_demo_certs(argv[1], argv[2:] or ("localhost", "127.0.0.1"))
        print(f"wrote {d}/ca.crt, {d}/server.crt, {d}/server.key (demo CA: {d}/ca.key)")
        return 0
    args = build_parser().parse_args(argv)
    setup_logging(args.log_format, args.audit_log)

    # Handlers first: a SIGHUP or SIGTERM during startup is queued, not fatal.
    events: list[int] = []
    wake = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        events.append(signum)
        wake.set()

    for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    try:
        config = config_from_args(args)
        handle = serve(config)
    except StartupError as e:
        log.error("cannot start: %s", e)
        return 2
    print(f"Server listening on {handle.address}", flush=True)
    while True:
        wake.wait(1.0)
        wake.clear()
        while events:
            signum = events.pop(0)
            if signum == signal.SIGHUP:
                handle.reload_policy()
            else:
                log.info(
                    "%s: draining (up to %.0f s) and stopping", signal.Signals(signum).name, config.grace
                )
                handle.stop()
                log.info("stopped")
                return 0


if __name__ == "__main__":
    sys.exit(main())
