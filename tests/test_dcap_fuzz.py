"""Property tests: whatever the bytes, parse_quote raises only QuoteError and verify only DcapError."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dcap
import dcap_quote
from dcap_collateral import Collateral

SAMPLES = Path(__file__).resolve().parent.parent.parent / "shared" / "samples"
QUOTES = [*sorted(SAMPLES.glob("real-dcap/*/quote.bin")), SAMPLES / "intel-sgx-v3" / "quote.bin"]
REAL = [p.read_bytes() for p in QUOTES]
TDX = [p.read_bytes() for p in sorted(SAMPLES.glob("real-dcap/tdx/*/quote.bin"))]
V3 = SAMPLES / "intel-sgx-v3"
V3_QUOTE = (V3 / "quote.bin").read_bytes()
V3_COLL = Collateral.from_json((V3 / "collateral.json").read_text())
V3_NOW = json.loads((V3 / "expected.json").read_text())["now"]

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def parse_only_quote_error(data: bytes) -> dcap_quote.Quote | None:
    try:
        q = dcap_quote.parse_quote(data)
    except dcap_quote.QuoteError:
        return None
    assert q.to_bytes() == data  # anything accepted round-trips exactly
    return q


@st.composite
def mutated(draw, sources=REAL + TDX) -> bytes:
    data = bytearray(draw(st.sampled_from(sources)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "extend", "u16", "u32"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
        elif kind == "truncate":
            del data[pos:]
        elif kind == "extend":
            data += draw(st.binary(min_size=1, max_size=16))
        elif kind in ("u16", "u32"):
            # length and enum fields: header, sizes at 432, QE auth size, certification data type/size
            size = 2 if kind == "u16" else 4
            at = draw(st.sampled_from([0, 2, 4, 8, 10, 432, 1012, 1014, 1046, 1048, 1050]))
            value = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 0x81, 0xFF, 0xFFFF, (1 << (8 * size)) - 1]))
            if at + size <= len(data):
                data[at : at + size] = value.to_bytes(size, "little")
    return bytes(data)


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_parse(data):
    parse_only_quote_error(data)


@FUZZ
@given(st.binary(min_size=48, max_size=48), st.binary(max_size=600))
def test_random_bytes_behind_a_plausible_header(header, rest):
    h = bytearray(header)
    h[0:8] = bytes([3, 0, 2, 0, 0, 0, 0, 0])
    parse_only_quote_error(bytes(h) + rest)


@FUZZ
@given(mutated())
def test_mutated_real_quotes_parse(data):
    parse_only_quote_error(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(sources=[V3_QUOTE]))
def test_mutated_quotes_verify_only_dcap_errors(data):
    try:
        r = dcap.verify(data, V3_COLL, now=V3_NOW)
    except dcap.DcapError:
        return
    # accepted: then the signed part and the report are the genuine ones
    assert r.quote.signed_bytes == V3_QUOTE[:432]


@FUZZ
@given(st.integers(0, 1 << 40) | st.sampled_from([V3_NOW, 0, -1, 1 << 62]))
def test_any_time_verifies_or_raises_verification_error(now):
    try:
        dcap.verify(V3_QUOTE, V3_COLL, now=now)
    except dcap.VerificationError as exc:
        assert exc.check
    except OverflowError:  # pragma: no cover - a failure: times must never overflow
        pytest.fail("overflow")


def json_values(depth: int = 2):
    scalars = st.none() | st.booleans() | st.integers(-5, 70000) | st.text(max_size=20)
    return st.recursive(
        scalars,
        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
        max_leaves=8,
    )


TCB_TEMPLATE = json.loads(V3_COLL.tcb_info)
QE_TEMPLATE = json.loads(V3_COLL.qe_identity)


@st.composite
def edited(draw, template: dict) -> str:
    obj = json.loads(json.dumps(template))
    for _ in range(draw(st.integers(1, 3))):
        target = obj
        if draw(st.booleans()) and isinstance(obj.get("tcbLevels"), list) and obj["tcbLevels"]:
            target = draw(st.sampled_from(obj["tcbLevels"]))
            if draw(st.booleans()):
                target = (
                    target["tcb"]
                    if isinstance(target, dict) and isinstance(target.get("tcb"), dict)
                    else target
                )
        if not isinstance(target, dict) or not target:
            continue
        key = draw(st.sampled_from(sorted(target)))
        if draw(st.booleans()):
            del target[key]
        else:
            target[key] = draw(json_values())
    return json.dumps(obj, separators=(",", ":"))


@FUZZ
@given(edited(TCB_TEMPLATE), edited(QE_TEMPLATE), st.text(max_size=50))
def test_collateral_json_parsers_raise_only_collateral_error(tcb, qe, junk):
    for fn, text in (
        (dcap.parse_tcb_info, tcb),
        (dcap.parse_qe_identity, qe),
        (dcap.parse_tcb_info, junk),
        (dcap.parse_qe_identity, junk),
    ):
        with contextlib.suppress(dcap.CollateralError):
            fn(text)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    sgxsim = pytest.importorskip("sgxsim")
    return sgxsim.SimPlatform.init(tmp_path_factory.mktemp("sim-fuzz"))


def test_signed_garbage_collateral_is_only_dcap_errors(sim):
    """Collateral that is validly signed but malformed inside (the sim signs whatever it is given)."""
    import time

    quote = sim.make_quote(bytes(64))
    issue = int(time.time()) - 3600
    tcb = sim.tcb_info_dict(issue=issue)
    qe = sim.qe_identity_dict(issue=issue)

    @settings(
        max_examples=150,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(edited(tcb), edited(qe), st.booleans())
    def run(tcb_text, qe_text, which):
        coll = sim.build_collateral(
            issue=issue, tcb_info=tcb_text if which else None, qe_identity=None if which else qe_text
        )
        try:
            r = dcap.verify(quote, coll, root_ca=sim.root_ca_der)
        except dcap.DcapError:
            return
        assert r.status in dcap.TCB_STATUSES

    run()


@FUZZ
@given(st.binary(max_size=300))
def test_sgx_extension_reader_raises_only_value_error(data):
    with contextlib.suppress(ValueError):
        dcap.parse_sgx_extension(data)
