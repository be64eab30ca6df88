"""Certificate paths for Intel's DCAP PKI (PCK, TCB signing, QE identity, PCK CRL issuer); dcap only.

A chain arrives as a bag of certificates (a quote's certification data, a PCCS issuer-chain header) in
whatever order its producer wrote them, sometimes with extras.  Like Intel's QVL (CertificateChain.cpp
finds the root, the intermediate and the PCK certificate by name, not by position), the path here is
built from subject/issuer names and keys, in any order, and extras that are not on the path are ignored.

Path validation is pyca/cryptography's (`cryptography.x509.verification`, RFC 5280 path building and
validation: signatures, names, basicConstraints cA on every issuer, pathLenConstraint, unknown critical
extensions refused, validity at the given instant).  Its Web PKI profile does not fit Intel's
certificates as is: the client profile requires a subjectAltName and an extendedKeyUsage that no PCK
or TCB signing certificate carries, so the extension policies are built here from `permit_all()`
with the rules RFC 5280 sets and Intel's certificates meet: CA certificates carry basicConstraints
cA=TRUE (critical) and, when they carry keyUsage, keyCertSign; end-entity certificates are not CAs
and, when they carry keyUsage, have digitalSignature (they sign QE reports and JSON).  The Intel
checks that no profile knows (the root inside the chain and byte-identical to the trusted root, CN
phrases, the path's exact shape) are added here; the SGX extension, CRL issuers and the PCE-ID
binding are checked by dcap.

Time: the verifier caches a validated path by its bytes, and checks the validity windows against each
verification's `now` itself.  pyca needs one instant, so the path is validated at the latest notBefore
among the certificates that can be on it (the moment from which it can be valid at all).  The caller
MUST check every returned certificate's validity window (and the root's) against `now`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
)
from cryptography.x509.verification import VerificationError as _PycaError

# Longest path pyca may build (leaf and intermediates, not the anchor).  Generous on purpose: a path
# longer than Intel's shape is then refused for its real fault (a path length constraint) or by the
# shape check, not as "no path found".
MAX_DEPTH = 4


class ChainError(Exception):
    """The certificates do not form a valid path to the trusted root; the message says why."""


@dataclass(frozen=True, slots=True)
class PathSpec:
    """What one of Intel's chains must look like.  `leaf_phrase`: the CN phrase that picks the leaf
    (Intel QVL X509Constants); `ca_phrases`: CN phrase of each CA between leaf and root, leaf side
    first; `leaf_is_ca`: the leaf is itself a CA (the PCK CRL issuer chain ends in the CRL's issuer)."""

    leaf_phrase: str
    ca_phrases: tuple[str, ...]
    leaf_is_ca: bool = False


def _cn(cert: x509.Certificate) -> str:
    try:
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:
        return ""
    return str(cns[0].value) if cns else ""


def _self_issued(cert: x509.Certificate) -> bool:
    return cert.subject == cert.issuer


# -- extension policies: RFC 5280 rules, on pyca's permit_all base ----------------------------------


def _ca_basic_constraints(_policy: object, cert: x509.Certificate, bc: x509.BasicConstraints) -> None:
    if not bc.ca:  # pyca refuses this for issuers itself; the leaf of a CA-ended path needs it here
        raise ValueError(f"basicConstraints of {_cn(cert)!r} does not assert cA")


def _ca_key_usage(_policy: object, cert: x509.Certificate, ku: x509.KeyUsage | None) -> None:
    if ku is not None and not ku.key_cert_sign:
        raise ValueError(f"keyUsage of CA {_cn(cert)!r} lacks keyCertSign")


def _crl_issuer_key_usage(_policy: object, cert: x509.Certificate, ku: x509.KeyUsage | None) -> None:
    if ku is not None and not ku.crl_sign:
        raise ValueError(f"keyUsage of CRL issuer {_cn(cert)!r} lacks cRLSign")


def _ee_basic_constraints(_policy: object, cert: x509.Certificate, bc: x509.BasicConstraints | None) -> None:
    if bc is not None and bc.ca:
        raise ValueError(f"leaf certificate {_cn(cert)!r} is a CA (basicConstraints cA=TRUE)")


def _ee_key_usage(_policy: object, cert: x509.Certificate, ku: x509.KeyUsage | None) -> None:
    if ku is not None and not ku.digital_signature:
        raise ValueError(f"keyUsage of {_cn(cert)!r} lacks digitalSignature")


def _policies() -> tuple[ExtensionPolicy, ExtensionPolicy, ExtensionPolicy]:
    """(CA policy, end-entity policy, policy for a leaf that is a CRL-issuing CA)."""
    ca = (ExtensionPolicy.permit_all()
          .require_present(x509.BasicConstraints, Criticality.CRITICAL, None)
          .may_be_present(x509.KeyUsage, Criticality.AGNOSTIC, _ca_key_usage))
    ee = (ExtensionPolicy.permit_all()
          .may_be_present(x509.BasicConstraints, Criticality.AGNOSTIC, _ee_basic_constraints)
          .may_be_present(x509.KeyUsage, Criticality.AGNOSTIC, _ee_key_usage))
    crl_ca = (ExtensionPolicy.permit_all()
              .require_present(x509.BasicConstraints, Criticality.CRITICAL, _ca_basic_constraints)
              .may_be_present(x509.KeyUsage, Criticality.AGNOSTIC, _crl_issuer_key_usage))
    return ca, ee, crl_ca


_CA_POLICY, _EE_POLICY, _CRL_CA_POLICY = _policies()


def check_crl_signer(cert: x509.Certificate) -> None:
    """RFC 5280 6.3.3 (f): a CRL issuer's keyUsage, when present, must allow cRLSign."""
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    _crl_issuer_key_usage(None, cert, ku)


# -- path building ----------------------------------------------------------------------------------


def _reason(exc: Exception) -> str:
    """pyca's message, with the rule it broke named first (the refusal should say which rule)."""
    text = str(exc)
    cut = text.find(" (encountered processing")
    if cut >= 0:
        text = text[:cut]
    for noise in ("validation failed: ", "Python extension validator failed: ValueError: "):
        text = text.replace(noise, "")
    for needle, rule in (("path length", "path length constraint"),
                         ("basicConstraints", "basic constraints"),
                         ("critical extension", "unknown critical extension"),
                         ("keyUsage", "key usage"),
                         ("signature", "signature"),
                         ("expired", "validity"), ("not yet valid", "validity"),
                         ("candidates exhausted", "no path to the trusted root")):
        if needle in text:
            return f"{rule}: {text}"
    return text


def _name_path(leaf: x509.Certificate, certs: Sequence[x509.Certificate],
               root: x509.Certificate) -> list[x509.Certificate]:
    """Certificates a path from `leaf` can use, found by issuer name (leaf first, then every certificate
    named like each next issuer; the root last)."""
    by_subject: dict[x509.Name, list[x509.Certificate]] = {}
    for c in certs:
        if not _self_issued(c):
            by_subject.setdefault(c.subject, []).append(c)
    on_path = [leaf]
    seen = {leaf.subject}
    name = leaf.issuer
    while name not in seen and name != root.subject:
        seen.add(name)
        issuers = by_subject.get(name, [])
        on_path.extend(issuers)
        if len(issuers) != 1:
            break
        name = issuers[0].issuer
    return [*on_path, root]


def build_path(certs: Sequence[x509.Certificate], root: x509.Certificate, spec: PathSpec,
               root_der: bytes) -> list[x509.Certificate]:
    """The path leaf -> ... -> root from `certs` (any order, extras ignored), validated as RFC 5280
    asks and shaped as `spec` says.  Returns the path without the root.  ChainError when there is none.

    Intel's own rules first: the chain must contain its root (STATUS_SGX_ROOT_CA_MISSING), and that
    root must be the trusted one (Intel compares signatures; here the whole DER)."""
    roots = [c for c in certs if _self_issued(c)]
    if not roots:
        raise ChainError("chain does not include its root CA")
    if not any(c.public_bytes(Encoding.DER) == root_der for c in roots):
        raise ChainError(f"chain's root {_cn(roots[0])!r} is not the trusted root")
    leaves = [c for c in certs if not _self_issued(c) and spec.leaf_phrase in _cn(c)
              and (spec.leaf_is_ca or not _is_ca(c))]
    if not leaves:
        leaves = [c for c in certs if not _self_issued(c) and spec.leaf_phrase in _cn(c)]
    if not leaves:
        raise ChainError(f"no certificate whose CN contains {spec.leaf_phrase!r}")
    first_error: ChainError | None = None
    for leaf in leaves:
        try:
            return _validate(leaf, certs, root, spec)
        except ChainError as exc:
            first_error = first_error or exc
    assert first_error is not None
    raise first_error


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except (x509.ExtensionNotFound, ValueError):
        return False


def _validate(leaf: x509.Certificate, certs: Sequence[x509.Certificate], root: x509.Certificate,
              spec: PathSpec) -> list[x509.Certificate]:
    others = [c for c in certs if c is not leaf]
    named = _name_path(leaf, others, root)
    at = max(c.not_valid_before_utc for c in named)
    if at > min(c.not_valid_after_utc for c in named):
        # Never valid at one instant (a leaf that expired before its CA's notBefore, say): no time to
        # validate at.  The certificates are returned after the shape check only; the caller's validity
        # check at `now`, which must fail for them, names the one at fault.
        return _shaped(named[:-1], leaf, spec)
    builder = (PolicyBuilder().store(Store([root])).time(at).max_chain_depth(MAX_DEPTH)
               .extension_policies(ca_policy=_CA_POLICY,
                                   ee_policy=_CRL_CA_POLICY if spec.leaf_is_ca else _EE_POLICY))
    try:
        chain = builder.build_client_verifier().verify(leaf, others).chain
    except _PycaError as exc:
        raise ChainError(f"{_cn(leaf)!r}: {_reason(exc)}") from None
    return _shaped(list(chain[:-1]), leaf, spec)


def _shaped(path: list[x509.Certificate], leaf: x509.Certificate, spec: PathSpec) -> list[x509.Certificate]:
    if len(path) != 1 + len(spec.ca_phrases):
        raise ChainError(f"expected {len(spec.ca_phrases)} CA certificate(s) between {_cn(leaf)!r} and the "
                         f"root, the path has {len(path) - 1}")
    for cert, phrase in zip(path[1:], spec.ca_phrases, strict=True):
        if phrase not in _cn(cert):
            raise ChainError(f"certificate CN {_cn(cert)!r} does not contain {phrase!r}")
    return path
