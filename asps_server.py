"""ASPS server: attests enclaves and hands each exactly the secrets its policy grants.

One GetSecrets request goes through these steps, each a plain function below so it can be
tested without gRPC:

    check_sizes -> check_token -> sealing_suite (key type) -> check_signature -> verify_evidence
        -> decide (policy) -> token recorded as used -> fetch (KMS) -> seal (HPKE to the evidence key)

Every refusal is a `Refusal` carrying its kind, step and reason; `STATUS_OF` is the single table
that turns a kind into a gRPC status, and `classify` the single place that turns another module's
exception into a kind. One JSON audit line is written per decision (ops.AuditRecord), never with a
secret value; metrics, health and the collateral watch are ops.py's too.

Who may import it: nothing in the project (it is the tenant side's entry point); tests and benchmarks.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import dataclasses
import datetime
import enum
import functools
import hashlib
import hmac
import inspect
import ipaddress
import json
import logging
import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, hpke, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import asps_pb2
import asps_pb2_grpc
import asps_wire
import cli_env
import dcap
import kms
import ops
import pccs
import policy as policy_mod
import ratls
import secretmanager_pb2
import secretmanager_pb2_grpc
from asps_wire import seal, transcript  # pipeline steps, as README lists them

log = logging.getLogger("asps")
audit_log = logging.getLogger("asps.audit")

# --- protocol constants (README "Protocol"; transcript, suite, seal and open are asps_wire's) ---
TOKEN_LABEL = b"asps/v1 token"
TOKEN_VERSION = 1
NONCE_BYTES = 16
TOKEN_MAC_BYTES = 32
TOKEN_BYTES = 1 + NONCE_BYTES + 8 + TOKEN_MAC_BYTES
SERVICE_NAME = "asps.v1.SecretProvision"
LEGACY_SERVICE_NAME = "secretmanager.SecretManger"
REPLICA_METADATA = "asps-replica"  # trailing metadata of every reply: which replica answered


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
    CONFIG = "config"  # the server's own configuration is wrong (policy, KMS login files): not retryable


STATUS_OF: dict[Kind, grpc.StatusCode] = {
    Kind.BAD_INPUT: grpc.StatusCode.INVALID_ARGUMENT,
    Kind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Kind.DENIED: grpc.StatusCode.PERMISSION_DENIED,
    Kind.NOT_GRANTED: grpc.StatusCode.NOT_FOUND,
    Kind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Kind.TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Kind.DISABLED: grpc.StatusCode.UNIMPLEMENTED,
    Kind.CANNOT_CARRY: grpc.StatusCode.FAILED_PRECONDITION,
    Kind.CONFIG: grpc.StatusCode.FAILED_PRECONDITION,
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


# VerificationError checks that fail on the server's own collateral (TCB info, QE identity, CRLs, their
# signing chains, the trusted root), not on anything the enclave sent: the client cannot fix these,
# the operator must refresh the collateral, so they are UNAVAILABLE (retry later), not UNAUTHENTICATED.
_COLLATERAL_PIECES = (
    "tcb_info",
    "qe_identity",
    "root_ca_crl",
    "pck_crl",
    "tcb_info_chain",
    "qe_identity_chain",
    "pck_crl_chain",
    "root_ca",
)
COLLATERAL_CHECKS: frozenset[str] = frozenset(
    {f"{piece}_{when}" for piece in _COLLATERAL_PIECES for when in ("expired", "not_yet_valid")}
    | {
        "tcb_info_signature",
        "tcb_info_chain",
        "qe_identity_signature",
        "qe_identity_chain",
        "root_ca_crl",
        "pck_crl",
        "pck_crl_chain",
        "root_ca",
    }
)


def _collateral_problem(exc: BaseException | None) -> BaseException | None:
    """The error in `exc`'s chain saying that the server's collateral, not the evidence, is at fault."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, dcap.CollateralError):
            return exc
        if isinstance(exc, dcap.VerificationError):
            return exc if exc.check in COLLATERAL_CHECKS else None
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


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
    if isinstance(exc, kms.KmsConfigError):
        return Refusal(
            Kind.CONFIG,
            step,
            "the server's KMS configuration for this app is wrong (policy or credential files); "
            "retrying will not help until the operator fixes it",
            str(exc),
        )
    if isinstance(exc, kms.KmsError):
        return Refusal(Kind.UNAVAILABLE, step, "the KMS failed; retry later", str(exc))
    if _caused_by(exc, dcap.CollateralUnavailable):
        return Refusal(Kind.UNAVAILABLE, step, "collateral source unreachable; retry later", str(exc))
    problem = _collateral_problem(exc)
    if problem is not None:
        return Refusal(
            Kind.UNAVAILABLE, step, f"the server's collateral is not usable: {problem}; retry later", str(exc)
        )
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
        self.record(self.check(token))

    def check(self, token: bytes) -> tuple[bytes, int]:
        """Authentic (HMAC), fresh and not used yet: the cheap refusals, before any other work.
        Records nothing (a request that fails later must not fill the replay cache); returns the
        (nonce, expires_at) to `record` once the caller has proven who it is."""
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
        return nonce, expires_at

    def record(self, ticket: tuple[bytes, int]) -> None:
        """Mark the nonce used: insert-if-absent under the lock, so of two requests carrying the same
        token only one gets past here."""
        nonce, expires_at = ticket
        step = "token"
        with self._lock:
            self._forget_expired(int(self._clock()))
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


def check_token(tokens: TokenBook, token: bytes) -> tuple[bytes, int]:
    """The challenge is authentic (HMAC), fresh, and not used yet on this replica; the caller records
    it (`TokenBook.record`) only once the policy grants the request."""
    return tokens.check(token)


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


def evidence_public_key(der: bytes) -> Any:
    """The certificate's public key, read without checking anything else."""
    try:
        return x509.load_der_x509_certificate(der).public_key()
    except (ValueError, UnsupportedAlgorithm, x509.InvalidVersion):
        raise Refusal(Kind.BAD_INPUT, "signature", "evidence public key cannot be read") from None


def check_signature(
    der: bytes,
    token: bytes,
    names: Sequence[str],
    signature: bytes,
    public_key: Any = None,
    *,
    der_digest: bytes | None = None,
) -> Any:
    """Proof that the caller holds the evidence key now; returns that public key (read from `der`
    unless given). With `der_digest` (the evidence cache keeps no DER) `der` is not read."""
    step = "signature"
    if public_key is None:
        public_key = evidence_public_key(der)
    data = transcript(token, der, names, evidence_digest=der_digest)
    try:
        asps_wire.verify_transcript_signature(public_key, signature, data)
    except asps_wire.UnsupportedKey as e:
        raise Refusal(Kind.UNAUTHENTICATED, step, str(e)) from None
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


class EvidenceCache:
    """Identities of evidence verified before, keyed by SHA-256 of the evidence bytes as sent (the DER
    for DER evidence), so an enclave that asks again skips quote and certificate verification.

    Only what `verify_evidence` proved is kept (the Identity, without the certificate: the SHA-256
    of its DER is all the signature check needs), and only once the policy accepted it, so that
    refused evidence cannot fill the cache; the token, the signature by the
    evidence key, the appraisal (with its time checks) and the policy decision run on every request.
    An entry is used only until min(collateral expiry, certificate notAfter), only under the policy
    object it was stored under (a reload makes every entry stale), and, with a collateral file, only
    while the file still holds the bundle it was verified with. Bounded LRU; size 0 turns it off.
    """

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._entries: OrderedDict[bytes, tuple[ratls.Identity, bytes, int, Any, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, digest: bytes, now: int, policy: Any, verifier: Any) -> tuple[ratls.Identity, bytes] | None:
        """(identity without its DER, SHA-256 of the DER) of evidence verified and accepted before."""
        if self.size <= 0:
            return None
        with self._lock:
            entry = self._entries.get(digest)
            if entry is not None:
                identity, der_digest, expires, pol, version = entry
                if now < expires and pol is policy and version is _collateral_version(verifier):
                    self._entries.move_to_end(digest)
                    self.hits += 1
                    return identity, der_digest
                del self._entries[digest]
            self.misses += 1
            return None

    def version(self, verifier: Any) -> Any:
        """Taken before verifying, stored with the entry: a file changed meanwhile makes it stale."""
        return _collateral_version(verifier) if self.size > 0 else None

    def put(self, digest: bytes, identity: ratls.Identity, policy: Any, version: Any) -> None:
        """Remember evidence the policy accepted (call only after `decide`)."""
        if self.size <= 0:
            return
        expires = min(identity.collateral_expiry, identity.not_after + 1)
        der_digest = hashlib.sha256(identity.cert_der).digest()
        slim = dataclasses.replace(identity, cert_der=b"")  # up to 64 KiB that no later check needs
        with self._lock:
            self._entries[digest] = (slim, der_digest, expires, policy, version)
            self._entries.move_to_end(digest)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


_UNREADABLE = object()


def _collateral_version(verifier: Any) -> Any:
    """The bundle a collateral file holds now (a new object when the file changes), else None: a PCCS
    source only changes its collateral at nextUpdate, which the entry's expiry already covers."""
    source = getattr(verifier, "source", None)
    source = getattr(source, "source", source)  # ops.CollateralWatch wraps the real source
    if not isinstance(source, pccs.FileCollateralSource):
        return None
    try:
        return source.get()
    except dcap.DcapError:
        return _UNREADABLE  # never equal to a stored version: verify again, and fail there


def sealing_suite(public_key: Any) -> hpke.Suite:
    """The HPKE suite for the evidence key; RSA keys cannot receive sealed secrets."""
    step = "sealing_key"
    with contextlib.suppress(asps_wire.UnsupportedKey):
        return asps_wire.hpke_suite(public_key)
    if isinstance(public_key, ec.EllipticCurvePublicKey):
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
        raise Refusal(Kind.DENIED, step, _unknown(identity))
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


def _unknown(identity: ratls.Identity) -> str:
    """Why no app matched, naming what the tenant would pin (a TD's mr_td, an enclave's mr_enclave)."""
    if getattr(identity, "tee", "sgx") == "tdx":
        return f"unknown TD: no TD app in the policy has mr_td {identity.mr_td.hex()} (and its pinned fields)"
    return (f"unknown enclave: no app in the policy has mr_enclave {identity.mr_enclave.hex()} "
            f"(mr_signer {identity.mr_signer.hex()})")


# --- step: fetch and seal -----------------------------------------------------------------------------


def fetch(grant: Grant, metrics: ops.NullMetrics | None = None) -> dict[str, bytes]:
    start = time.monotonic()
    try:
        values = grant.app.fetch(grant.names)
    except kms.KmsError as e:
        if metrics is not None:
            metrics.kms(ops.kms_result(e), time.monotonic() - start)
        raise classify(e, "kms") from None
    if metrics is not None:
        metrics.kms("ok", time.monotonic() - start)
    return values


# --- the pipeline, without gRPC -----------------------------------------------------------------------


@contextlib.contextmanager
def _audited(rec: ops.AuditRecord) -> Iterator[ops.AuditRecord]:
    """Writes `rec`'s one audit line as the block ends: granted, refused (a Refusal) or failed."""
    try:
        yield rec
    except Refusal as r:
        rec.refused(r)
        raise
    except Exception:
        rec.failed()
        raise
    rec.granted()


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
        metrics: ops.NullMetrics | None = None,
        evidence_cache: EvidenceCache | None = None,
    ) -> None:
        self.metrics = metrics or ops.NullMetrics()
        self.evidence = EvidenceCache() if evidence_cache is None else evidence_cache
        self.policy = policy  # replaced whole on reload; each request reads it once
        self.verifier = verifier
        self.tokens = tokens
        self.limits = limits or Limits()
        self.legacy = legacy
        self._clock = clock
        self.replica_id = ""  # this process's name in the fleet, sent as asps-replica; set by serve()

    def get_challenge(self) -> tuple[bytes, int]:
        return self.tokens.mint()

    def get_secrets(
        self, evidence: bytes, token: bytes, names: Sequence[str], signature: bytes, *, peer: str = ""
    ) -> tuple[str, bytes]:
        with _audited(ops.AuditRecord("get_secrets", peer, list(names), metrics=self.metrics)) as rec:
            check_sizes(evidence, token, names, signature, self.limits)
            ticket = check_token(self.tokens, token)
            now = int(self._clock())
            policy = self.policy
            digest = hashlib.sha256(evidence).digest()
            cached = self.evidence.get(digest, now, policy, self.verifier)
            version: Any = None
            if cached is None:
                der = evidence_der(evidence)
                public_key = evidence_public_key(der)
                # Key type first: an RSA key is refused anyway, before any costly RSA operation.
                suite = sealing_suite(public_key)
                check_signature(der, token, names, signature, public_key)
                version = self.evidence.version(self.verifier)
                identity = verify_evidence(der, self.verifier, now)
            else:  # verified before; possession of the key is still proven on every request
                identity, der_digest = cached
                public_key = identity.public_key
                suite = sealing_suite(public_key)
                check_signature(b"", token, names, signature, public_key, der_digest=der_digest)
            rec.identity(identity)
            grant = decide(policy, identity, names, now)
            # Granted: only now does the token count as used (insert-if-absent), so neither garbage
            # nor a genuine enclave the policy refuses can hold a slot of the replay cache.
            self.tokens.record(ticket)
            if cached is None:
                self.evidence.put(digest, identity, policy, version)
            rec.app_id, rec.names = grant.app.id, list(grant.names)
            values = fetch(grant, self.metrics)
            sealed = seal(suite, public_key, values, token)
            if len(sealed) > self.limits.reply - 1024:
                raise Refusal(Kind.TOO_LARGE, "seal", "the granted secrets exceed the reply size limit")
        return grant.app.id, sealed

    def get_secret_legacy(self, key: str, ctx: str, *, peer: str = "") -> str:
        """The cczoo protocol: one name, PEM certificate, value as text; replayable by design."""
        with _audited(ops.AuditRecord("legacy_get_secret", peer, [key], metrics=self.metrics)) as rec:
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
            value = fetch(grant, self.metrics)[key]
            try:
                text = value.decode("utf-8")
            except UnicodeDecodeError:
                raise Refusal(
                    Kind.CANNOT_CARRY,
                    "legacy",
                    f"secret {key!r} is binary; the legacy protocol only carries text (use asps.v1)",
                ) from None
        return text


# --- gRPC glue ----------------------------------------------------------------------------------------


async def _abort(context: grpc.aio.ServicerContext, r: Refusal) -> None:
    await context.abort(r.status, f"{r.step}: {r.reason}")


@dataclass(frozen=True)
class _Undecodable:
    """What the request deserializer hands on for bytes that are not the expected message (e.g. a
    string field with invalid UTF-8), so that the method answers INVALID_ARGUMENT instead of gRPC
    logging a traceback and answering INTERNAL."""

    message: str


def _decoder(message_cls: Any) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        try:
            return message_cls.FromString(data)
        except DecodeError:
            return _Undecodable(message_cls.DESCRIPTOR.full_name)

    return decode


def _add_servicers(server: grpc.aio.Server, provisioner: Provisioner, pool: WorkPool) -> None:
    """Both services, with request deserializers that never raise (see `_Undecodable`)."""
    v1 = SecretProvisionServicer(provisioner, pool)
    legacy = LegacyServicer(provisioner, pool)
    services = {
        SERVICE_NAME: {
            "GetChallenge": (v1.GetChallenge, asps_pb2.ChallengeRequest, asps_pb2.Challenge),
            "GetSecrets": (v1.GetSecrets, asps_pb2.SecretsRequest, asps_pb2.SecretsReply),
        },
        # Always registered so that a disabled legacy call gets a clear reason, not "unknown method".
        LEGACY_SERVICE_NAME: {
            "GetSecret": (legacy.GetSecret, secretmanager_pb2.SecretRequest, secretmanager_pb2.SecretReply),
        },
    }
    for service, methods in services.items():
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                fn, request_deserializer=_decoder(req), response_serializer=reply.SerializeToString
            )
            for name, (fn, req, reply) in methods.items()
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        server.add_registered_method_handlers(service, handlers)


def _guarded(fn):
    """Refusal -> its status; anything else is a bug: log it (no values) and answer INTERNAL."""

    @functools.wraps(fn)
    async def wrapper(self, request, context):
        if self.p.replica_id:  # set before abort() so refusals carry it too
            context.set_trailing_metadata(((REPLICA_METADATA, self.p.replica_id),))
        if isinstance(request, _Undecodable):
            log.info("refused %s: request is not a valid %s message", fn.__name__, request.message)
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request: not a valid {request.message} message (e.g. a string field that is not UTF-8)",
            )
        try:
            return await fn(self, request, context)
        except Refusal as r:
            await _abort(context, r)
        except Busy as b:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(b))
        except Exception:
            log.exception("internal error in %s", fn.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")

    return wrapper


class _Servicer:
    """What each servicer holds: the pipeline, and the work pool its blocking steps run in."""

    def __init__(self, provisioner: Provisioner, pool: WorkPool) -> None:
        self.p = provisioner
        self.pool = pool


class SecretProvisionServicer(_Servicer, asps_pb2_grpc.SecretProvisionServicer):
    """Runs on the event loop: GetChallenge there (an HMAC), GetSecrets in the work pool."""

    @_guarded
    async def GetChallenge(self, request, context):
        token, expires_at = self.p.get_challenge()
        return asps_pb2.Challenge(token=token, expires_at=expires_at)

    @_guarded
    async def GetSecrets(self, request, context):
        app_id, sealed = await self.pool.run(
            functools.partial(
                self.p.get_secrets,
                request.evidence,
                request.token,
                list(request.names),
                request.signature,
                peer=context.peer(),
            )
        )
        return asps_pb2.SecretsReply(app_id=app_id, sealed=sealed)


class LegacyServicer(_Servicer, secretmanager_pb2_grpc.SecretMangerServicer):
    @_guarded
    async def GetSecret(self, request, context):
        value = await self.pool.run(
            functools.partial(self.p.get_secret_legacy, request.key, request.ctx, peer=context.peer())
        )
        return secretmanager_pb2.SecretReply(value=value)


# --- serving core: grpc.aio, where waiting holds no thread -------------------------------------------
#
# One asyncio event loop (on a thread of its own, `LoopThread`) runs the gRPC server: a call waiting
# for its request message, a slow sender, a silent connection or an idle stream is a few objects on
# that loop, never a thread. What costs CPU or blocks (quote verification, ECDSA, HPKE, the KMS read)
# runs in `WorkPool`, a bounded thread pool that admits a bounded number of calls and refuses the
# rest at once with RESOURCE_EXHAUSTED. Every other bound is in `Bounds` (README "Limits").


@dataclass(frozen=True)
class Bounds:
    """What one process lets its peers hold, each a flag with an ASPS_* twin (README "Limits")."""

    max_streams: int = 32  # concurrent HTTP/2 streams (calls) per connection
    receive_timeout: float = 5.0  # seconds from a call's headers to its whole request message
    handshake_timeout: float = 10.0  # seconds for a new connection's TLS and HTTP/2 handshake
    idle_timeout: float = 120.0  # a connection with no call open this long is closed (GOAWAY)
    max_connection_age: float = 600.0  # any connection is asked to go away after this long...
    connection_age_grace: float = 30.0  # ...and closed once its calls had this long to finish
    keepalive_time: float = 60.0  # the server pings a connection silent this long...
    keepalive_timeout: float = 20.0  # ...and closes it when the ping is not answered in time
    min_ping_interval: float = 30.0  # a client may ping no more often than this (without data)...
    ping_strikes: int = 2  # ...pings beyond that are strikes; more than this many: GOAWAY
    max_inflight: int = 0  # calls admitted to the work pool (running or queued); 0: 8 x --threads
    max_calls: int = 4096  # calls open at once, waiting ones included; beyond: RESOURCE_EXHAUSTED
    max_streaming_calls: int = 64  # long-lived calls (health Watch, reflection) open at once

    def check(self) -> None:
        if self.max_streams < 1 or self.max_calls < 1 or self.max_inflight < 0 or self.ping_strikes < 0:
            raise StartupError(
                "--max-streams and --max-calls must be at least 1, --max-inflight and --ping-strikes "
                "not negative"
            )
        for name in (
            "receive_timeout",
            "handshake_timeout",
            "idle_timeout",
            "max_connection_age",
            "keepalive_time",
            "keepalive_timeout",
        ):
            if not getattr(self, name) > 0:
                raise StartupError(f"--{name.replace('_', '-')} must be more than 0 seconds")
        if self.connection_age_grace < 0 or self.min_ping_interval < 0:
            raise StartupError("--connection-age-grace and --min-ping-interval must not be negative")
        if self.max_streaming_calls < 0:
            raise StartupError("--max-streaming-calls must not be negative")

    @property
    def streaming_cap(self) -> int:
        """Long-lived calls allowed at once: never more than half of --max-calls, so that they can
        never take the slots unary attestation calls need."""
        return min(self.max_streaming_calls, self.max_calls // 2)

    def channel_options(self) -> list[tuple[str, int]]:
        """The grpc core arguments that enforce the connection-level bounds."""

        def ms(seconds: float) -> int:
            return max(1, int(seconds * 1000))

        return [
            ("grpc.max_concurrent_streams", self.max_streams),
            ("grpc.server_handshake_timeout_ms", ms(self.handshake_timeout)),
            ("grpc.max_connection_idle_ms", ms(self.idle_timeout)),
            ("grpc.max_connection_age_ms", ms(self.max_connection_age)),
            ("grpc.max_connection_age_grace_ms", ms(self.connection_age_grace)),
            ("grpc.keepalive_time_ms", ms(self.keepalive_time)),
            ("grpc.keepalive_timeout_ms", ms(self.keepalive_timeout)),
            ("grpc.http2.min_ping_interval_without_data_ms", ms(self.min_ping_interval)),
            ("grpc.http2.max_ping_strikes", self.ping_strikes),
        ]


class Busy(Exception):
    """The work pool is full: the call is shed with RESOURCE_EXHAUSTED instead of queued."""


class WorkPool:
    """A fixed number of threads for CPU-bound or blocking work, off the event loop. At most `limit`
    calls are admitted (running or waiting for a thread); the next is refused at once (`Busy`), so a
    flood costs the caller a quick refusal, not everyone a queue without end. A call counts until its
    work is done, even if its caller gave up meanwhile (the thread is busy either way)."""

    def __init__(self, threads: int, limit: int) -> None:
        self.threads, self.limit = threads, limit
        self._executor = futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="asps")
        self._lock = threading.Lock()
        self.admitted = 0
        self.shed = 0

    async def run(self, fn: Callable[[], Any]) -> Any:
        with self._lock:
            if self.admitted >= self.limit:
                self.shed += 1
                raise Busy(f"server busy ({self.admitted} calls in progress); retry shortly")
            self.admitted += 1
        try:
            job = self._executor.submit(fn)
        except RuntimeError:  # shut down: the server is stopping
            self._release(None)
            raise Busy("server stopping; retry on another replica") from None
        job.add_done_callback(self._release)
        return await asyncio.wrap_future(job)

    def _release(self, _job: Any) -> None:
        with self._lock:
            self.admitted -= 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class ReceiveLimit(grpc.aio.ServerInterceptor):
    """Bounds the time from a call's headers to its request message, for every method (health and
    reflection included; a stream of requests message by message), and the number of long-lived
    calls. grpc core has no such limit: a unary handler is simply not started until the
    message arrives, and the call waits as long as the peer likes. So each unary-request method is
    served as a stream-request one (the same bytes on the wire) whose handler reads the one message
    within the limit; past the limit the call ends with DEADLINE_EXCEEDED and its stream is
    reset. Bodies that trickle in slower than that are cut off the same way. The wait is an
    `asyncio.timeout` scope (one timer on the call's own task) rather than `asyncio.wait_for`, which
    in Python 3.11 wraps every read in a task of its own: this runs once per call on the loop thread."""

    _CACHED = 256  # wrapped handlers kept (services register a fixed set; beyond this, wrap per call)

    def __init__(self, seconds: float, max_streaming: int = 64) -> None:
        self.seconds = seconds
        # A call that streams (health Watch's replies, reflection's requests) stays open after its first
        # message, for as long as the peer keeps the connection: such calls are counted here and capped
        # well below --max-calls, so that they can never take the slots unary attestation calls need.
        self.max_streaming = max_streaming
        self.streaming = 0  # touched only on the loop thread
        # id(handler) -> (handler, its wrapped twin): registered handlers are the same objects on
        # every call, so each is wrapped once, not on every call on the loop thread. The handler is
        # kept in the entry so its id cannot be reused by another object while cached.
        self._wrapped: dict[int, tuple[Any, Any]] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        entry = self._wrapped.get(id(handler))
        if entry is not None and entry[0] is handler:
            return entry[1]
        wrapped = self._wrap(handler)
        if len(self._wrapped) < self._CACHED:
            self._wrapped[id(handler)] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: Any) -> Any:
        """The stream-request twin of a unary-request handler (same serializers, same behaviour); a
        stream-request handler keeps its shape, each of its messages bounded and the call counted."""
        if handler.request_streaming:
            make = grpc.stream_stream_rpc_method_handler if handler.response_streaming else (
                grpc.stream_unary_rpc_method_handler)
            behaviour = handler.stream_stream if handler.response_streaming else handler.stream_unary
            return make(
                self._streaming_requests(behaviour),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(
                self._stream_reply(handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_unary_rpc_method_handler(
            self._unary_reply(handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    async def _receive(self, requests: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            async with asyncio.timeout(self.seconds):
                return await requests.__anext__()
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"request message not received within {self.seconds:g} s (--receive-timeout)",
            )
        except StopAsyncIteration:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request: no message was sent")

    def _unary_reply(self, behaviour: Callable[..., Any]) -> Callable[..., Any]:
        async def handler(requests, context):
            request = await self._receive(requests, context)
            return await behaviour(request, context)

        return handler

    def _stream_reply(self, behaviour: Callable[..., Any]) -> Callable[..., Any]:
        async def handler(requests, context):
            request = await self._receive(requests, context)
            async with self._streaming_slot(context):
                result = behaviour(request, context)
                if inspect.isasyncgen(result):
                    async for reply in result:
                        await context.write(reply)
                else:
                    await result

        return handler

    def _streaming_requests(self, behaviour: Callable[..., Any]) -> Callable[..., Any]:
        async def handler(requests, context):
            async with self._streaming_slot(context):
                result = behaviour(self._each_within_limit(requests, context), context)
                if inspect.isasyncgen(result):
                    async for reply in result:
                        await context.write(reply)
                else:
                    return await result

        return handler

    async def _each_within_limit(self, requests: Any, context: grpc.aio.ServicerContext) -> Any:
        """The peer's messages, each of which must arrive within the receive limit of the one before."""
        while True:
            try:
                async with asyncio.timeout(self.seconds):
                    message = await requests.__anext__()
            except StopAsyncIteration:
                return
            except TimeoutError:
                await context.abort(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"next request message not received within {self.seconds:g} s (--receive-timeout)",
                )
            yield message

    @contextlib.asynccontextmanager
    async def _streaming_slot(self, context: grpc.aio.ServicerContext) -> Any:
        if self.streaming >= self.max_streaming:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many long-lived calls open ({self.max_streaming}, --max-streaming-calls)",
            )
        self.streaming += 1
        try:
            yield
        finally:
            self.streaming -= 1


class LoopThread:
    """An asyncio event loop running on a daemon thread of its own, so that `serve` and
    `ServerHandle` stay synchronous for their callers (main's signal loop, tests)."""

    def __init__(self, name: str = "asps-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def call(self, coro: Any, timeout: float | None = None) -> Any:
        """Run `coro` on the loop and wait for its result (never call from the loop's own thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @staticmethod
    async def _cancel_leftovers() -> None:
        """Let the calls still on the loop end (the stopped server completes them, e.g. those of
        peers that never sent a message), cancel what is left after a second: no task may be
        destroyed pending when the loop closes."""
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if tasks:
            _done, tasks = await asyncio.wait(tasks, timeout=1)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)

    def on_loop(self) -> bool:
        return threading.current_thread() is self._thread

    def close(self) -> None:
        if self.loop.is_closed():
            return
        with contextlib.suppress(Exception):  # best effort: what is left is cancelled, not leaked
            self.call(self._cancel_leftovers(), timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


# --- the server's own TLS certificate: checked at start, rotated on SIGHUP ------------------------------

TLS_EXPIRY_WARNING = datetime.timedelta(days=14)


class TlsIdentityError(Exception):
    """The TLS certificate/key pair cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class TlsPair:
    """A checked certificate chain and its private key, as PEM, with the leaf's validity window."""

    cert_pem: bytes
    key_pem: bytes
    subject: str
    serial: int
    not_before: datetime.datetime
    not_after: datetime.datetime


def load_tls_pair(cert_path: str, key_path: str, now: datetime.datetime | None = None) -> TlsPair:
    """Read and check a certificate chain and key: parseable, the key is the leaf's, valid at `now`.

    gRPC would accept an expired or mismatched pair and fail each handshake later, where only a
    gRPC log line tells the operator why; checking here turns that into a refusal that says which.
    """
    now = now or datetime.datetime.now(datetime.UTC)
    try:
        cert_pem = Path(cert_path).read_bytes()
    except OSError as e:
        raise TlsIdentityError(f"TLS certificate {cert_path}: {e.strerror or e}") from None
    try:
        key_pem = Path(key_path).read_bytes()
    except OSError as e:
        raise TlsIdentityError(f"TLS key {key_path}: {e.strerror or e}") from None
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise TlsIdentityError(f"TLS certificate {cert_path}: not a PEM certificate") from None
    leaf = chain[0]
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise TlsIdentityError(f"TLS key {key_path}: encrypted; give an unencrypted PEM key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise TlsIdentityError(f"TLS key {key_path}: not a PEM private key") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        later = [
            i
            for i, c in enumerate(chain)
            if c.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)
        ]
        if later:
            raise TlsIdentityError(
                f"TLS certificate {cert_path}: the key's certificate is number {later[0] + 1} in the file; "
                "the server's own certificate must come first, then its issuers"
            )
        raise TlsIdentityError(
            f"TLS key {key_path} does not match the certificate {cert_path} (serial {leaf.serial_number:x}): "
            "they are not one pair"
        )
    pair = TlsPair(
        cert_pem,
        key_pem,
        leaf.subject.rfc4514_string(),
        leaf.serial_number,
        leaf.not_valid_before_utc,
        leaf.not_valid_after_utc,
    )
    if now < pair.not_before:
        raise TlsIdentityError(
            f"TLS certificate {cert_path} is not yet valid: valid from {pair.not_before.isoformat()} "
            f"(now {now.isoformat(timespec='seconds')}); check the clock or the certificate"
        )
    if now > pair.not_after:
        raise TlsIdentityError(
            f"TLS certificate {cert_path} expired on {pair.not_after.isoformat()} "
            f"(now {now.isoformat(timespec='seconds')}); renew it"
        )
    return pair


class ServerTlsIdentity:
    """The server's certificate and key: checked when loaded, served through gRPC's dynamic credentials
    so that `reload()` (SIGHUP) rotates them for new connections without a restart; connections
    already open keep the certificate they were made with. A pair that fails the checks is refused at
    start (TlsIdentityError) and, on reload, logged and ignored: the current pair stays in force."""

    def __init__(self, cert_path: str, key_path: str) -> None:
        self.cert_path = cert_path
        self.key_path = key_path
        self.current = load_tls_pair(cert_path, key_path)
        self._lock = threading.Lock()
        self._pending: TlsPair | None = None  # taken by gRPC's fetcher at the next handshake
        self._warn_if_expiring(self.current)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self._configuration(self.current), self._fetch)

    def reload(self) -> bool:
        """Re-read both files; on any problem keep the pair in force and log why."""
        try:
            new = load_tls_pair(self.cert_path, self.key_path)
        except TlsIdentityError as e:
            log.error("TLS reload failed, keeping certificate serial %x: %s", self.current.serial, e)
            return False
        with self._lock:
            self.current = new
            self._pending = new
        log.info(
            "TLS certificate reloaded from %s: %s serial %x, valid until %s",
            self.cert_path,
            new.subject,
            new.serial,
            new.not_after.isoformat(),
        )
        self._warn_if_expiring(new)
        return True

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC before each handshake: a new configuration once after a reload, else None."""
        with self._lock:
            pending, self._pending = self._pending, None
        return None if pending is None else self._configuration(pending)

    @staticmethod
    def _configuration(pair: TlsPair) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(pair.key_pem, pair.cert_pem)])

    def _warn_if_expiring(self, pair: TlsPair) -> None:
        left = pair.not_after - datetime.datetime.now(datetime.UTC)
        if left < TLS_EXPIRY_WARNING:
            log.warning(
                "TLS certificate %s expires in %.1f days (%s): renew it and send SIGHUP",
                self.cert_path,
                left.total_seconds() / 86400,
                pair.not_after.isoformat(),
            )


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
    replica_id: str | None = None  # None: hostname:port
    grace: float = 10.0
    limits: Limits = field(default_factory=Limits)
    metrics_port: int | None = None  # None: no metrics endpoint
    metrics_host: str = "127.0.0.1"
    health_interval: float = 10.0  # seconds between collateral probes for grpc.health.v1
    evidence_cache: int = 4096  # verified evidence remembered (entries); 0: verify every time
    reuse_port: bool = False  # SO_REUSEPORT: several processes serve one port (--workers)
    bounds: Bounds = field(default_factory=Bounds)  # what peers may hold (README "Limits")


class StartupError(Exception):
    """The server cannot start with this configuration; the message says what to fix."""


@dataclass
class ServerHandle:
    """A running server: its bound port, and the operations signals trigger. The gRPC server runs on
    `loop` (grpc.aio); these methods are synchronous and may be called from any other thread."""

    server: grpc.aio.Server
    provisioner: Provisioner
    health: ops.LoopHealth
    config: ServerConfig
    port: int
    _stopped: threading.Event = field(default_factory=threading.Event)
    monitor: ops.HealthMonitor | None = None
    metrics: ops.NullMetrics = field(default_factory=ops.NullMetrics)
    tls: ServerTlsIdentity | None = None  # reloaded on SIGHUP with the policy
    loop: LoopThread | None = None
    pool: WorkPool | None = None

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
            self.metrics.policy_reload(False)
            return False
        for w in new.warnings:
            log.warning("%s", w)
        self.provisioner.policy = new
        self.provisioner.evidence.clear()  # entries are bound to the old policy: free them now
        self.metrics.policy_reload(True)
        log.info("policy reloaded from %s: sha256 %s, %d app(s)", new.source, new.digest[:16], len(new.apps))
        # Requests already holding the old policy may still use its agents for a while.
        closer = threading.Timer(RETIRED_AGENT_GRACE, _close_agents, args=(old,))
        closer.daemon = True
        closer.start()
        return True

    def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let in-flight ones finish within `grace` seconds."""
        if self.monitor is not None:
            self.monitor.stop()  # before NOT_SERVING, so that it cannot flip back
        if self._stopped.is_set():
            return
        for service in ("", SERVICE_NAME, LEGACY_SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        seconds = self.config.grace if grace is None else grace
        if self.loop is not None:
            # aio: new calls are refused at once; calls in flight get `seconds`, then are cancelled.
            self.loop.call(self.server.stop(seconds), timeout=seconds + 30)
            self.loop.close()
        if self.pool is not None:
            self.pool.shutdown()
        self.metrics.close()
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
        source = pccs.open_collateral_source(config.collateral, pccs_url(config.pccs))
    except dcap.DcapError as e:
        raise StartupError(f"collateral: {e}") from None
    if isinstance(source, pccs.PccsCollateralSource):
        source.timeout = PCCS_FETCH_TIMEOUT
    return dcap.Verifier(ops.CollateralWatch(source), root_ca=root)


def _reflection_module() -> Any:
    """grpc_reflection.v1alpha.reflection, or a StartupError saying which package to install."""
    try:
        from grpc_reflection.v1alpha import reflection
    except ImportError as e:
        raise StartupError(
            f"--reflection needs the grpcio-reflection package ({e}); install requirements.txt "
            "or start without --reflection"
        ) from None
    return reflection


# One whole collateral fetch (four requests) ends well inside a client's default 10 s deadline, so a
# PCCS that hangs is answered UNAVAILABLE (retry) instead of being left to DEADLINE_EXCEEDED.
PCCS_FETCH_TIMEOUT = 5.0


def serve(config: ServerConfig) -> ServerHandle:
    """Start the server (non-blocking); raises StartupError with what to fix."""
    if not 1 <= config.token_ttl <= 3600:
        raise StartupError("--token-ttl must be 1..3600 seconds")
    if config.threads < 1 or config.grace < 0:
        raise StartupError("--threads must be at least 1 and --grace not negative")
    if not config.health_interval > 0:
        raise StartupError("--health-interval must be more than 0 seconds")
    if config.reflection:
        _reflection_module()  # fail before anything is started
    if not config.cert or not config.key:
        raise StartupError("TLS is required: give --cert and --key (./run.sh gen-certs makes demo ones)")
    try:
        tls = ServerTlsIdentity(config.cert, config.key)
    except TlsIdentityError as e:
        raise StartupError(str(e)) from None
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
    if config.evidence_cache < 0:
        raise StartupError("--evidence-cache must be 0 (off) or more entries")
    provisioner = Provisioner(
        pol,
        verifier,
        tokens,
        limits=config.limits,
        legacy=config.legacy_cczoo,
        evidence_cache=EvidenceCache(config.evidence_cache),
    )

    if config.legacy_cczoo:
        log.warning(
            "--legacy-cczoo: also serving %s/GetSecret. That protocol is REPLAYABLE: anyone who "
            "captures one enclave's certificate can fetch its secrets again. Turn it off once clients "
            "have moved to asps.v1.",
            LEGACY_SERVICE_NAME,
        )
    bounds = config.bounds
    bounds.check()
    pool = WorkPool(config.threads, bounds.max_inflight or 8 * config.threads)
    loop = LoopThread()
    creds = tls.credentials()
    try:
        server, health_servicer, port = loop.call(_start_grpc(config, provisioner, pool, loop, creds), 60)
    except BaseException:
        loop.close()
        pool.shutdown()
        raise
    provisioner.replica_id = config.replica_id or f"{socket.gethostname()}:{port}"
    metrics: ops.NullMetrics = ops.NullMetrics()
    if config.metrics_port is not None:
        try:
            metrics = ops.Metrics(config.metrics_host, config.metrics_port)
        except OSError as e:
            loop.call(server.stop(0), 30)
            loop.close()
            pool.shutdown()
            raise StartupError(
                f"--metrics-port {config.metrics_port} on {config.metrics_host}: {e.strerror or e}"
            ) from None
        provisioner.metrics = metrics
    watch = verifier.source if isinstance(verifier.source, ops.CollateralWatch) else None
    services = ["", SERVICE_NAME] + ([LEGACY_SERVICE_NAME] if config.legacy_cczoo else [])
    if not config.legacy_cczoo:
        health_servicer.set(LEGACY_SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    monitor = ops.HealthMonitor(health_servicer, services, watch, config.health_interval)
    monitor.start()
    metrics.watch(provisioner, watch, monitor)
    metrics.watch_pool(pool)
    loop.call(server.start(), 30)
    if metrics.port is not None:
        log.info("metrics on http://%s:%d/metrics", config.metrics_host, metrics.port)
    log.info(
        "listening on %s (TLS) as replica %s, policy %s sha256 %s with %d app(s), kms %s, "
        "token lifetime %d s",
        config.host.rsplit(":", 1)[0] + f":{port}",
        provisioner.replica_id,
        pol.source,
        pol.digest[:16],
        len(pol.apps),
        pol.kms,
        config.token_ttl,
    )
    return ServerHandle(
        server,
        provisioner,
        health_servicer,
        config,
        port,
        monitor=monitor,
        metrics=metrics,
        tls=tls,
        loop=loop,
        pool=pool,
    )


async def _start_grpc(
    config: ServerConfig, provisioner: Provisioner, pool: WorkPool, loop: LoopThread, creds: Any
) -> tuple[grpc.aio.Server, ops.LoopHealth, int]:
    """The aio server, its services and its port, made on the loop (aio objects belong to the loop
    they are made on); started later by `serve`, once health and metrics are in place."""
    bounds = config.bounds
    server = grpc.aio.server(
        interceptors=[ReceiveLimit(bounds.receive_timeout, bounds.streaming_cap)],
        options=[
            ("grpc.max_receive_message_length", config.limits.request),
            ("grpc.max_send_message_length", config.limits.reply),
            ("grpc.so_reuseport", 1 if config.reuse_port else 0),
            *bounds.channel_options(),
        ],
        maximum_concurrent_rpcs=bounds.max_calls,
    )
    _add_servicers(server, provisioner, pool)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if config.reflection:
        names = [SERVICE_NAME, health.SERVICE_NAME]
        if config.legacy_cczoo:
            names.append(LEGACY_SERVICE_NAME)
        reflection = _reflection_module()
        names.append(reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
    try:
        port = server.add_secure_port(config.host, creds)
    except RuntimeError as e:
        raise StartupError(f"cannot listen on {config.host}: {e}") from None
    if not port:
        raise StartupError(f"cannot listen on {config.host}")
    return server, ops.LoopHealth(health_servicer, loop), port


# --- logging ------------------------------------------------------------------------------------------


def _audit_line(record: logging.LogRecord) -> str | None:
    """An audit record's JSON line: the text ops.AuditRecord serialized once (`audit_json`), else
    the `audit` dict serialized here; None for any other record."""
    text = getattr(record, "audit_json", None)
    if text is not None:
        return text
    audit = getattr(record, "audit", None)
    return None if audit is None else json.dumps(audit)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        audit = _audit_line(record)
        if audit is not None:
            return audit
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
        audit = _audit_line(record)
        if audit is not None:
            return audit
        return super().format(record)


# gRPC's asyncio layer logs at DEBUG while it holds its process-wide lock (init_grpc_aio), and the
# destructors of its objects take that lock from whichever thread the garbage collector runs in, one
# that is inside a logging handler (holding the handler's lock) included: with gRPC's DEBUG lines on,
# the two wait for each other and every thread that logs hangs (seen in tests/test_faults.py). So
# gRPC's loggers never go below INFO, whatever the level of the rest.
GRPC_LOG_FLOOR = logging.INFO


def setup_logging(fmt: str = "text", audit_file: str | None = None, level: int = logging.INFO) -> None:
    logging.getLogger("grpc").setLevel(max(level, GRPC_LOG_FLOOR))
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


def wants_json_logs(argv: Sequence[str]) -> bool:
    """--log-format json (or ASPS_LOG_FORMAT=json), seen before argparse runs, so that even its
    usage errors come out as JSON lines."""
    fmt = cli_env.env("ASPS_LOG_FORMAT", "text")
    for i, arg in enumerate(argv):
        if arg == "--log-format" and i + 1 < len(argv):
            fmt = argv[i + 1]
        elif arg.startswith("--log-format="):
            fmt = arg.split("=", 1)[1]
    return fmt == "json"


def json_line(message: str, level: int = logging.INFO, logger: str = "asps") -> str:
    """One line in the JSON log shape, for what is not written through logging (stdout, usage)."""
    record = logging.makeLogRecord(
        {"name": logger, "levelno": level, "levelname": logging.getLevelName(level), "msg": message}
    )
    return _JsonFormatter().format(record)


def announce(message: str, fmt: str) -> None:
    """A line on stdout that supervisors and scripts wait for ("Server listening on ...")."""
    print(json_line(message) if fmt == "json" else message, flush=True)


def _json_usage_error(parser: argparse.ArgumentParser, message: str) -> None:
    print(json_line(f"{parser.prog}: {message} (see --help)", logging.ERROR), file=sys.stderr, flush=True)
    sys.exit(2)


_NATIVE_LEVELS = {"E": logging.ERROR, "W": logging.WARNING, "I": logging.INFO, "F": logging.CRITICAL}
_native_log = logging.getLogger("asps.stderr")


def route_stderr_through_logging() -> None:
    """JSON log mode: whatever writes to file descriptor 2 without our logging (gRPC's C core and its
    absl log lines, Python warnings, a last-resort traceback, a worker's stray output) goes through a
    pipe and comes out as one JSON log line each; lines that already are JSON pass as they are. Our
    own handler writes to the real stderr (a duplicate of the original descriptor)."""
    real = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    read_fd, write_fd = os.pipe()
    sys.stderr.flush()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, logging.StreamHandler)]
    for h in handlers:
        if getattr(h, "stream", None) is sys.stderr:
            h.setStream(real)
    lock = handlers[0].lock if handlers and handlers[0].lock else threading.RLock()

    def pump() -> None:
        with os.fdopen(read_fd, "rb") as pipe:
            for raw in pipe:
                line = raw.decode("utf-8", "replace").rstrip()
                if not line:
                    continue
                if line.startswith("{"):
                    with contextlib.suppress(ValueError):
                        json.loads(line)
                        with lock:
                            real.write(line + "\n")
                        continue
                level = (
                    _NATIVE_LEVELS.get(line[:1], logging.WARNING) if line[1:5].isdigit() else logging.WARNING
                )
                _native_log.log(level, "%s", line)

    thread = threading.Thread(target=pump, name="stderr-to-json", daemon=True)
    thread.start()

    def drain() -> None:  # at exit: close our end of the pipe, let the pump write what is left
        with contextlib.suppress(Exception):
            sys.stderr.flush()
            os.dup2(real.fileno(), 2)
            thread.join(timeout=2.0)

    atexit.register(drain)


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
  SIGHUP   re-read the policy file and the TLS certificate and key; a broken or expired one keeps
           the one in force (the log says why); new connections get the new certificate
  SIGTERM  stop accepting calls, let in-flight calls finish (--grace seconds), exit 0

examples:
  asps_server.py --cert certs/server.crt --key certs/server.key --policy policy_vault.json \\
      --pccs https://pccs.example:8081
  asps_server.py ... --collateral sim/collateral.json --root-ca sim/root_ca.pem   (demo platform)
  asps_server.py gen-certs DIR [HOST...]    demo CA + server certificate for HOSTs (default localhost)
  asps_server.py check-policy FILE [--online]   check a policy without starting a server (see --help)
"""


TOKEN_KEY_CREDENTIAL = "token-key"  # systemd: LoadCredential=token-key:/etc/asps/token.key


def _credential(name: str) -> str | None:
    """$CREDENTIALS_DIRECTORY/NAME when systemd handed the service that credential (LoadCredential=)."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    path = os.path.join(directory, name) if directory else None
    return path if path and os.path.isfile(path) else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="asps_server.py",
        description=HELP,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cli_env.add_env_argument(
        p,
        "--host",
        "-host",
        env_name="ASPS_HOST",
        default="localhost:50051",
        help="address to listen on, HOST:PORT [ASPS_HOST] (default %(default)s)",
    )
    cli_env.add_env_argument(
        p,
        "--tls-cert",
        "--cert",
        "-cert",
        dest="cert",
        env_name="ASPS_CERT",
        default="server.crt",
        help="the server's TLS certificate chain, PEM [ASPS_CERT]; --cert is the original's name for it. "
        "Refused at start when expired, not yet valid or not the key's; a warning when it expires "
        "within 14 days; SIGHUP re-reads it",
    )
    cli_env.add_env_argument(
        p,
        "--tls-key",
        "--key",
        "-key",
        dest="key",
        env_name="ASPS_KEY",
        default="server.key",
        help="the server's TLS private key, PEM [ASPS_KEY]; --key is the original's name for it "
        "(on the client --key names a secret)",
    )
    cli_env.add_env_argument(
        p,
        "-p",
        "--policy",
        env_name="ASPS_POLICY",
        default="policy_vault.json",
        help="policy file: which enclave gets which secrets, from which KMS [ASPS_POLICY] "
        "(default %(default)s)",
    )
    src = p.add_mutually_exclusive_group()
    cli_env.add_env_argument(
        src,
        "--collateral",
        env_name="ASPS_COLLATERAL",
        help="collateral bundle file (JSON) [ASPS_COLLATERAL]",
    )
    cli_env.add_env_argument(
        src,
        "--pccs",
        env_name="ASPS_PCCS",
        help="PCCS or Intel PCS base URL to fetch collateral from (the original's pccs_service_ip) "
        "[ASPS_PCCS]",
    )
    cli_env.add_env_argument(
        p,
        "--root-ca",
        env_name="ASPS_ROOT_CA",
        help="trusted root for quotes, PEM or DER [ASPS_ROOT_CA]; default the shipped Intel SGX Root CA. "
        "Anything else (a simulated platform's root) is logged as a loud warning",
    )
    cli_env.add_env_argument(
        p,
        "--token-key-file",
        env_name="ASPS_TOKEN_KEY_FILE",
        default=_credential(TOKEN_KEY_CREDENTIAL),
        help="file with the challenge HMAC key(s), one per line, first one signs [ASPS_TOKEN_KEY_FILE]; "
        "default under systemd: the 'token-key' credential ($CREDENTIALS_DIRECTORY/token-key, see "
        "deploy/asps-server.service). Or put the key in ASPS_TOKEN_KEY (never on the command line). "
        "Replicas sharing a key accept each other's challenges; without one a random per-process key "
        "is used",
    )
    cli_env.add_env_argument(
        p,
        "--token-ttl",
        type=int,
        env_name="ASPS_TOKEN_TTL",
        default="60",
        help="challenge lifetime in seconds [ASPS_TOKEN_TTL] (default %(default)s)",
    )
    cli_env.add_env_argument(
        p,
        "--legacy-cczoo",
        action="store_true",
        env_name="ASPS_LEGACY_CCZOO",
        help="also serve the original secretmanager.SecretManger/GetSecret protocol for existing "
        "confidential-computing-zoo clients [ASPS_LEGACY_CCZOO=1]. It is replayable: off by default",
    )
    cli_env.add_env_argument(
        p,
        "--reflection",
        action="store_true",
        env_name="ASPS_REFLECTION",
        help="enable gRPC server reflection [ASPS_REFLECTION=1]",
    )
    cli_env.add_env_argument(
        p,
        "--log-format",
        choices=("text", "json"),
        env_name="ASPS_LOG_FORMAT",
        default="text",
        help="operational log format on stderr [ASPS_LOG_FORMAT]; audit lines are JSON either way",
    )
    cli_env.add_env_argument(
        p,
        "--audit-log",
        env_name="ASPS_AUDIT_LOG",
        help="also write audit lines to this file [ASPS_AUDIT_LOG]",
    )
    cli_env.add_env_argument(
        p,
        "--threads",
        type=int,
        env_name="ASPS_THREADS",
        default="16",
        help="threads for the CPU-bound and blocking work of GetSecrets (quote verification, ECDSA, "
        "HPKE, the KMS read); calls themselves wait on an event loop and hold no thread "
        "[ASPS_THREADS] (default %(default)s)",
    )
    _add_bound_flags(p)
    cli_env.add_env_argument(
        p,
        "--grace",
        type=float,
        env_name="ASPS_GRACE",
        default="10",
        help="seconds in-flight calls get to finish on SIGTERM [ASPS_GRACE] (default %(default)s)",
    )
    cli_env.add_env_argument(
        p,
        "--metrics-port",
        type=int,
        env_name="ASPS_METRICS_PORT",
        help="serve Prometheus metrics over HTTP on this port [ASPS_METRICS_PORT] (default: none)",
    )
    cli_env.add_env_argument(
        p,
        "--metrics-host",
        env_name="ASPS_METRICS_HOST",
        default="127.0.0.1",
        help="address the metrics endpoint listens on [ASPS_METRICS_HOST] (default %(default)s)",
    )
    cli_env.add_env_argument(
        p,
        "--health-interval",
        type=float,
        env_name="ASPS_HEALTH_INTERVAL",
        default="10",
        help="seconds between checks that collateral is usable; grpc.health.v1 answers NOT_SERVING "
        "while it is not [ASPS_HEALTH_INTERVAL] (default %(default)s)",
    )
    cli_env.add_env_argument(
        p,
        "--replica-id",
        env_name="ASPS_REPLICA_ID",
        help="this replica's name, sent to clients as 'asps-replica' trailing metadata [ASPS_REPLICA_ID] "
        "(default HOSTNAME:PORT)",
    )
    cli_env.add_env_argument(
        p,
        "--evidence-cache",
        type=int,
        env_name="ASPS_EVIDENCE_CACHE",
        default="4096",
        help="how many verified evidence certificates to remember, so a repeated one skips quote "
        "verification (token, signature and policy are still checked every time); 0 turns it off "
        "[ASPS_EVIDENCE_CACHE] (default %(default)s)",
    )
    cli_env.add_env_argument(
        p,
        "--workers",
        type=int,
        env_name="ASPS_WORKERS",
        default="1",
        help="server processes sharing the port (SO_REUSEPORT), to use more than one core; they share "
        "the token key (a random one if none is given). A token is single-use per worker "
        "[ASPS_WORKERS] (default %(default)s)",
    )
    cli_env.add_env_argument(
        p,
        "--reuse-port",
        action="store_true",
        env_name="ASPS_REUSE_PORT",
        help="let other processes listen on the same port (SO_REUSEPORT); --workers sets it "
        "[ASPS_REUSE_PORT=1]",
    )
    return p


# Help for each Bounds field; its flag is --FIELD-NAME, its environment twin ASPS_FIELD_NAME.
_BOUND_HELP: dict[str, str] = {
    "max_streams": "concurrent calls (HTTP/2 streams) per connection",
    "receive_timeout": "seconds from a call's headers to its whole request message; slower calls "
    "end with DEADLINE_EXCEEDED",
    "handshake_timeout": "seconds a new connection gets for its TLS and HTTP/2 handshake",
    "idle_timeout": "seconds a connection may stay open without a call",
    "max_connection_age": "seconds after which any connection is asked to go away (clients reconnect)",
    "connection_age_grace": "seconds its calls then get before the connection is closed",
    "keepalive_time": "seconds of silence after which the server pings a connection",
    "keepalive_timeout": "seconds that ping may go unanswered before the connection is closed",
    "min_ping_interval": "seconds a client must leave between its pings while no call is open",
    "ping_strikes": "pings sooner than that tolerated before GOAWAY",
    "max_inflight": "GetSecrets calls admitted to the --threads pool at once (running or queued); "
    "more are refused at once with RESOURCE_EXHAUSTED; 0: 8 x --threads",
    "max_calls": "calls open at once, those waiting for their message included; more are refused "
    "with RESOURCE_EXHAUSTED",
    "max_streaming_calls": "long-lived calls (grpc.health.v1 Watch, reflection) open at once, counted "
    "within --max-calls and never more than half of it; more are refused with RESOURCE_EXHAUSTED, so "
    "no peer can fill --max-calls with calls that stay open",
}


def _add_bound_flags(p: argparse.ArgumentParser) -> None:
    defaults = Bounds()
    for name, text in _BOUND_HELP.items():
        default = getattr(defaults, name)
        env = "ASPS_" + name.upper()
        cli_env.add_env_argument(
            p,
            "--" + name.replace("_", "-"),
            type=type(default),
            dest=name,
            env_name=env,
            default=str(default),
            help=f"{text} [{env}] (default %(default)s)",
        )


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        host=args.host,
        cert=args.cert,
        key=args.key,
        policy=args.policy,
        collateral=args.collateral,
        pccs=args.pccs,
        root_ca=args.root_ca,
        token_keys=load_token_keys(args.token_key_file, cli_env.env("ASPS_TOKEN_KEY")),
        token_ttl=args.token_ttl,
        legacy_cczoo=args.legacy_cczoo,
        reflection=args.reflection,
        threads=args.threads,
        grace=args.grace,
        replica_id=args.replica_id,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        health_interval=args.health_interval,
        evidence_cache=args.evidence_cache,
        reuse_port=args.reuse_port,
        bounds=Bounds(**{name: getattr(args, name) for name in _BOUND_HELP}),
    )


def gen_certs_main(argv: Sequence[str]) -> int:
    """`asps_server.py gen-certs DIR [HOST...]`: a demo CA and server certificate (never for production)."""
    p = argparse.ArgumentParser(
        prog="asps_server.py gen-certs",
        description="Write a demo CA (ca.crt, ca.key) and a server certificate (server.crt, server.key) "
        "for HOSTs into DIR. For demos and tests only: use your own PKI in production.",
    )
    p.add_argument("dir", metavar="DIR", help="directory to write into (created if absent)")
    p.add_argument(
        "hosts",
        metavar="HOST",
        nargs="*",
        default=[],
        help="names/IPs the certificate is for (default: localhost 127.0.0.1)",
    )
    args = p.parse_args(argv)  # an option-like DIR ("--help", "-x") is never taken as a directory name
    d = generate_demo_certs(args.dir, args.hosts or ("localhost", "127.0.0.1"))
    print(f"wrote {d}/ca.crt, {d}/server.crt, {d}/server.key (demo CA: {d}/ca.key)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["check-policy"]:
        import policy_check  # only this subcommand needs it

        return policy_check.main(argv[1:])
    if argv[:1] == ["gen-certs"]:
        return gen_certs_main(argv[1:])
    parser = build_parser()
    if wants_json_logs(argv):
        parser.error = functools.partial(_json_usage_error, parser)  # type: ignore[method-assign]
    args = parser.parse_args(argv)
    setup_logging(args.log_format, args.audit_log)
    if args.log_format == "json":
        route_stderr_through_logging()
    if args.workers > 1:
        return run_workers(argv, args)

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
    announce(f"Server listening on {handle.address}", args.log_format)
    parent = int(os.environ.get(WORKER_PARENT_ENV) or 0)
    while True:
        wake.wait(1.0)
        wake.clear()
        if parent and os.getppid() != parent:  # a worker whose supervisor is gone stops too
            events.append(signal.SIGTERM)
        while events:
            signum = events.pop(0)
            if signum == signal.SIGHUP:
                handle.reload_policy()
                if handle.tls is not None:
                    handle.tls.reload()
            else:
                log.info(
                    "%s: draining (up to %.0f s) and stopping", signal.Signals(signum).name, config.grace
                )
                handle.stop()
                log.info("stopped")
                return 0


# --- --workers: several processes on one port ----------------------------------------------------------

WORKER_PARENT_ENV = "ASPS_WORKER_PARENT"  # set in each worker: its supervisor's pid


def _concrete_host(host: str) -> str:
    """HOST:PORT with port 0 replaced by a free port, so that every worker binds the same one."""
    name, _, port = host.rpartition(":")
    if port != "0":
        return host
    family, kind, proto, _, addr = socket.getaddrinfo(name.strip("[]") or None, 0, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as s:
        s.bind(addr)
        return f"{name}:{s.getsockname()[1]}"


def run_workers(argv: Sequence[str], args: argparse.Namespace) -> int:
    """Supervise --workers N copies of this server, each its own process (its own GIL) and gRPC server
    bound to the same port with SO_REUSEPORT; the kernel spreads connections over them.

    The workers share the token key: the given one (file or ASPS_TOKEN_KEY), else one made here and
    handed down in the workers' environment, never on a command line. SIGHUP and SIGTERM/SIGINT are
    passed on; the supervisor exits once every worker has, 0 if all did. A worker that dies on its
    own stops the others (exit 1): restarting is the service manager's job. Each worker has its own
    token book, evidence cache and metrics port (--metrics-port + index)."""
    events: list[int] = []
    wake = threading.Event()
    workers: list[subprocess.Popen[str]] = []
    stopping: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        if signum != signal.SIGHUP and not stopping:
            stopping.append(signum)
            for w in workers:  # at once, so that a worker still starting up stops as well
                if w.poll() is None:
                    w.send_signal(signal.SIGTERM)
        events.append(signum)  # SIGHUP waits until every worker is up (before that it would kill it)
        wake.set()

    for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    try:
        keys = load_token_keys(args.token_key_file, cli_env.env("ASPS_TOKEN_KEY"))
        host = _concrete_host(args.host)
    except (StartupError, OSError) as e:
        log.error("cannot start: %s", e)
        return 2
    env = {**os.environ, WORKER_PARENT_ENV: str(os.getpid())}
    if not keys:
        env["ASPS_TOKEN_KEY"] = secrets.token_hex(32)
        log.info("no token key given: the %d workers share a random one made for this run", args.workers)
    base_id = args.replica_id or f"{socket.gethostname()}:{host.rpartition(':')[2]}"
    for i in range(args.workers):
        extra = ["--host", host, "--workers", "1", "--reuse-port", "--replica-id", f"{base_id}/w{i}"]
        if args.metrics_port:
            extra += ["--metrics-port", str(args.metrics_port + i)]
        workers.append(
            subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), *argv, *extra],
                env=env,
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    rc = _await_workers(workers)
    if stopping:
        log.info("%s during startup: stopping the workers", signal.Signals(stopping[0]).name)
        _stop_workers(workers, args.grace)
        return 0
    if rc:
        _stop_workers(workers, args.grace)
        return rc
    announce(f"Server listening on {host} ({args.workers} workers)", args.log_format)
    while True:
        wake.wait(1.0)
        wake.clear()
        while events:
            signum = events.pop(0)
            if signum == signal.SIGHUP:
                for w in workers:
                    if w.poll() is None:
                        w.send_signal(signal.SIGHUP)
                continue
            log.info("%s: stopping %d workers", signal.Signals(signum).name, len(workers))
            return 0 if _stop_workers(workers, args.grace, send=False) else 1
        dead = [w for w in workers if w.poll() is not None]
        if dead:
            log.error("worker pid %d exited with %s; stopping the others", dead[0].pid, dead[0].returncode)
            _stop_workers(workers, args.grace)
            return 1


def _await_workers(workers: list[subprocess.Popen[str]]) -> int:
    """0 once every worker said it listens; else the exit status of the first that failed."""
    for w in workers:
        assert w.stdout is not None
        for line in w.stdout:
            if "Server listening on" in line:  # a text or a JSON line
                break
        else:
            return w.wait() or 2
        # keep draining, so that a worker never blocks on a full pipe
        threading.Thread(target=w.stdout.read, daemon=True).start()
    return 0


def _stop_workers(workers: list[subprocess.Popen[str]], grace: float, *, send: bool = True) -> bool:
    """SIGTERM to each worker (unless already sent), then wait (drain time + a margin); True if all
    exited 0."""
    for w in workers:
        if send and w.poll() is None:
            w.send_signal(signal.SIGTERM)
    ok = True
    for w in workers:
        try:
            ok = w.wait(timeout=grace + 15) == 0 and ok
        except subprocess.TimeoutExpired:
            w.kill()
            w.wait()
            ok = False
    return ok


if __name__ == "__main__":
    sys.exit(main())
