"""The TDX quote format: v4 and v5 layouts, body descriptors, TD report 1.0 / 1.5, padding; every
malformation a QuoteError naming the field."""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import pytest

import dcap_quote

SAMPLES = Path(__file__).resolve().parent.parent.parent / "shared" / "samples"
V4 = (SAMPLES / "real-dcap" / "tdx" / "near-mpc-b0c06f-2026" / "quote.bin").read_bytes()
V5 = (SAMPLES / "real-dcap" / "tdx" / "go-tdx-guest-90c06f-v5-2026" / "quote.bin").read_bytes()


def quote_error(data: bytes, *fragments: str) -> str:
    with pytest.raises(dcap_quote.QuoteError) as info:
        dcap_quote.parse_quote(data)
    msg = str(info.value)
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


def patch(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


def test_layouts_and_signed_bytes():
    q4, q5 = dcap_quote.parse_quote(V4), dcap_quote.parse_quote(V5)
    assert (q4.version, q4.body_type, q4.report.is_v15, q4.report.size) == (4, 2, False, 584)
    assert (q5.version, q5.body_type, q5.report.is_v15, q5.report.size) == (5, 3, True, 648)
    assert q4.signed_bytes == V4[:48 + 584] and q5.signed_bytes == V5[:48 + 6 + 648]
    # rebuilt from the fields alone (no raw): the same bytes, signed part included
    for q, raw in ((q4, V4), (q5, V5)):
        bare = dataclasses.replace(q, raw=b"")
        assert bare.to_bytes() == raw and bare.signed_bytes == q.signed_bytes
    assert q5.report.tdx_module_version == (q5.report.tee_tcb_svn[1], q5.report.tee_tcb_svn[0])
    assert q5.report.rtmrs == (q5.report.rtmr0, q5.report.rtmr1, q5.report.rtmr2, q5.report.rtmr3)


def test_td_report_1_0_and_1_5_fields_in_wire_order():
    q = dcap_quote.parse_quote(V5)
    body = V5[54:54 + 648]
    off = 0
    for name, size in (("tee_tcb_svn", 16), ("mr_seam", 48), ("mr_signer_seam", 48), ("seam_attributes", 8),
                       ("td_attributes", 8), ("xfam", 8), ("mr_td", 48), ("mr_config_id", 48),
                       ("mr_owner", 48), ("mr_owner_config", 48), ("rtmr0", 48), ("rtmr1", 48),
                       ("rtmr2", 48), ("rtmr3", 48), ("report_data", 64), ("tee_tcb_svn_2", 16),
                       ("mr_service_td", 48)):
        assert getattr(q.report, name) == body[off:off + size], name
        off += size
    assert off == 648
    assert list(q.report.to_dict())[-2:] == ["tee_tcb_svn_2", "mr_service_td"]


def test_padding_round_trips_and_only_zeros_are_padding():
    q = dcap_quote.parse_quote(V4 + bytes(3065))
    assert q.padding == 3065 and q.to_bytes() == V4 + bytes(3065)
    assert q.signature == dcap_quote.parse_quote(V4).signature
    quote_error(V4 + bytes(10) + b"\x01", "signature_data.size", "not zero padding")
    quote_error(V5 + b"\xff", "not zero padding")


@pytest.mark.parametrize("body_type", [0, 4, 0xFFFF])
def test_v5_unknown_body_type(body_type):
    quote_error(patch(V5, 48, "<H", body_type), "body.type", "unsupported body type")


def test_v5_body_type_must_go_with_tee_type_and_size():
    quote_error(patch(V5, 48, "<H", 1), "body.type", "does not go with TEE type")
    quote_error(patch(V5, 50, "<I", 584), "body.size", "648")
    sgx = patch(patch(V5, 4, "<I", 0), 48, "<H", 2)
    quote_error(sgx, "body.type", "does not go with TEE type 0x0")


def test_v5_td_report_1_0_body():
    """A v5 quote with body type 2 (TD report 1.0) parses, and serializes back."""
    q = dcap_quote.parse_quote(V4)
    v5 = dataclasses.replace(q, header=dataclasses.replace(q.header, version=5), raw=b"")
    raw = v5.to_bytes()
    assert raw[48:54] == struct.pack("<HI", 2, 584)
    back = dcap_quote.parse_quote(raw)
    assert back.body_type == 2 and back.report == q.report and back.to_bytes() == raw


def test_tdx_v3_and_unknown_versions_are_refused():
    quote_error(patch(V4, 0, "<H", 3), "header.version", "TDX quote is version 4 or 5")
    quote_error(patch(V4, 0, "<H", 6), "header.version", "unsupported quote version 6")


def test_truncations_of_td_quotes_are_quote_errors():
    for raw in (V4, V5):
        for n in range(0, len(raw), 13):
            quote_error(raw[:n])


def test_td_report_to_bytes_checks_its_fields():
    q = dcap_quote.parse_quote(V5)
    with pytest.raises(dcap_quote.QuoteError, match=r"td_report\.mr_td"):
        dataclasses.replace(q.report, mr_td=b"short").to_bytes()
    with pytest.raises(dcap_quote.QuoteError, match="come together"):
        dataclasses.replace(q.report, mr_service_td=None).to_bytes()
    with pytest.raises(dcap_quote.QuoteError, match="td_report: must be 584 or 648"):
        dcap_quote.TdReport.from_bytes(bytes(600))
