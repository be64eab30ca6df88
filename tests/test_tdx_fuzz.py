"""Property tests for the TDX parsers: whatever the bytes, parse_quote raises only QuoteError (and what
it accepts round-trips), parse_tcb_info on a TDX TCB info only CollateralError, and verify of a
mutated TD quote only DcapError."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dcap
import dcap_quote
from dcap_collateral import Collateral

SAMPLES = Path(__file__).resolve().parent.parent.parent / "shared" / "samples"
TD_CASES = [p.parent for p in sorted(SAMPLES.glob("real-dcap/tdx/*/quote.bin"))]
TD_QUOTES = [(p / "quote.bin").read_bytes() for p in TD_CASES]
PADDED = (SAMPLES / "realworld2" / "dcapqvl-tdx-b0c06f-uptodate" / "quote.bin").read_bytes()
V5 = (SAMPLES / "realworld2" / "trustee-tdx5-v5-90c06f" / "quote.bin").read_bytes()
SOURCES = [*TD_QUOTES, PADDED, V5]
CASE = SAMPLES / "real-dcap" / "tdx" / "near-mpc-b0c06f-2026"
COLL = Collateral.from_json((CASE / "collateral.json").read_text())
NOW = json.loads((CASE / "expected.json").read_text())["now"]
TCB_TEXT = COLL.tcb_info

FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# where a TD quote keeps its length and enum fields: header version / key type / TEE type, the v5 body
# descriptor (48: type, 50: size), the signature data size after a TD report 1.0 / 1.5 / v5 1.5
FIELDS = [0, 2, 4, 48, 50, 48 + 584, 54 + 648, 54 + 584]


def parse_only_quote_error(data: bytes) -> dcap_quote.Quote | None:
    try:
        q = dcap_quote.parse_quote(data)
    except dcap_quote.QuoteError as exc:
        assert str(exc).split(":")[0].split(".")[0] in (
            "quote", "header", "body", "report", "td_report", "signature_data",
            "qe_report_certification_data", "certification_data"), str(exc)
        return None
    assert q.to_bytes() == data
    if q.padding:
        assert data.endswith(bytes(q.padding))
    return q


@st.composite
def mutated_td(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SOURCES)))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "truncate", "extend", "zeros", "u16", "u32"]))
        pos = draw(st.integers(0, len(data) - 1)) if data else 0
        if kind == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "extend":
            data += draw(st.binary(min_size=1, max_size=16))
        elif kind == "zeros":
            data += bytes(draw(st.integers(1, 4000)))
        else:
            size = 2 if kind == "u16" else 4
            at = draw(st.sampled_from(FIELDS))
            value = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 0x81, 384, 584, 648, 0xFFFF,
                                          (1 << (8 * size)) - 1]))
            if at + size <= len(data):
                data[at:at + size] = value.to_bytes(size, "little")
    return bytes(data)


@FUZZ
@given(mutated_td())
def test_mutated_td_quotes_parse_or_raise_quote_error(data):
    parse_only_quote_error(data)


@FUZZ
@given(st.sampled_from([4, 5]), st.sampled_from([0, 1, 2, 3, 4, 0xFFFF]), st.integers(0, 0xFFFFFFFF),
       st.binary(max_size=1200))
def test_random_bodies_behind_a_td_header(version, body_type, size, rest):
    header = struct.pack("<HHIHH", version, 2, 0x81, 0, 0) + bytes(36)
    descriptor = struct.pack("<HI", body_type, size) if version == 5 else b""
    parse_only_quote_error(header + descriptor + rest)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_td())
def test_mutated_td_quotes_verify_or_raise_dcap_error(data):
    try:
        r = dcap.verify(data, COLL, now=NOW)
    except dcap.DcapError:
        return
    assert r.tee_type == "TDX" and r.status in (*dcap.TCB_STATUSES, *dcap.TD_RELAUNCH_STATUSES)


def _tcb_paths(obj, path=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tcb_paths(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _tcb_paths(v, (*path, i))
    yield path


TCB_DOC = json.loads(TCB_TEXT)
TCB_PATHS = [p for p in _tcb_paths(TCB_DOC) if p]
ODD_VALUES = [None, -1, 256, 1 << 40, "", "zz", "00" * 47, [], {}, True, 1.5, "UpToDate", "Bogus"]


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(TCB_PATHS), st.sampled_from([*ODD_VALUES, "DELETE"])),
                min_size=1, max_size=3))
def test_tdx_tcb_info_field_mutations_raise_only_collateral_error(edits):
    doc = json.loads(TCB_TEXT)
    for path, value in edits:
        target = doc
        try:
            for key in path[:-1]:
                target = target[key]
            if value == "DELETE":
                del target[path[-1]]
            else:
                target[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue
    try:
        tcb = dcap.parse_tcb_info(json.dumps(doc))
    except dcap.CollateralError:
        return
    assert tcb.levels and all(len(lv.tdx_svns) in (0, 16) for lv in tcb.levels)


@FUZZ
@given(st.binary(max_size=700))
def test_td_report_from_bytes(data):
    try:
        r = dcap_quote.TdReport.from_bytes(data)
    except dcap_quote.QuoteError as exc:
        assert str(exc).startswith("td_report")
        return
    assert r.to_bytes() == data
