"""Property tests for the TD evidence readers: whatever the bytes of a DICE tagged evidence carrying a
TD quote, or of a dstack quote extension, verify_evidence raises only EvidenceError, and what it
accepts is the original TD; TdReferenceValues.from_dict raises only ReferenceValuesError and
round-trips what it accepts."""

from __future__ import annotations

import datetime as dt
import hashlib
import json

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from der_writer import tlv
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dcap
import policy
import ratls
import ratls_attest
import sgxsim

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
KEY = ec.generate_private_key(ec.SECP256R1())
CA_KEY = ec.generate_private_key(ec.SECP256R1())
SPKI = ratls_attest.spki_der(KEY.public_key())


@pytest.fixture(scope="module")
def td(sim_platform):
    """(verifier, valid DICE evidence value, valid dstack extension value) for KEY."""
    verifier = dcap.Verifier(sim_platform.tdx_collateral(), root_ca=sim_platform.root_ca_der)
    claims = ratls_attest.dice_claims(KEY.public_key())
    dice = ratls_attest.dice_evidence(sim_platform.make_td_quote(hashlib.sha256(claims).digest() + bytes(32)),
                                      claims)
    dstack = tlv(0x04, sim_platform.make_td_quote(ratls.dstack_report_data(SPKI)))
    return verifier, dice, dstack


def cert(oid: str, value: bytes, *, ca: bool) -> bytes:
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "td")])
    issuer = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "ca")]) if ca else name
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(issuer).serial_number(1)
            .public_key(KEY.public_key()).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value), False)
            .sign(CA_KEY if ca else KEY, hashes.SHA256()).public_bytes(serialization.Encoding.DER))


def verify_only_evidence_error(der: bytes, verifier) -> ratls.Identity | None:
    try:
        return ratls.verify_evidence(der, verifier)
    except ratls.EvidenceError as exc:
        assert exc.step and str(exc).startswith(exc.step)
        return None


def mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    out = bytearray(data)
    for pos, byte in edits:
        out[pos % len(out)] = byte
    return bytes(out[:cut] if cut is not None else out)


EDITS = st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=4)
CUT = st.none() | st.integers(0, 6000)


def test_the_unmutated_evidence_is_accepted(td):
    verifier, dice, dstack = td
    dice_cert = cert(ratls.OID_TCG_DICE_TAGGED_EVIDENCE, dice, ca=False)
    assert ratls.verify_evidence(dice_cert, verifier).tee == "tdx"
    assert ratls.verify_evidence(cert(ratls.OID_DSTACK_QUOTE, dstack, ca=True), verifier).tee == "tdx"


@FUZZ
@given(edits=EDITS, cut=CUT)
def test_mutated_dice_td_evidence_raises_only_evidence_error(td, edits, cut):
    verifier, dice, _ = td
    mutated = mutate(dice, edits, cut)
    ident = verify_only_evidence_error(cert(ratls.OID_TCG_DICE_TAGGED_EVIDENCE, mutated, ca=False), verifier)
    if ident is not None:  # only an edit that changed nothing the quote or claims mean may pass
        assert ident.mr_td == sgxsim.DEFAULT_MR_TD
        assert ident.public_key.public_numbers() == KEY.public_key().public_numbers()


@FUZZ
@given(edits=EDITS, cut=CUT)
def test_mutated_dstack_extension_raises_only_evidence_error(td, edits, cut):
    verifier, _, dstack = td
    der = cert(ratls.OID_DSTACK_QUOTE, mutate(dstack, edits, cut), ca=True)
    ident = verify_only_evidence_error(der, verifier)
    if ident is not None:
        assert ident.mr_td == sgxsim.DEFAULT_MR_TD and ident.evidence_format == "dstack"


@FUZZ
@given(st.binary(max_size=2000))
def test_random_dstack_extension_bytes_raise_only_evidence_error(td, value):
    assert verify_only_evidence_error(cert(ratls.OID_DSTACK_QUOTE, value, ca=True), td[0]) is None


_HEX = st.text("0123456789abcdefABCDEF", max_size=100)
_VALUE = st.one_of(_HEX, st.integers(-5, 1 << 70), st.booleans(), st.none(),
                   st.lists(st.text(max_size=30), max_size=3),
                   st.sampled_from([hashlib.sha384(b"x").hexdigest(), "00" * 8, "00" * 16]))


@FUZZ
@given(st.dictionaries(st.sampled_from([*policy.TD_REFERENCE_VALUE_KEYS, "mr_enclave", "rtmr4"]), _VALUE,
                       max_size=6))
def test_td_reference_values_raise_only_their_error(d):
    try:
        rv = policy.TdReferenceValues.from_dict(d, where="app t")
    except policy.ReferenceValuesError as exc:
        assert str(exc).startswith("app t")
        return
    assert policy.TdReferenceValues.from_dict(json.loads(json.dumps(rv.to_dict()))) == rv
