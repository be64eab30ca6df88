"""Quote format: parse_quote / to_bytes on real quotes, v4 layout, and every malformation -> QuoteError."""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import pytest

import dcap
import dcap_quote
from dcap_collateral import Collateral

# Field names a QuoteError message may start with (the message names the field).
FIELD_PREFIXES = (
    "quote",
    "header",
    "body",
    "report",
    "td_report",
    "signature_data",
    "qe_report_certification_data",
    "certification_data",
)


def sgx_cases(samples: Path) -> list[Path]:
    cases = [p for p in sorted((samples / "real-dcap").iterdir()) if (p / "quote.bin").is_file()]
    cases.append(samples / "intel-sgx-v3")
    cases += [p for p in sorted((samples / "ratls-real").iterdir()) if (p / "quote.bin").is_file()]
    return cases


@pytest.fixture(scope="module")
def real_quotes(samples_dir) -> dict[str, bytes]:
    return {p.name: (p / "quote.bin").read_bytes() for p in sgx_cases(samples_dir)}


@pytest.fixture(scope="module")
def v3(samples_dir) -> bytes:
    return (samples_dir / "intel-sgx-v3" / "quote.bin").read_bytes()


def assert_quote_error(data: bytes, *fragments: str) -> dcap_quote.QuoteError:
    with pytest.raises(dcap_quote.QuoteError) as info:
        dcap_quote.parse_quote(data)
    msg = str(info.value)
    assert msg.startswith(FIELD_PREFIXES), msg
    for f in fragments:
        assert f in msg, (f, msg)
    return info.value


def v4_bytes(
    q: dcap_quote.Quote, *, outer_type: int = 6, inner_type: int | None = None, extra_inner: bytes = b""
) -> bytes:
    """Assemble an SGX v4 quote by hand from the parts of a parsed v3 one (independent of to_bytes)."""
    s = q.signature
    header = bytearray(q.raw[:48])
    header[0:2] = struct.pack("<H", 4)
    cert = s.certification_data
    inner = (
        q.raw[48 + 384 + 4 + 128 : 48 + 384 + 4 + 128 + 384]
        + s.qe_report_signature
        + struct.pack("<H", len(s.qe_auth_data))
        + s.qe_auth_data
        + struct.pack("<HI", cert.type if inner_type is None else inner_type, len(cert.data))
        + cert.data
        + extra_inner
    )
    sig = s.isv_signature + s.attestation_key + struct.pack("<HI", outer_type, len(inner)) + inner
    return bytes(header) + q.raw[48 : 48 + 384] + struct.pack("<I", len(sig)) + sig


# --- real quotes -----------------------------------------------------------------------------------


def test_every_real_sgx_quote_round_trips(real_quotes, samples_dir):
    assert len(real_quotes) >= 10
    for name, raw in real_quotes.items():
        q = dcap_quote.parse_quote(raw)
        assert q.to_bytes() == raw, name
        assert q.raw == raw
        assert q.header.version == dcap_quote.SGX_QUOTE_V3
        assert q.header.tee_type == dcap_quote.TEE_SGX
        assert q.header.attestation_key_type == dcap_quote.ATT_KEY_ECDSA_P256
        assert q.header.qe_vendor_id == dcap_quote.INTEL_QE_VENDOR_ID
        assert q.signature.certification_data.type == 5
        assert b"-----BEGIN CERTIFICATE-----" in q.signature.certification_data.data
        assert q.signed_bytes == raw[:432]
        assert dcap_quote.ReportBody.from_bytes(q.report.to_bytes()) == q.report


def test_report_fields_match_expected(samples_dir):
    for case in sgx_cases(samples_dir):
        exp = json.loads((case / "expected.json").read_text())
        q = dcap_quote.parse_quote((case / "quote.bin").read_bytes())
        assert q.report.mr_enclave.hex() == exp["mr_enclave"], case.name
        assert q.report.mr_signer.hex() == exp["mr_signer"]
        assert q.report.report_data.hex() == exp["report_data"]
        assert q.report.attributes.hex() == exp["attributes"]
        assert q.report.debug is exp["debug"]
        if "isv_prod_id" in exp:
            assert (q.report.isv_prod_id, q.report.isv_svn) == (exp["isv_prod_id"], exp["isv_svn"])


def test_tdx_quotes_parse_to_their_expected_td_fields(samples_dir):
    tdx = sorted((samples_dir / "real-dcap" / "tdx").glob("*/quote.bin"))
    assert len(tdx) == 4
    for path in tdx:
        exp = json.loads((path.parent / "expected.json").read_text())
        q = dcap_quote.parse_quote(path.read_bytes())
        assert q.header.tee_type == dcap_quote.TEE_TDX and q.is_td
        assert q.version == exp["quote_version"]
        for name in ("mr_td", "mr_seam", "tee_tcb_svn", "td_attributes", "rtmr0", "rtmr1", "rtmr2", "rtmr3",
                     "report_data"):
            assert getattr(q.report, name).hex() == exp[name], (path, name)
        assert q.report.debug is exp["debug"]
        assert q.to_bytes() == path.read_bytes()


# --- version 4 -------------------------------------------------------------------------------------


def test_v4_layout_parses_to_the_same_fields_and_round_trips(v3):
    q3 = dcap_quote.parse_quote(v3)
    raw4 = v4_bytes(q3)
    q4 = dcap_quote.parse_quote(raw4)
    assert q4.header.version == 4
    assert q4.report == q3.report
    assert q4.signature == q3.signature  # QE report etc. lifted out of type 6
    assert q4.to_bytes() == raw4
    rebuilt = dataclasses.replace(q3, header=dataclasses.replace(q3.header, version=4), raw=b"")
    assert rebuilt.to_bytes() == raw4


def test_v4_outer_certification_data_must_be_type_6(v3):
    q3 = dcap_quote.parse_quote(v3)
    assert_quote_error(v4_bytes(q3, outer_type=5), "signature_data.certification_data.type", "type 6")


def test_v4_inner_type_6_and_trailing_bytes_are_refused(v3):
    q3 = dcap_quote.parse_quote(v3)
    assert_quote_error(v4_bytes(q3, inner_type=6), "certification_data.type")
    assert_quote_error(v4_bytes(q3, extra_inner=b"\0"), "qe_report_certification_data", "trailing")


# --- malformations ---------------------------------------------------------------------------------


def test_truncation_at_every_offset_is_a_quote_error(v3):
    for n in range(len(v3)):
        assert_quote_error(v3[:n])


def test_truncation_of_v4_at_every_offset_is_a_quote_error(v3):
    raw4 = v4_bytes(dcap_quote.parse_quote(v3))
    for n in range(0, len(raw4), 7):
        assert_quote_error(raw4[:n])


def test_trailing_bytes_are_refused(v3):
    assert_quote_error(v3 + b"\1", "signature_data.size", "not zero padding")
    assert_quote_error(v3 + bytes(5) + b"\1", "signature_data.size", "not zero padding")
    # ...also when the signature data length is bumped to cover them
    n = struct.unpack_from("<I", v3, 432)[0]
    bumped = v3[:432] + struct.pack("<I", n + 3) + v3[436:] + b"abc"
    assert_quote_error(bumped, "signature_data", "trailing")


def patch(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


@pytest.mark.parametrize("version", [0, 1, 2, 6, 0xFFFF])
def test_unsupported_versions(v3, version):
    assert_quote_error(patch(v3, 0, "<H", version), "header.version", str(version))


@pytest.mark.parametrize("key_type", [0, 1, 3, 4, 0xFFFF])
def test_unsupported_attestation_key_types(v3, key_type):
    assert_quote_error(patch(v3, 2, "<H", key_type), "header.attestation_key_type")


@pytest.mark.parametrize("tee", [1, 0x80, 0x82, 0xFFFFFFFF])
def test_unknown_tee_types(v3, tee):
    assert_quote_error(patch(v3, 4, "<I", tee), "header.tee_type")


def test_tdx_tee_type_on_a_v3_quote_names_tdx(v3):
    assert_quote_error(patch(v3, 4, "<I", 0x81), "header.version", "TDX quote is version 4 or 5")


def cert_type_offset(q: dcap_quote.Quote) -> int:
    return 436 + 64 + 64 + 384 + 64 + 2 + len(q.signature.qe_auth_data)


@pytest.mark.parametrize("ctype", [0, 6, 8, 0xFFFF])
def test_bad_certification_data_types(v3, ctype):
    off = cert_type_offset(dcap_quote.parse_quote(v3))
    assert_quote_error(patch(v3, off, "<H", ctype), "certification_data.type")


def test_certification_data_size_mismatch(v3):
    q = dcap_quote.parse_quote(v3)
    off = cert_type_offset(q) + 2
    size = len(q.signature.certification_data.data)
    assert_quote_error(patch(v3, off, "<I", size + 1), "certification_data.data", "truncated")
    assert_quote_error(patch(v3, off, "<I", size - 1), "trailing")
    assert_quote_error(patch(v3, off, "<I", 0xFFFFFFFF), "certification_data.size")


def test_qe_auth_data_size_overflow(v3):
    off = 436 + 64 + 64 + 384 + 64
    assert_quote_error(patch(v3, off, "<H", 0xFFFF), "qe_auth_data")


def test_signature_data_size_mismatch(v3):
    n = struct.unpack_from("<I", v3, 432)[0]
    # one byte short: that byte is not zero padding, or (a NUL-terminated PEM) the chain is cut short
    assert_quote_error(patch(v3, 432, "<I", n - 1), "signature_data")
    assert_quote_error(patch(v3, 432, "<I", 0xFFFFFFFF), "signature_data.size")


def test_non_bytes_input():
    for bad in ("00" * 600, None, 12, [1, 2, 3]):
        with pytest.raises(dcap_quote.QuoteError, match="quote"):
            dcap_quote.parse_quote(bad)  # type: ignore[arg-type]


def test_bytearray_and_memoryview_accepted(v3):
    assert dcap_quote.parse_quote(bytearray(v3)).to_bytes() == v3
    assert dcap_quote.parse_quote(memoryview(v3)).to_bytes() == v3


# --- report body -----------------------------------------------------------------------------------


def test_report_body_layout_and_debug_flag(v3):
    body = dcap_quote.ReportBody.from_bytes(v3[48:432])
    assert body.to_bytes() == v3[48:432]
    assert body.report_data == v3[48 + 320 : 48 + 384]
    assert body.mr_enclave == v3[48 + 64 : 48 + 96]
    assert body.mr_signer == v3[48 + 128 : 48 + 160]
    assert body.isv_prod_id == struct.unpack_from("<H", v3, 48 + 256)[0]
    assert not body.debug
    debug_attrs = bytes([body.attributes[0] | 0x02]) + body.attributes[1:]
    assert dataclasses.replace(body, attributes=debug_attrs).debug


def test_report_body_wrong_sizes():
    with pytest.raises(dcap_quote.QuoteError, match="report"):
        dcap_quote.ReportBody.from_bytes(bytes(383))
    body = dcap_quote.ReportBody.from_bytes(bytes(384))
    with pytest.raises(dcap_quote.QuoteError, match=r"report\.mr_enclave"):
        dataclasses.replace(body, mr_enclave=bytes(31)).to_bytes()
    with pytest.raises(dcap_quote.QuoteError, match="report"):
        dataclasses.replace(body, isv_svn=1 << 16).to_bytes()


# --- collateral JSON -------------------------------------------------------------------------------


def test_collateral_json_round_trip(samples_dir):
    paths = sorted(samples_dir.glob("**/collateral.json"))
    assert len(paths) >= 14
    for path in paths:
        text = path.read_text()
        c = Collateral.from_json(text)
        assert Collateral.from_json(c.to_json()) == c
        assert c.to_dict() == json.loads(text)
        assert c.root_ca_crl[:1] == b"\x30" and len(c.tcb_info_signature) == 64


def test_collateral_errors_name_the_field(samples_dir):
    d = json.loads((samples_dir / "intel-sgx-v3" / "collateral.json").read_text())
    with pytest.raises(dcap.CollateralError, match="not valid JSON"):
        Collateral.from_json("{")
    with pytest.raises(dcap.CollateralError, match="JSON object"):
        Collateral.from_json("[]")
    for key in d:
        broken = {k: v for k, v in d.items() if k != key}
        with pytest.raises(dcap.CollateralError, match=key):
            Collateral.from_dict(broken)
    with pytest.raises(dcap.CollateralError, match=r"collateral\.pck_crl: not valid hex"):
        Collateral.from_dict({**d, "pck_crl": "zz"})
    with pytest.raises(dcap.CollateralError, match=r"collateral\.tcb_info: must be a string"):
        Collateral.from_dict({**d, "tcb_info": {"id": "SGX"}})
