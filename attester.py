"""Quote providers: get an SGX or TDX DCAP quote for 64 bytes of report data from inside an enclave or TD.

Who may import it: the enclave side (ratls_attest, asps_client) and command lines.  It is copied
into enclave images, so it imports only dcap_quote (to check what a provider returns) and never
verifier, collateral, PCCS, policy, KMS or server code.  Providers: Occlum (/dev/sgx ioctls),
Gramine (/dev/attestation), a TDX guest's configfs-tsm (/sys/kernel/config/tsm/report), and the
simulated platform (sgxsim, imported only when "sim" is asked
for, never in an enclave); get_provider(None) detects which runtime this process runs in.

Every failure is a ProviderError naming the step (declared in dcap_quote, beside QuoteError, so the
simulated provider raises the same class without importing this module).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from dcap_quote import ProviderError, QuoteError, parse_quote

# Cold start (issue 12): ctypes loads only with the Occlum provider (its ioctl structures), pathlib
# only with the Gramine and TDX providers, which walk their pseudo-file trees.
if TYPE_CHECKING:
    import ctypes
    from pathlib import Path


class QuoteProvider(Protocol):
    name: str

    def get_quote(self, report_data: bytes) -> bytes: ...


REPORT_DATA_SIZE = 64  # sizeof(sgx_report_data_t)
# Header (48) + report body (384) + signature_data length (4): no quote can be shorter.
MIN_QUOTE_SIZE = 48 + 384 + 4
# A DCAP quote with its PCK chain is ~5 KiB; a size beyond this is a broken driver, not a quote.
MAX_QUOTE_SIZE = 1 << 20

OCCLUM_DEVICE = "/dev/sgx"
GRAMINE_ROOT = "/dev/attestation"
TSM_REPORT_ROOT = "/sys/kernel/config/tsm/report"

IoctlFn = Callable[[int, int, Any], Any]


def _write_report_data(path: Any, report_data: bytes, who: str) -> None:
    """One write of the 64 bytes into a kernel or LibOS file (Gramine's user_report_data, configfs-tsm's
    inblob): a short write is an error, never a quote over half a report_data."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
        try:
            written = os.write(fd, report_data)
        finally:
            os.close(fd)
    except OSError as exc:
        raise ProviderError(f"{who}: cannot write {path}: {_os_reason(exc)}") from None
    if written != REPORT_DATA_SIZE:
        raise ProviderError(f"{who}: short write to {path}: {written} of {REPORT_DATA_SIZE} bytes")


def _read_limited(path: Any, limit: int, who: str) -> bytes:
    """At most `limit` bytes of a kernel or LibOS file (configfs-tsm's attributes, Gramine's
    /dev/attestation), never through a symbolic link: anything larger is refused rather than read
    whole, so a wrong root or a hostile file system gets a ProviderError, not a MemoryError."""
    chunks, size = [], 0
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            while chunk := os.read(fd, min(65536, limit + 1 - size)):
                chunks.append(chunk)
                size += len(chunk)
                if size > limit:
                    raise ProviderError(f"{who}: {path} holds more than {limit} bytes")
        finally:
            os.close(fd)
    except OSError as exc:
        raise ProviderError(f"{who}: cannot read {path}: {_os_reason(exc)}") from None
    return b"".join(chunks)


def _os_reason(exc: OSError) -> str:
    """'ENOENT (No such file or directory)': the errno name is what people search for."""
    name = errno.errorcode.get(exc.errno or 0, f"errno {exc.errno}")
    return f"{name} ({exc.strerror or exc})"


def _check_report_data(report_data: bytes) -> bytes:
    if not isinstance(report_data, bytes | bytearray | memoryview):
        raise ProviderError("report_data must be bytes")
    report_data = bytes(report_data)
    if len(report_data) != REPORT_DATA_SIZE:
        raise ProviderError(f"report_data must be exactly {REPORT_DATA_SIZE} bytes, got {len(report_data)}")
    return report_data


def check_quote(quote: bytes, report_data: bytes, source: str) -> bytes:
    """A provider's output is only a quote if it parses and carries the report_data we asked for.

    Catching this here turns a confused driver (short read, stale user_report_data, wrong buffer)
    into a clear local error instead of a verification failure on the far side.
    """
    if len(quote) < MIN_QUOTE_SIZE:
        raise ProviderError(f"{source} returned a short quote: {len(quote)} bytes "
                                 f"(a quote has at least {MIN_QUOTE_SIZE})")
    try:
        parsed = parse_quote(quote)
    except QuoteError as exc:
        raise ProviderError(f"{source} returned a malformed quote: {exc}") from None
    if parsed.report.report_data != report_data:
        raise ProviderError(f"{source} returned a quote for different report_data "
                                 "(the enclave did not take ours)")
    return quote


# ---------------------------------------------------------------------------------------------------
# Occlum: /dev/sgx ioctls (occlum src/libos/src/fs/dev_fs/dev_sgx, tools/toolchains/dcap_lib)
# ---------------------------------------------------------------------------------------------------

SGXIOC_GET_DCAP_QUOTE_SIZE = 0x80047307  # _IOR('s', 7, uint32_t)
SGXIOC_GEN_DCAP_QUOTE = 0xC0187308  # _IOWR('s', 8, IoctlGenDCAPQuoteArg)


def ioc_size(request: int) -> int:
    """The argument size encoded in a Linux ioctl number (bits 16..29)."""
    return (request >> 16) & 0x3FFF


_occlum_structs: dict[str, type[ctypes.Structure]] = {}


def _occlum_ioctl_structs() -> dict[str, type[ctypes.Structure]]:
    """Occlum's ioctl argument layouts, made on first use: ctypes loads with the Occlum provider only."""
    if not _occlum_structs:
        import ctypes

        class GenDcapQuoteArg(ctypes.Structure):
            """Occlum's IoctlGenDCAPQuoteArg: three pointers, 24 bytes on x86_64."""

            _fields_ = (
                ("report_data", ctypes.c_void_p),  # const sgx_report_data_t* (64 bytes), input
                ("quote_size", ctypes.c_void_p),  # uint32_t*, input: buffer length
                ("quote_buf", ctypes.c_void_p),  # uint8_t*, output
            )

        GenDcapQuoteArg.__module__, GenDcapQuoteArg.__qualname__ = __name__, "GenDcapQuoteArg"
        _occlum_structs["GenDcapQuoteArg"] = GenDcapQuoteArg
    return _occlum_structs


def __getattr__(name: str) -> Any:
    """`attester.GenDcapQuoteArg` still names the layout; it is built when first asked for (PEP 562)."""
    if name == "GenDcapQuoteArg":
        return _occlum_ioctl_structs()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_ioctl_layouts(*layouts: tuple[type[ctypes.Structure], int]) -> None:
    """The ioctl numbers encode the argument size; a layout that disagrees would corrupt enclave memory.

    Checked when a provider is made, not at import, so a 32-bit host can still import attester.
    """
    import ctypes

    for arg, request in layouts:
        if ctypes.sizeof(arg) != ioc_size(request):
            raise ProviderError(f"occlum: {arg.__name__} is {ctypes.sizeof(arg)} bytes here, the ioctl "
                                  f"expects {ioc_size(request)} (Occlum runs on x86_64 only)")


class OcclumProvider:
    """Quotes from inside an Occlum enclave through the LibOS's /dev/sgx ioctls."""

    name = "occlum"

    def __init__(self, device: str | os.PathLike[str] = OCCLUM_DEVICE, *,
                 ioctl: IoctlFn = fcntl.ioctl) -> None:
        check_ioctl_layouts((_occlum_ioctl_structs()["GenDcapQuoteArg"], SGXIOC_GEN_DCAP_QUOTE))
        self.device = str(device)
        self._ioctl = ioctl

    def _call(self, request: int, label: str, arg: Any) -> None:
        """Open the device, issue one ioctl, close; any OSError becomes a ProviderError naming the step."""
        try:
            fd = os.open(self.device, os.O_RDONLY)
        except OSError as exc:
            raise ProviderError(f"occlum: cannot open {self.device}: {_os_reason(exc)}") from None
        try:
            self._ioctl(fd, request, arg)
        except OSError as exc:
            raise ProviderError(f"occlum: ioctl {label} on {self.device} failed: "
                                  f"{_os_reason(exc)}") from None
        finally:
            os.close(fd)

    def _u32(self, request: int, label: str) -> int:
        import ctypes

        out = ctypes.c_uint32(0)
        self._call(request, label, out)
        return out.value

    def quote_size(self) -> int:
        size = self._u32(SGXIOC_GET_DCAP_QUOTE_SIZE, "GET_DCAP_QUOTE_SIZE")
        if not MIN_QUOTE_SIZE <= size <= MAX_QUOTE_SIZE:
            raise ProviderError(f"occlum: GET_DCAP_QUOTE_SIZE reported an implausible quote size {size}")
        return size

    def get_quote(self, report_data: bytes) -> bytes:
        import ctypes

        report_data = _check_report_data(report_data)
        size = self.quote_size()
        rd = ctypes.create_string_buffer(report_data, REPORT_DATA_SIZE)
        size_io = ctypes.c_uint32(size)
        buf = ctypes.create_string_buffer(size)
        gen_arg = _occlum_ioctl_structs()["GenDcapQuoteArg"]
        arg = gen_arg(ctypes.addressof(rd), ctypes.addressof(size_io), ctypes.addressof(buf))
        self._call(SGXIOC_GEN_DCAP_QUOTE, "GEN_DCAP_QUOTE", arg)
        # Occlum fills exactly GET_DCAP_QUOTE_SIZE bytes; honour a smaller size if it writes one back.
        if size_io.value > size:
            raise ProviderError(f"occlum: GEN_DCAP_QUOTE reported {size_io.value} bytes, "
                                  f"more than the {size}-byte buffer")
        return check_quote(buf.raw[: size_io.value], report_data, "occlum GEN_DCAP_QUOTE")


# ---------------------------------------------------------------------------------------------------
# Gramine: /dev/attestation pseudo-files
# ---------------------------------------------------------------------------------------------------


class GramineProvider:
    """Quotes from inside a Gramine-SGX enclave through /dev/attestation (attestation_type "dcap")."""

    name = "gramine"

    def __init__(self, root: str | os.PathLike[str] = GRAMINE_ROOT) -> None:
        from pathlib import Path

        self.root = Path(root)

    def attestation_type(self) -> str:
        raw = _read_limited(self.root / "attestation_type", 64, "gramine")
        return raw.rstrip(b"\0\n ").decode("ascii", "replace")

    def get_quote(self, report_data: bytes) -> bytes:
        report_data = _check_report_data(report_data)
        kind = self.attestation_type()
        if kind != "dcap":
            raise ProviderError(f"gramine: attestation_type is {kind!r}, need 'dcap' "
                                  "(set sgx.remote_attestation = \"dcap\" in the manifest)")
        urd = self.root / "user_report_data"
        _write_report_data(urd, report_data, "gramine")
        qpath = self.root / "quote"
        quote = _read_limited(qpath, MAX_QUOTE_SIZE, "gramine")
        return check_quote(quote, report_data, f"gramine {qpath}")


# ---------------------------------------------------------------------------------------------------
# TDX: the kernel's configfs-tsm report interface (Documentation/ABI/testing/configfs-tsm)
# ---------------------------------------------------------------------------------------------------

TSM_PROVIDER_TDX = "tdx_guest"
TSM_ATTEMPTS = 3  # a concurrent writer of our entry is a bug elsewhere: retry a little, then say so


class TdxProvider:
    """TD quotes through configfs-tsm: mkdir an entry, write `inblob`, read `outblob`.

    `generation` counts writes to the entry; read before and after, it tells whether another
    writer changed inblob between our write and our read (the quote would then be for its data).
    `mkdir` is the one step a plain directory cannot stand in for (configfs fills the new entry).
    """

    name = "tdx"

    def __init__(self, root: str | os.PathLike[str] = TSM_REPORT_ROOT, *,
                 mkdir: Callable[[str], None] = os.mkdir) -> None:
        from pathlib import Path

        self.root = Path(root)
        self._mkdir = mkdir

    def _generation(self, entry: Path) -> int:
        raw = _read_limited(entry / "generation", 32, "tdx").strip()
        if not raw.isdigit():
            raise ProviderError(f"tdx: {entry / 'generation'} holds {raw[:32]!r}, not a number")
        return int(raw)

    def get_quote(self, report_data: bytes) -> bytes:
        report_data = _check_report_data(report_data)
        entry = self.root / f"asps-{os.getpid()}-{os.urandom(4).hex()}"
        try:
            self._mkdir(str(entry))
        except OSError as exc:
            raise ProviderError(f"tdx: cannot create {entry}: {_os_reason(exc)} (is this a TD "
                                "with configfs mounted and a TSM provider loaded?)") from None
        try:
            return self._quote_in(entry, report_data)
        finally:
            with contextlib.suppress(OSError):  # tidying up must not hide the quote or the real error
                os.rmdir(entry)

    def _quote_in(self, entry: Path, report_data: bytes) -> bytes:
        provider = _read_limited(entry / "provider", 64, "tdx").strip().decode("ascii", "replace")
        if provider != TSM_PROVIDER_TDX:
            raise ProviderError(f"tdx: {entry / 'provider'} names {provider!r}, need {TSM_PROVIDER_TDX!r}")
        inblob, outblob = entry / "inblob", entry / "outblob"
        for _ in range(TSM_ATTEMPTS):
            before = self._generation(entry)
            _write_report_data(inblob, report_data, "tdx")
            quote = _read_limited(outblob, MAX_QUOTE_SIZE, "tdx")
            if self._generation(entry) == before + 1:
                return check_quote(quote, report_data, f"tdx {outblob}")
        raise ProviderError(f"tdx: {entry / 'generation'} changed under us {TSM_ATTEMPTS} times: another "
                            "writer uses this entry")



# ---------------------------------------------------------------------------------------------------
# detection and selection
# ---------------------------------------------------------------------------------------------------


def _is_occlum(device: str, environ: Mapping[str, str]) -> bool:
    """Occlum's LibOS shows /dev/sgx as a character device and sets OCCLUM=yes by default.

    On a host, SGX drivers make /dev/sgx a directory (/dev/sgx/enclave, /dev/sgx/provision), so a
    directory never counts.  A regular file only counts with OCCLUM=yes (what tests stand in with).
    """
    try:
        st = os.stat(device)
    except OSError:
        return False
    if stat.S_ISDIR(st.st_mode):
        return False
    return stat.S_ISCHR(st.st_mode) or environ.get("OCCLUM") == "yes"


def detect_provider(*, occlum_device: str = OCCLUM_DEVICE, gramine_root: str = GRAMINE_ROOT,
                    tsm_root: str = TSM_REPORT_ROOT, environ: Mapping[str, str] | None = None) -> str | None:
    """'occlum', 'gramine', 'tdx' or None: which enclave runtime (or TD) this process is running in.

    An enclave's own runtime wins over configfs-tsm: a TD may host SGX enclaves, never the reverse."""
    env = os.environ if environ is None else environ
    if _is_occlum(str(occlum_device), env):
        return "occlum"
    if os.path.exists(os.path.join(gramine_root, "quote")):
        return "gramine"
    if os.path.isdir(tsm_root):
        return "tdx"
    return None


_OCCLUM_OPTIONS = frozenset({"device", "ioctl"})
_GRAMINE_OPTIONS = frozenset({"root"})
_TDX_OPTIONS = frozenset({"tsm_root", "mkdir"})
PROVIDER_NAMES = ("occlum", "gramine", "tdx", "sim")


def get_provider(name: str | None = None, **options: Any) -> Any:
    """The quote provider called `name`, or the one detected when name is None.

    Options go to the provider: occlum (device, ioctl), gramine (root), tdx (tsm_root, mkdir), sim
    (sgxsim.SimProvider's).  With name None, `device`/`root`/`tsm_root` also steer detection and
    `environ` replaces os.environ for it.
    """
    if name is None:
        environ = options.pop("environ", None)
        unknown = set(options) - _OCCLUM_OPTIONS - _GRAMINE_OPTIONS - _TDX_OPTIONS
        if unknown:
            raise ProviderError(f"unknown provider option(s) for detection: "
                                     f"{', '.join(sorted(unknown))}")
        device = str(options.get("device", OCCLUM_DEVICE))
        root = str(options.get("root", GRAMINE_ROOT))
        tsm = str(options.get("tsm_root", TSM_REPORT_ROOT))
        name = detect_provider(occlum_device=device, gramine_root=root, tsm_root=tsm, environ=environ)
        if name is None:
            raise ProviderError(
                f"no SGX quote provider detected: looked for Occlum ({device} as a character device, "
                f"or with OCCLUM=yes), Gramine ({os.path.join(root, 'quote')}) and a TD's configfs-tsm "
                f"({tsm}); name one explicitly, e.g. 'sim' for the simulated platform")
        allowed = {"occlum": _OCCLUM_OPTIONS, "gramine": _GRAMINE_OPTIONS, "tdx": _TDX_OPTIONS}[name]
        options = {k: v for k, v in options.items() if k in allowed}
    if name == "occlum":
        _reject_options(options, _OCCLUM_OPTIONS, name)
        return OcclumProvider(**options)
    if name == "gramine":
        _reject_options(options, _GRAMINE_OPTIONS, name)
        return GramineProvider(**options)
    if name == "tdx":
        _reject_options(options, _TDX_OPTIONS, name)
        tdx_options = dict(options)
        return TdxProvider(tdx_options.pop("tsm_root", TSM_REPORT_ROOT), **tdx_options)
    if name == "sim":
        import sgxsim  # dev/test only, loaded when asked for; sgxsim imports only the quote format

        try:
            return sgxsim.SimProvider(**options)
        except TypeError as exc:
            raise ProviderError(f"sim provider: {exc}") from None
    raise ProviderError(f"unknown quote provider {name!r} (choose one of {', '.join(PROVIDER_NAMES)})")


def _reject_options(options: Mapping[str, Any], allowed: frozenset[str], name: str) -> None:
    unknown = set(options) - allowed
    if unknown:
        raise ProviderError(f"{name} provider: unknown option(s) {', '.join(sorted(unknown))} "
                              f"(accepted: {', '.join(sorted(allowed))})")
