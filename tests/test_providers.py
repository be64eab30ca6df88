"""Quote providers for real enclaves and the native QVL binding, tested at their OS boundaries.

There is no SGX here, so each provider is driven through the boundary it really crosses:
- Occlum: the ioctl function receives the very ctypes argument that would reach /dev/sgx; the fake
  decodes its bytes with the layout Occlum documents (not with our ctypes classes), follows the
  pointers, and writes the quote where the quote_buf pointer points.
- Gramine: a temporary directory with the three pseudo-files; `quote` is a FIFO whose writer builds
  the quote from whatever was written to `user_report_data`, as Gramine does.
- Native QVL: tests/native/qvl_stub.c compiled with gcc exports the two real prototypes and records
  the arguments it received.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import shutil
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

import attester
import dcap
import dcap_quote
import native_qvl
from dcap_collateral import Collateral

HERE = Path(__file__).resolve().parent
RD_OFFSET = 48 + 384 - 64  # report_data inside a quote


@pytest.fixture(scope="module")
def sample_quote(samples_dir: Path) -> bytes:
    return (samples_dir / "intel-sgx-v3" / "quote.bin").read_bytes()


def with_report_data(quote: bytes, report_data: bytes) -> bytes:
    """The sample quote with other report_data: still parses (signatures are not checked here)."""
    assert len(report_data) == 64
    return quote[:RD_OFFSET] + report_data + quote[RD_OFFSET + 64:]


def _ioc(direction: int, magic: str, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (ord(magic) << 8) | nr


# ---------------------------------------------------------------------------------------------------
# Occlum
# ---------------------------------------------------------------------------------------------------

IOC_WRITE, IOC_READ = 1, 2


def test_ioctl_numbers_are_occlums_and_match_the_struct_sizes():
    # Occlum: StructuredIoctlNum::new::<T>(nr, 's', Output | InputOutput)
    assert attester.SGXIOC_GET_DCAP_QUOTE_SIZE == _ioc(IOC_READ, "s", 7, 4) == 0x80047307
    assert attester.SGXIOC_GEN_DCAP_QUOTE == _ioc(IOC_READ | IOC_WRITE, "s", 8, 24) == 0xC0187308
    assert native_qvl.SGXIOC_GET_DCAP_SUPPLEMENTAL_SIZE == _ioc(IOC_READ, "s", 9, 4) == 0x80047309
    assert native_qvl.SGXIOC_VER_DCAP_QUOTE == _ioc(IOC_READ | IOC_WRITE, "s", 10, 48) == 0xC030730A
    assert ctypes.sizeof(attester.GenDcapQuoteArg) == attester.ioc_size(attester.SGXIOC_GEN_DCAP_QUOTE) == 24
    assert (ctypes.sizeof(native_qvl.VerDcapQuoteArg) == attester.ioc_size(native_qvl.SGXIOC_VER_DCAP_QUOTE)
            == 48)


class FakeOcclumDevice:
    """Plays Occlum's /dev/sgx ioctl handler on the raw argument bytes.

    Layouts as in occlum src/libos/src/fs/dev_fs/dev_sgx/mod.rs (x86_64, repr(C)):
      IoctlGenDCAPQuoteArg  = report_data*, quote_size*, quote_buf*                 "<QQQ"
      IoctlVerDCAPQuoteArg  = quote_buf*, u32 quote_size, pad, expiration*, result*,
                              u32 supplemental_size, pad, supplemental*             "<QI4xQQI4xQ"
    """

    def __init__(self, make_quote, *, quote_size: int | None = None, result: int = 0, expiration: int = 0,
                 supplemental_size: int = 256, fail: dict[int, int] | None = None,
                 write_back_size: int | None = None, write_result: bool = True):
        self.make_quote = make_quote
        self.quote_size = quote_size
        self.result = result
        self.expiration = expiration
        self.supplemental_size = supplemental_size
        self.fail = fail or {}
        self.write_back_size = write_back_size
        self.write_result = write_result
        self.calls: list[int] = []
        self.seen_report_data: bytes | None = None
        self.seen_quote: bytes | None = None
        self.supplemental: bytes | None = None

    def _put_u32(self, arg, value: int) -> None:
        view = memoryview(arg).cast("B")
        assert len(view) == 4, "u32 ioctls take a 4-byte buffer"
        view[:] = struct.pack("<I", value)

    def __call__(self, fd: int, request: int, arg) -> int:
        os.fstat(fd)  # a real, open file descriptor
        self.calls.append(request)
        if request in self.fail:
            raise OSError(self.fail[request], os.strerror(self.fail[request]))
        raw = bytes(memoryview(arg).cast("B"))
        if request == attester.SGXIOC_GET_DCAP_QUOTE_SIZE:
            size = self.quote_size if self.quote_size is not None else len(self.make_quote(bytes(64)))
            self._put_u32(arg, size)
        elif request == attester.SGXIOC_GEN_DCAP_QUOTE:
            assert len(raw) == 24
            rd_ptr, size_ptr, buf_ptr = struct.unpack("<QQQ", raw)
            assert rd_ptr and size_ptr and buf_ptr
            report_data = ctypes.string_at(rd_ptr, 64)
            (capacity,) = struct.unpack("<I", ctypes.string_at(size_ptr, 4))
            quote = self.make_quote(report_data)
            if capacity < len(quote):
                raise OSError(errno.EINVAL, "provided quote is too small")
            self.seen_report_data = report_data
            ctypes.memmove(buf_ptr, quote, len(quote))
            if self.write_back_size is not None:
                ctypes.memmove(size_ptr, struct.pack("<I", self.write_back_size), 4)
        elif request == native_qvl.SGXIOC_GET_DCAP_SUPPLEMENTAL_SIZE:
            self._put_u32(arg, self.supplemental_size)
        elif request == native_qvl.SGXIOC_VER_DCAP_QUOTE:
            assert len(raw) == 48
            q_ptr, q_size, exp_ptr, res_ptr, supp_size, supp_ptr = struct.unpack("<QI4xQQI4xQ", raw)
            self.seen_quote = ctypes.string_at(q_ptr, q_size)
            assert supp_size == self.supplemental_size
            if supp_ptr:
                ctypes.memmove(supp_ptr, b"\x5a" * supp_size, supp_size)
                self.supplemental = ctypes.string_at(supp_ptr, supp_size)
            ctypes.memmove(exp_ptr, struct.pack("<I", self.expiration), 4)
            if self.write_result:
                ctypes.memmove(res_ptr, struct.pack("<I", self.result), 4)
        else:
            raise OSError(errno.ENOSYS, "unknown ioctl cmd for /dev/sgx")
        return 0


@pytest.fixture
def sgx_device(tmp_path: Path) -> Path:
    """Any openable file stands in for /dev/sgx; the fake ioctl does the rest."""
    dev = tmp_path / "sgx"
    dev.write_bytes(b"")
    return dev


def test_occlum_quote_through_the_documented_struct(sample_quote, sgx_device):
    fake = FakeOcclumDevice(lambda rd: with_report_data(sample_quote, rd))
    provider = attester.OcclumProvider(sgx_device, ioctl=fake)
    report_data = bytes(range(64))
    quote = provider.get_quote(report_data)
    assert fake.seen_report_data == report_data
    assert quote == with_report_data(sample_quote, report_data)
    assert dcap_quote.parse_quote(quote).report.report_data == report_data
    assert fake.calls == [attester.SGXIOC_GET_DCAP_QUOTE_SIZE, attester.SGXIOC_GEN_DCAP_QUOTE]
    assert provider.name == "occlum"


def test_occlum_quote_from_the_sim_platform_verifies(sim_platform, sgx_device):
    """End to end: the quote our packing delivers is a genuine one for the report_data we asked for."""
    fake = FakeOcclumDevice(lambda rd: sim_platform.make_quote(rd))
    report_data = bytes.fromhex("ab" * 32 + "cd" * 32)
    quote = attester.OcclumProvider(sgx_device, ioctl=fake).get_quote(report_data)
    verified = dcap.verify(quote, sim_platform.collateral(), root_ca=sim_platform.root_ca_der)
    assert verified.report_data == report_data
    assert verified.status == "UpToDate"


def test_occlum_real_ioctl_on_a_non_device_names_the_errno(sgx_device):
    """The default ioctl (fcntl.ioctl) really accepts our ctypes arguments; a plain file says ENOTTY."""
    with pytest.raises(attester.ProviderError, match=r"GET_DCAP_QUOTE_SIZE .* ENOTTY"):
        attester.OcclumProvider(sgx_device).get_quote(bytes(64))


def test_every_occlum_argument_is_one_fcntl_ioctl_accepts(sample_quote, sgx_device):
    """Before the fake sees each argument, the real fcntl.ioctl gets it too: it must take it as a
    buffer (TypeError otherwise) and reach the kernel, which answers ENOTTY for a plain file."""
    fake = FakeOcclumDevice(lambda rd: with_report_data(sample_quote, rd), supplemental_size=64)

    def both(fd, request, arg):
        with pytest.raises(OSError) as info:
            fcntl.ioctl(fd, request, arg)
        assert info.value.errno == errno.ENOTTY
        return fake(fd, request, arg)

    provider = native_qvl.OcclumQvl(sgx_device, ioctl=both)
    provider.get_quote(bytes(64))
    provider.verify_quote(sample_quote)
    assert len(set(fake.calls)) == 4


def test_occlum_missing_device(tmp_path):
    with pytest.raises(attester.ProviderError, match=r"cannot open .*nosgx: ENOENT"):
        attester.OcclumProvider(tmp_path / "nosgx", ioctl=lambda *a: 0).get_quote(bytes(64))


@pytest.mark.parametrize(("request_no", "label"), [
    (attester.SGXIOC_GET_DCAP_QUOTE_SIZE, "GET_DCAP_QUOTE_SIZE"),
    (attester.SGXIOC_GEN_DCAP_QUOTE, "GEN_DCAP_QUOTE"),
])
def test_occlum_ioctl_failure_is_a_provider_error(sample_quote, sgx_device, request_no, label):
    fake = FakeOcclumDevice(lambda rd: with_report_data(sample_quote, rd), fail={request_no: errno.EIO})
    with pytest.raises(attester.ProviderError, match=rf"ioctl {label} on .* failed: EIO"):
        attester.OcclumProvider(sgx_device, ioctl=fake).get_quote(bytes(64))


@pytest.mark.parametrize("size", [0, 100, attester.MAX_QUOTE_SIZE + 1])
def test_occlum_implausible_quote_size(sample_quote, sgx_device, size):
    fake = FakeOcclumDevice(lambda rd: with_report_data(sample_quote, rd), quote_size=size)
    with pytest.raises(attester.ProviderError, match=rf"implausible quote size {size}"):
        attester.OcclumProvider(sgx_device, ioctl=fake).get_quote(bytes(64))


def test_occlum_buffer_too_small_is_reported(sample_quote, sgx_device):
    fake = FakeOcclumDevice(lambda rd: with_report_data(sample_quote, rd), quote_size=len(sample_quote) - 1)
    with pytest.raises(attester.ProviderError, match=r"GEN_DCAP_QUOTE .* EINVAL"):
        attester.OcclumProvider(sgx_device, ioctl=fake).get_quote(bytes(64))


def test_occlum_short_quote_written_back(sample_quote, sgx_device):
    fake = FakeOcclumDevice(lambda rd: with_report_data(sample_quote, rd), write_back_size=200)
    with pytest.raises(attester.ProviderError, match=r"short quote: 200 bytes"):
        attester.OcclumProvider(sgx_device, ioctl=fake).get_quote(bytes(64))


def test_occlum_size_written_back_beyond_buffer(sample_quote, sgx_device):
    fake = FakeOcclumDevice(lambda rd: with_report_data(sample_quote, rd),
                            write_back_size=len(sample_quote) + 1)
    with pytest.raises(attester.ProviderError, match=r"more than the .*-byte buffer"):
        attester.OcclumProvider(sgx_device, ioctl=fake).get_quote(bytes(64))


def test_occlum_garbage_quote(sample_quote, sgx_device):
    fake = FakeOcclumDevice(lambda rd: b"\x07" * len(sample_quote))
    with pytest.raises(attester.ProviderError, match=r"malformed quote: .*header"):
        attester.OcclumProvider(sgx_device, ioctl=fake).get_quote(bytes(64))


def test_occlum_quote_for_other_report_data(sample_quote, sgx_device):
    fake = FakeOcclumDevice(lambda rd: sample_quote)  # ignores the report_data it was given
    with pytest.raises(attester.ProviderError, match=r"different report_data"):
        attester.OcclumProvider(sgx_device, ioctl=fake).get_quote(b"\x01" * 64)


@pytest.mark.parametrize("bad", [b"", bytes(63), bytes(65), "00" * 64])
def test_report_data_must_be_64_bytes(sgx_device, tmp_path, bad):
    with pytest.raises(attester.ProviderError, match="report_data"):
        attester.OcclumProvider(sgx_device, ioctl=lambda *a: 0).get_quote(bad)
    with pytest.raises(attester.ProviderError, match="report_data"):
        attester.GramineProvider(tmp_path).get_quote(bad)


@pytest.mark.parametrize(("value", "status"), sorted(native_qvl.QV_RESULT_STATUS.items()))
def test_occlum_in_enclave_verification(sample_quote, sgx_device, value, status):
    fake = FakeOcclumDevice(lambda rd: sample_quote, result=value, expiration=1, supplemental_size=336)
    result = native_qvl.OcclumQvl(sgx_device, ioctl=fake).verify_quote(sample_quote)
    assert result == (status, 1)
    assert fake.seen_quote == sample_quote
    assert fake.supplemental == b"\x5a" * 336
    assert fake.calls == [native_qvl.SGXIOC_GET_DCAP_SUPPLEMENTAL_SIZE, native_qvl.SGXIOC_VER_DCAP_QUOTE]


def test_occlum_in_enclave_verification_without_supplemental(sample_quote, sgx_device):
    fake = FakeOcclumDevice(lambda rd: sample_quote, result=0, supplemental_size=0)
    assert native_qvl.OcclumQvl(sgx_device, ioctl=fake).verify_quote(sample_quote) == ("UpToDate", 0)
    assert fake.supplemental is None  # NULL pointer for size 0


@pytest.mark.parametrize("value", [0xA004, 0xA006, 0x1234])
def test_occlum_in_enclave_verification_refusal(sample_quote, sgx_device, value):
    fake = FakeOcclumDevice(lambda rd: sample_quote, result=value)
    with pytest.raises(dcap.VerificationError, match=f"{value:#06x}") as info:
        native_qvl.OcclumQvl(sgx_device, ioctl=fake).verify_quote(sample_quote)
    assert info.value.check == "native_qvl_result"


def test_occlum_verification_result_never_written(sample_quote, sgx_device):
    fake = FakeOcclumDevice(lambda rd: sample_quote, write_result=False)
    with pytest.raises(dcap.VerificationError, match="unknown sgx_ql_qv_result_t"):
        native_qvl.OcclumQvl(sgx_device, ioctl=fake).verify_quote(sample_quote)


def test_occlum_verification_ioctl_failure(sample_quote, sgx_device):
    fake = FakeOcclumDevice(lambda rd: sample_quote, fail={native_qvl.SGXIOC_VER_DCAP_QUOTE: errno.EIO})
    with pytest.raises(attester.ProviderError, match=r"VER_DCAP_QUOTE .* EIO"):
        native_qvl.OcclumQvl(sgx_device, ioctl=fake).verify_quote(sample_quote)


# ---------------------------------------------------------------------------------------------------
# Gramine
# ---------------------------------------------------------------------------------------------------


class GramineDir:
    """A directory standing in for /dev/attestation.

    `user_report_data` and `quote` are FIFOs served by a thread in Gramine's order: take what is
    written to user_report_data, then hand out one quote built from it.  A provider that read the
    quote without writing report data first would block, not pass.
    """

    def __init__(self, root: Path, make_quote, attestation_type: bytes = b"dcap"):
        self.root = root
        self.make_quote = make_quote
        root.mkdir(exist_ok=True)
        (root / "attestation_type").write_bytes(attestation_type)
        os.mkfifo(root / "user_report_data")
        os.mkfifo(root / "quote")
        self.served: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            with open(self.root / "user_report_data", "rb") as f:  # blocks until a writer comes
                report_data = f.read()
            if self._stop.is_set():
                return
            self.served.append(report_data)
            # BrokenPipeError: the reader gave up early; its test says what it expected
            with contextlib.suppress(BrokenPipeError), open(self.root / "quote", "wb") as f:
                f.write(self.make_quote(report_data))  # the open blocks until the reader comes

    def close(self) -> None:
        """Wake the thread wherever it waits, then let it end."""
        self._stop.set()
        # The thread may not have reached its blocking open() yet (a non-blocking open of the other
        # end then finds nobody and wakes nothing), so knock until it has gone.
        deadline = time.monotonic() + 5
        while self._thread.is_alive() and time.monotonic() < deadline:
            for name, flags in (("user_report_data", os.O_WRONLY), ("quote", os.O_RDONLY)):
                with contextlib.suppress(OSError):
                    os.close(os.open(self.root / name, flags | os.O_NONBLOCK))
            self._thread.join(timeout=0.02)
        assert not self._thread.is_alive(), "FIFO server thread did not stop"


@pytest.fixture
def gramine_dir(tmp_path, sample_quote):
    made: list[GramineDir] = []

    def make(make_quote=None, attestation_type=b"dcap"):
        if make_quote is None:
            def make_quote(rd):
                return with_report_data(sample_quote, rd)
        d = GramineDir(tmp_path / f"attestation{len(made)}", make_quote, attestation_type)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


def test_gramine_quote_follows_user_report_data(gramine_dir, sample_quote):
    d = gramine_dir()
    provider = attester.GramineProvider(d.root)
    for report_data in (bytes(range(64)), b"\xee" * 64):
        assert provider.get_quote(report_data) == with_report_data(sample_quote, report_data)
    assert d.served == [bytes(range(64)), b"\xee" * 64]
    assert provider.name == "gramine"


def test_gramine_quote_from_the_sim_platform_verifies(gramine_dir, sim_platform):
    d = gramine_dir(lambda rd: sim_platform.make_quote(rd, isv_svn=3))
    report_data = b"\x42" * 64
    quote = attester.GramineProvider(d.root).get_quote(report_data)
    verified = dcap.verify(quote, sim_platform.collateral(), root_ca=sim_platform.root_ca_der)
    assert (verified.report_data, verified.isv_svn) == (report_data, 3)


@pytest.mark.parametrize("kind", [b"epid", b"none", b""])
def test_gramine_wrong_attestation_type(gramine_dir, kind):
    d = gramine_dir(attestation_type=kind)
    with pytest.raises(attester.ProviderError, match=rf"attestation_type is '{kind.decode()}', need 'dcap'"):
        attester.GramineProvider(d.root).get_quote(bytes(64))
    assert d.served == []


def test_gramine_attestation_type_with_newline(gramine_dir, sample_quote):
    d = gramine_dir(attestation_type=b"dcap\n")
    assert attester.GramineProvider(d.root).get_quote(bytes(64)) == with_report_data(sample_quote, bytes(64))


def test_gramine_missing_interface(tmp_path):
    with pytest.raises(attester.ProviderError, match=r"cannot read .*attestation_type: ENOENT"):
        attester.GramineProvider(tmp_path / "absent").get_quote(bytes(64))


def test_gramine_missing_quote_file(tmp_path):
    (tmp_path / "attestation_type").write_text("dcap")
    (tmp_path / "user_report_data").write_bytes(b"")
    with pytest.raises(attester.ProviderError, match=r"cannot read .*quote: ENOENT"):
        attester.GramineProvider(tmp_path).get_quote(bytes(64))


def test_gramine_unwritable_user_report_data(tmp_path):
    (tmp_path / "attestation_type").write_text("dcap")
    (tmp_path / "user_report_data").mkdir()
    with pytest.raises(attester.ProviderError, match=r"cannot write .*user_report_data: EISDIR"):
        attester.GramineProvider(tmp_path).get_quote(bytes(64))


def test_gramine_short_quote(gramine_dir):
    d = gramine_dir(lambda rd: b"\x03\x00" * 50)
    with pytest.raises(attester.ProviderError, match=r"short quote: 100 bytes"):
        attester.GramineProvider(d.root).get_quote(bytes(64))


def test_gramine_stale_quote(gramine_dir, sample_quote):
    d = gramine_dir(lambda rd: sample_quote)  # a quote that ignores user_report_data
    with pytest.raises(attester.ProviderError, match=r"different report_data"):
        attester.GramineProvider(d.root).get_quote(b"\x99" * 64)


def test_gramine_truncated_quote(gramine_dir, sample_quote):
    d = gramine_dir(lambda rd: with_report_data(sample_quote, rd)[:-1])
    with pytest.raises(attester.ProviderError, match=r"malformed quote"):
        attester.GramineProvider(d.root).get_quote(bytes(64))


# ---------------------------------------------------------------------------------------------------
# Native QVL through ctypes, against a C stub built here
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qvl_stub(tmp_path_factory) -> Path:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("no C compiler to build the QVL stub")
    out = tmp_path_factory.mktemp("qvl") / "libqvlstub.so"
    subprocess.run([gcc, "-shared", "-fPIC", "-O1", "-Wall", "-Wextra", "-Werror", "-o", str(out),
                    str(HERE / "native" / "qvl_stub.c")], check=True, capture_output=True, timeout=60)
    return out


class Stub:
    """The stub's recorder, reached through a second handle on the same loaded library."""

    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))
        for name, restype in (("stub_calls", ctypes.c_int), ("stub_quote_size", ctypes.c_uint32),
                              ("stub_quote_fnv", ctypes.c_uint64), ("stub_date", ctypes.c_int64),
                              ("stub_collateral_null", ctypes.c_int), ("stub_report_info_null", ctypes.c_int),
                              ("stub_collateral_version", ctypes.c_uint32),
                              ("stub_collateral_tee_type", ctypes.c_uint32),
                              ("stub_supp_size_arg", ctypes.c_uint32), ("stub_supp_null", ctypes.c_int)):
            getattr(self.lib, name).restype = restype
        self.lib.stub_set_supplemental.argtypes = (ctypes.c_uint32, ctypes.c_uint32)
        self.lib.stub_collateral_field.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
        self.lib.stub_collateral_field.restype = ctypes.c_uint32

    def __getattr__(self, name: str):
        return getattr(self.lib, "stub_" + name)()

    def field(self, i: int) -> bytes:
        buf = ctypes.create_string_buffer(65536)
        n = self.lib.stub_collateral_field(i, buf, len(buf))
        return buf.raw[:n]


@pytest.fixture
def stub(qvl_stub):
    s = Stub(qvl_stub)
    s.lib.stub_set_supplemental(1024, 0)
    yield s
    s.lib.stub_set_supplemental(1024, 0)


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def steered(quote: bytes, result: int, expiration: int = 0, rc: int = 0) -> bytes:
    """A quote whose report_data tells the stub what to answer (see qvl_stub.c)."""
    return with_report_data(quote, struct.pack("<III", result, expiration, rc) + bytes(52))


def test_qv_result_values_are_intels():
    # sgx_qve_header.h: TEE_QV_MK_ERROR(x) = 0xA000 | x
    intel = {"SGX_QL_QV_RESULT_OK": 0x0000, "CONFIG_NEEDED": 0xA001, "OUT_OF_DATE": 0xA002,
             "OUT_OF_DATE_CONFIG_NEEDED": 0xA003, "INVALID_SIGNATURE": 0xA004, "REVOKED": 0xA005,
             "UNSPECIFIED": 0xA006, "SW_HARDENING_NEEDED": 0xA007, "CONFIG_AND_SW_HARDENING_NEEDED": 0xA008}
    ours = {"SGX_QL_QV_RESULT_OK": "UpToDate", "CONFIG_NEEDED": "ConfigurationNeeded",
            "OUT_OF_DATE": "OutOfDate", "OUT_OF_DATE_CONFIG_NEEDED": "OutOfDateConfigurationNeeded",
            "REVOKED": "Revoked", "SW_HARDENING_NEEDED": "SWHardeningNeeded",
            "CONFIG_AND_SW_HARDENING_NEEDED": "ConfigurationAndSWHardeningNeeded"}
    assert {intel[k]: v for k, v in ours.items()} == native_qvl.QV_RESULT_STATUS
    assert set(native_qvl.QV_RESULT_STATUS.values()) == set(dcap.TCB_STATUSES)
    assert {intel["INVALID_SIGNATURE"], intel["UNSPECIFIED"]} <= set(native_qvl.QV_RESULT_ERRORS)


def test_native_qvl_marshals_every_argument(stub, qvl_stub, sample_quote):
    quote = steered(sample_quote, 0xA008)
    before = stub.calls
    verifier = native_qvl.NativeQvlVerifier(str(qvl_stub))
    assert verifier.supplemental_data_size() == 1024
    assert verifier.verify(quote, now=1750330631) == ("ConfigurationAndSWHardeningNeeded", 0)
    assert stub.calls == before + 1
    assert stub.quote_size == len(quote)
    assert stub.quote_fnv == fnv1a64(quote)
    assert stub.date == 1750330631
    assert stub.collateral_null == 1
    assert stub.report_info_null == 1
    assert (stub.supp_size_arg, stub.supp_null) == (1024, 0)


def test_native_qvl_default_date_is_now(stub, qvl_stub, sample_quote):
    before = int(time.time())
    native_qvl.NativeQvlVerifier(str(qvl_stub)).verify(steered(sample_quote, 0))
    assert before <= stub.date <= int(time.time())


@pytest.mark.parametrize(("value", "status"), sorted(native_qvl.QV_RESULT_STATUS.items()))
def test_native_qvl_statuses(stub, qvl_stub, sample_quote, value, status):
    result = native_qvl.NativeQvlVerifier(str(qvl_stub)).verify(
        steered(sample_quote, value, expiration=value & 1))
    assert result.status == status
    assert result.collateral_expiration_status == value & 1


def test_native_qvl_passes_collateral(stub, qvl_stub, sample_quote, samples_dir):
    coll = Collateral.from_json((samples_dir / "intel-sgx-v3" / "collateral.json").read_text())
    native_qvl.NativeQvlVerifier(str(qvl_stub)).verify(steered(sample_quote, 0), now=1, collateral=coll)
    assert stub.collateral_null == 0
    assert stub.collateral_version == 3  # major 3, minor 0: CRLs as base16 DER
    assert stub.collateral_tee_type == 0
    fields = [stub.field(i) for i in range(7)]
    expected = native_qvl.collateral_strings(coll)
    assert fields == [expected[name] for name in native_qvl.COLLATERAL_FIELDS]
    assert all(f.endswith(b"\0") and f.count(b"\0") == 1 for f in fields)
    # what QVL parses: PEM chains, hex CRLs, and the PCS bodies around the exact signed JSON
    assert fields[0].startswith(b"-----BEGIN CERTIFICATE-----")
    assert bytes.fromhex(fields[1][:-1].decode()) == coll.root_ca_crl
    assert bytes.fromhex(fields[2][:-1].decode()) == coll.pck_crl
    tcb = json.loads(fields[4][:-1])
    assert coll.tcb_info.encode() in fields[4]
    assert tcb["tcbInfo"] == json.loads(coll.tcb_info)
    assert bytes.fromhex(tcb["signature"]) == coll.tcb_info_signature
    qe = json.loads(fields[6][:-1])
    assert coll.qe_identity.encode() in fields[6]
    assert bytes.fromhex(qe["signature"]) == coll.qe_identity_signature


def test_native_qvl_without_supplemental(stub, qvl_stub, sample_quote):
    stub.lib.stub_set_supplemental(0, 0)
    result = native_qvl.NativeQvlVerifier(str(qvl_stub)).verify(steered(sample_quote, 0xA001))
    assert result.status == "ConfigurationNeeded"
    assert (stub.supp_size_arg, stub.supp_null) == (0, 1)


def test_native_qvl_supplemental_size_failure(stub, qvl_stub, sample_quote):
    stub.lib.stub_set_supplemental(0, 0xE001)
    with pytest.raises(attester.ProviderError,
                       match=r"supplemental_data_size returned SGX_QL_ERROR_UNEXPECTED"):
        native_qvl.NativeQvlVerifier(str(qvl_stub)).verify(steered(sample_quote, 0))


@pytest.mark.parametrize("value", [0xA004, 0xA006, 0xA0FF])
def test_native_qvl_not_genuine_result(stub, qvl_stub, sample_quote, value):
    with pytest.raises(dcap.VerificationError, match=f"{value:#06x}") as info:
        native_qvl.NativeQvlVerifier(str(qvl_stub)).verify(steered(sample_quote, value))
    assert info.value.check == "native_qvl_result"


@pytest.mark.parametrize(("rc", "error", "name"), [
    (0xE022, dcap.VerificationError, "SGX_QL_PCK_CERT_CHAIN_ERROR"),
    (0xE02E, dcap.VerificationError, "SGX_QL_SGX_CRL_EXPIRED"),
    (0xE031, dcap.VerificationError, "SGX_QL_PCK_REVOKED"),
    (0xE034, dcap.CollateralUnavailable, "SGX_QL_UNABLE_TO_GET_COLLATERAL"),
    (0xE041, dcap.CollateralUnavailable, "SGX_QL_NETWORK_FAILURE"),
    (0xE052, attester.ProviderError, "SGX_QL_PSW_NOT_AVAILABLE"),
    (0xE0AB, dcap.VerificationError, "quote3_error_t"),
])
def test_native_qvl_error_codes(stub, qvl_stub, sample_quote, rc, error, name):
    with pytest.raises(error, match=rf"{name} \({rc:#06x}\)"):
        native_qvl.NativeQvlVerifier(str(qvl_stub)).verify(steered(sample_quote, 0, rc=rc))


def test_native_qvl_short_input_reaches_the_library(stub, qvl_stub):
    with pytest.raises(dcap.VerificationError, match="SGX_QL_QUOTE_FORMAT_UNSUPPORTED"):
        native_qvl.NativeQvlVerifier(str(qvl_stub)).verify(b"\x03\x00")
    assert stub.quote_size == 2
    with pytest.raises(attester.ProviderError, match="quote size 0"):
        native_qvl.NativeQvlVerifier(str(qvl_stub)).verify(b"")


@pytest.mark.skipif(not native_qvl.native_qvl_available(), reason="Intel QVL library not installed")
def test_real_intel_qvl_agrees_on_the_intel_sample(sample_quote, samples_dir):
    """Where Intel's library is installed: its verdict on the real sample, with our collateral."""
    sample = samples_dir / "intel-sgx-v3"
    coll = Collateral.from_json((sample / "collateral.json").read_text())
    expected = json.loads((sample / "expected.json").read_text())
    now = 1750330631
    ours = dcap.verify(sample_quote, coll, now=now)
    native = native_qvl.NativeQvlVerifier().verify(sample_quote, now=now, collateral=coll)
    assert native == (ours.status, 0)
    assert ours.status == expected["status"]


def test_native_qvl_availability(qvl_stub, tmp_path):
    assert native_qvl.native_qvl_available(str(qvl_stub))
    assert not native_qvl.native_qvl_available(str(tmp_path / "libsgx_dcap_quoteverify.so.1"))
    assert not native_qvl.native_qvl_available("libc.so.6")  # loads, but lacks the entry points
    with pytest.raises(attester.ProviderError, match=r"cannot load .*libnothere\.so"):
        native_qvl.NativeQvlVerifier(str(tmp_path / "libnothere.so"))


# ---------------------------------------------------------------------------------------------------
# detection and selection
# ---------------------------------------------------------------------------------------------------


def test_detect_occlum(tmp_path):
    dev = tmp_path / "sgx"
    dev.write_bytes(b"")
    nothing = str(tmp_path / "no-attestation")

    def detect(device, environ):
        return attester.detect_provider(occlum_device=device, gramine_root=nothing, environ=environ)

    assert detect(str(dev), {"OCCLUM": "yes"}) == "occlum"
    # a plain file without Occlum's environment is not Occlum
    assert detect(str(dev), {}) is None
    assert detect(str(dev), {"OCCLUM": "NO"}) is None
    # a character device is what Occlum's LibOS shows
    assert detect(os.devnull, {}) == "occlum"


def test_detect_host_sgx_driver_directory_is_not_occlum(tmp_path):
    dev = tmp_path / "sgx"
    (dev / "enclave").parent.mkdir()
    assert attester.detect_provider(occlum_device=str(dev), gramine_root=str(tmp_path / "x"),
                              environ={"OCCLUM": "yes"}) is None


def test_detect_gramine(tmp_path):
    root = tmp_path / "attestation"
    root.mkdir()

    def detect():
        return attester.detect_provider(occlum_device=str(tmp_path / "nosgx"), gramine_root=str(root),
                                        environ={})

    assert detect() is None
    (root / "quote").write_bytes(b"")
    assert detect() == "gramine"


def test_get_provider_by_detection(tmp_path):
    dev = tmp_path / "sgx"
    dev.write_bytes(b"")
    root = tmp_path / "attestation"
    root.mkdir()
    (root / "quote").write_bytes(b"")
    p = attester.get_provider(device=str(dev), root=str(root), environ={"OCCLUM": "yes"})
    assert isinstance(p, attester.OcclumProvider) and p.device == str(dev)
    g = attester.get_provider(device=str(dev), root=str(root), environ={})
    assert isinstance(g, attester.GramineProvider) and g.root == root


def test_get_provider_nothing_detected_names_what_was_looked_for(tmp_path):
    with pytest.raises(attester.ProviderError, match=r"no SGX quote provider detected") as info:
        attester.get_provider(device=str(tmp_path / "sgx"), root=str(tmp_path / "att"), environ={})
    assert str(tmp_path / "sgx") in str(info.value)
    assert str(tmp_path / "att" / "quote") in str(info.value)


def test_get_provider_by_name(tmp_path):
    p = attester.get_provider("occlum", device=str(tmp_path / "dev"))
    assert (p.name, p.device) == ("occlum", str(tmp_path / "dev"))
    g = attester.get_provider("gramine", root=str(tmp_path))
    assert (g.name, g.root) == ("gramine", tmp_path)
    assert attester.get_provider("occlum").device == "/dev/sgx"
    assert attester.get_provider("gramine").root == Path("/dev/attestation")


def test_get_provider_sim(sim_platform):
    p = attester.get_provider("sim", sim_dir=sim_platform.directory)
    assert p.name == "sim"
    quote = p.get_quote(b"\x11" * 64)
    assert dcap_quote.parse_quote(quote).report.report_data == b"\x11" * 64


@pytest.mark.parametrize(("name", "options", "message"), [
    ("sgx", {}, r"unknown quote provider 'sgx' \(choose one of occlum, gramine, tdx, sim\)"),
    ("occlum", {"root": "/x"}, r"occlum provider: unknown option\(s\) root"),
    ("gramine", {"device": "/x"}, r"gramine provider: unknown option\(s\) device"),
    (None, {"colour": "red"}, r"unknown provider option\(s\) for detection: colour"),
    ("sim", {"colour": "red"}, r"sim provider: "),
])
def test_get_provider_refusals(name, options, message):
    with pytest.raises(attester.ProviderError, match=message):
        attester.get_provider(name, **options)
