"""The asps.v1 wire protocol, once: labels, the signed transcript, the HPKE suite, seal and open.

Who may import it: both sides (asps_client in the enclave, asps_server on the tenant's machine) and
tests.  It imports only the generated stubs (for SecretBundle) and `cryptography`, so it travels
into enclave images.  README "Protocol" describes these bytes; this module is their one copy.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from typing import Any

from cryptography.hazmat.primitives import hashes, hpke
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

import asps_pb2

TRANSCRIPT_LABEL = b"asps/v1 get-secrets"
SEAL_INFO_LABEL = b"asps/v1 sealed-secrets"
# RSA evidence keys sign with PSS over SHA-256, MGF1-SHA-256 and a 32-byte salt.
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)


class UnsupportedKey(ValueError):
    """The evidence key cannot take part: not EC or RSA (signing), not EC P-256/P-384 (sealing)."""


class OpenError(ValueError):
    """A sealed reply that does not open with this key, or whose plaintext is not a SecretBundle."""


def transcript(token: bytes, evidence_der: bytes, names: Sequence[str], *,
               evidence_digest: bytes | None = None) -> bytes:
    """The signed bytes: label, u32be-length-prefixed token, SHA256(evidence DER), names.

    `evidence_digest` stands in for SHA256(evidence_der) when only the digest is at hand (the
    server's evidence cache keeps no DER)."""
    digest = hashlib.sha256(evidence_der).digest() if evidence_digest is None else evidence_digest
    parts = [TRANSCRIPT_LABEL, struct.pack(">I", len(token)), token, digest, struct.pack(">I", len(names))]
    for name in names:
        raw = name.encode("utf-8")
        parts += [struct.pack(">I", len(raw)), raw]
    return b"".join(parts)


def sign_transcript(private_key: Any, data: bytes) -> bytes:
    """ECDSA-SHA256 (DER) for EC keys, RSA-PSS-SHA256 for RSA keys."""
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        return private_key.sign(data, ec.ECDSA(hashes.SHA256()))
    if isinstance(private_key, rsa.RSAPrivateKey):
        return private_key.sign(data, _PSS, hashes.SHA256())
    raise UnsupportedKey("evidence key must be EC or RSA")


def verify_transcript_signature(public_key: Any, signature: bytes, data: bytes) -> None:
    """The inverse of sign_transcript: raises InvalidSignature (or ValueError for a malformed one),
    UnsupportedKey for a key that is neither EC nor RSA."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    elif isinstance(public_key, rsa.RSAPublicKey):
        public_key.verify(signature, data, _PSS, hashes.SHA256())
    else:
        raise UnsupportedKey("evidence key type is not EC or RSA")


def hpke_suite(key: Any) -> hpke.Suite:
    """The HPKE suite for an evidence key (public or private): P-256 and P-384 only."""
    curve = getattr(key, "curve", None)
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        if isinstance(curve, ec.SECP256R1):
            return hpke.Suite(hpke.KEM.P256, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
        if isinstance(curve, ec.SECP384R1):
            return hpke.Suite(hpke.KEM.P384, hpke.KDF.HKDF_SHA384, hpke.AEAD.AES_256_GCM)
    raise UnsupportedKey("only EC P-256 and P-384 evidence keys can receive sealed secrets")


def seal(suite: hpke.Suite, public_key: Any, values: dict[str, bytes], token: bytes) -> bytes:
    """SecretBundle (deterministic protobuf) sealed to the evidence key; `info` binds the token."""
    bundle = asps_pb2.SecretBundle(secrets=values).SerializeToString(deterministic=True)
    return suite.encrypt(bundle, public_key, info=SEAL_INFO_LABEL + token)


def open_sealed(suite: hpke.Suite | None, private_key: Any, sealed: bytes, token: bytes) -> dict[str, bytes]:
    """The inverse of `seal` (suite None: the evidence key's own).  Raises OpenError only."""
    try:
        plain = (suite or hpke_suite(private_key)).decrypt(sealed, private_key, info=SEAL_INFO_LABEL + token)
    except Exception as e:  # InvalidTag, truncated enc, a key that cannot open: all mean the same
        raise OpenError(
            f"cannot open the sealed bundle ({type(e).__name__}): not sealed to this enclave's key"
        ) from None
    try:
        return dict(asps_pb2.SecretBundle.FromString(plain).secrets)
    except Exception:
        raise OpenError("the sealed bundle is not a SecretBundle") from None
