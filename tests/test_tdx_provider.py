"""The TDX quote provider (configfs-tsm) against a stand-in tree that behaves as the kernel's does.

No machine here is a TD, so the report directory is a temporary directory and `mkdir` is the stand-in
kernel's: it fills the new entry as configfs does (`provider`, `generation`, and FIFOs `inblob` and
`outblob` served by a thread: what is written to inblob bumps `generation` and becomes the quote's
report_data).  A provider that read outblob without writing inblob first would block, not pass.  The
stand-in can play a racing writer (generation bumped twice) and other providers (sev_guest, none).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

import pytest

import attester
import dcap
import dcap_quote
import ratls_attest
import sgxsim

RD = bytes(range(64))


class TsmKernel:
    """configfs-tsm's report directory, as far as a quote provider sees it."""

    def __init__(self, root: Path, plat: sgxsim.SimPlatform, *, provider: str | None = "tdx_guest",
                 races: int = 0, quote_for=None) -> None:
        self.root, self.plat, self.provider, self.races = root, plat, provider, races
        self.quote_for = quote_for or (lambda rd: plat.make_td_quote(rd))
        self.entries: list[Path] = []
        self.served: list[bytes] = []
        self._threads: list[threading.Thread] = []
        root.mkdir(parents=True, exist_ok=True)

    def mkdir(self, path: str) -> None:
        entry = Path(path)
        os.mkdir(entry)
        self.entries.append(entry)
        if self.provider is not None:
            (entry / "provider").write_text(self.provider + "\n")
        (entry / "generation").write_text("0\n")
        os.mkfifo(entry / "inblob")
        os.mkfifo(entry / "outblob")
        t = threading.Thread(target=self._serve, args=(entry,), daemon=True)
        t.start()
        self._threads.append(t)

    def _serve(self, entry: Path) -> None:
        while True:
            with open(entry / "inblob", "rb") as f:
                rd = f.read()
            if not rd:  # woken by close()
                return
            self.served.append(rd)
            gen = int((entry / "generation").read_text()) + 1
            if self.races > 0:  # another writer wrote inblob after us
                self.races -= 1
                gen += 1
            (entry / "generation").write_text(f"{gen}\n")
            with contextlib.suppress(BrokenPipeError), open(entry / "outblob", "wb") as f:
                f.write(self.quote_for(rd))

    def close(self) -> None:
        deadline = time.monotonic() + 5
        for entry, t in zip(self.entries, self._threads, strict=True):
            while t.is_alive() and time.monotonic() < deadline:
                with contextlib.suppress(OSError):
                    os.close(os.open(entry / "inblob", os.O_WRONLY | os.O_NONBLOCK))
                t.join(timeout=0.02)
            assert not t.is_alive(), "stand-in kernel thread did not stop"


@pytest.fixture
def tsm(tmp_path, sim_platform):
    made: list[TsmKernel] = []

    def make(**kw) -> TsmKernel:
        k = TsmKernel(tmp_path / f"tsm{len(made)}" / "report", sim_platform, **kw)
        made.append(k)
        return k

    yield make
    for k in made:
        k.close()


def provider(kernel: TsmKernel) -> attester.TdxProvider:
    return attester.get_provider("tdx", tsm_root=str(kernel.root), mkdir=kernel.mkdir)


def test_td_quote_carries_our_report_data_and_verifies(tsm, sim_platform):
    kernel = tsm()
    quote = provider(kernel).get_quote(RD)
    assert kernel.served == [RD]
    parsed = dcap_quote.parse_quote(quote)
    assert parsed.is_td and parsed.report.report_data == RD
    verified = dcap.verify(quote, sim_platform.tdx_collateral(), root_ca=sim_platform.root_ca_der)
    assert verified.tee_type == "TDX" and verified.td_report.report_data == RD


def test_each_quote_uses_a_fresh_entry(tsm):
    kernel = tsm()
    p = provider(kernel)
    p.get_quote(RD)
    p.get_quote(bytes(64))
    assert len({e.name for e in kernel.entries}) == 2 and kernel.served == [RD, bytes(64)]


def test_a_racing_writer_is_detected_and_the_write_retried(tsm):
    kernel = tsm(races=2)
    quote = provider(kernel).get_quote(RD)
    assert kernel.served == [RD, RD, RD]
    assert dcap_quote.parse_quote(quote).report.report_data == RD


def test_a_writer_racing_every_time_is_an_error_naming_generation(tsm):
    kernel = tsm(races=attester.TSM_ATTEMPTS)
    with pytest.raises(attester.ProviderError, match=r"generation changed under us 3 times") as info:
        provider(kernel).get_quote(RD)
    assert str(kernel.root) in str(info.value)


@pytest.mark.parametrize(("name", "needle"), [("sev_guest", r"names 'sev_guest', need 'tdx_guest'"),
                                              (None, r"cannot read .*provider: ENOENT")])
def test_another_or_missing_provider_is_refused(tsm, name, needle):
    kernel = tsm(provider=name)
    with pytest.raises(attester.ProviderError, match=needle):
        provider(kernel).get_quote(RD)
    assert kernel.served == []


def test_no_configfs_tsm_names_the_directory_and_errno(tmp_path):
    root = tmp_path / "no" / "report"
    with pytest.raises(attester.ProviderError, match=r"tdx: cannot create .*: ENOENT") as info:
        attester.get_provider("tdx", tsm_root=str(root)).get_quote(RD)
    assert str(root) in str(info.value)


def test_a_plain_directory_is_not_configfs(tmp_path):
    """Without the kernel, mkdir makes an empty entry: reading `provider` fails, naming the file."""
    with pytest.raises(attester.ProviderError, match=r"cannot read .*/provider: ENOENT"):
        attester.get_provider("tdx", tsm_root=str(tmp_path)).get_quote(RD)
    assert list(tmp_path.iterdir()) == []  # the entry was removed


def test_a_quote_for_other_report_data_is_refused(tsm, sim_platform):
    kernel = tsm(quote_for=lambda rd: sim_platform.make_td_quote(bytes(64)))
    with pytest.raises(attester.ProviderError, match=r"outblob returned a quote for different"):
        provider(kernel).get_quote(RD)


def test_garbage_outblob_is_refused(tsm):
    kernel = tsm(quote_for=lambda rd: b"\x04\x00" + bytes(1000))
    with pytest.raises(attester.ProviderError, match=r"outblob returned a malformed quote"):
        provider(kernel).get_quote(RD)


def test_report_data_must_be_64_bytes(tsm):
    with pytest.raises(attester.ProviderError, match="exactly 64 bytes"):
        provider(tsm()).get_quote(b"short")


def test_detection_picks_tdx_after_the_enclave_runtimes(tmp_path):
    tsm_root = tmp_path / "tsm" / "report"
    gramine = tmp_path / "attestation"

    def detect():
        return attester.detect_provider(occlum_device=str(tmp_path / "nosgx"), gramine_root=str(gramine),
                                        tsm_root=str(tsm_root), environ={})

    assert detect() is None
    tsm_root.mkdir(parents=True)
    assert detect() == "tdx"
    p = attester.get_provider(device=str(tmp_path / "nosgx"), root=str(gramine), tsm_root=str(tsm_root),
                              environ={})
    assert isinstance(p, attester.TdxProvider) and p.root == tsm_root
    gramine.mkdir()
    (gramine / "quote").write_bytes(b"")
    assert detect() == "gramine"


def test_tdx_provider_options_are_checked():
    assert attester.get_provider("tdx").root == Path(attester.TSM_REPORT_ROOT)
    with pytest.raises(attester.ProviderError, match=r"tdx provider: unknown option\(s\) device"):
        attester.get_provider("tdx", device="/x")


def test_td_certificate_from_the_configfs_provider(tsm, sim_platform):
    """The enclave side end to end: configfs-tsm quote in a DICE RA-TLS certificate."""
    kernel = tsm()
    der, _key = ratls_attest.make_certificate(provider(kernel), fmt="dice")
    assert len(kernel.served) == 1
    import ratls

    ident = ratls.verify_evidence(der, dcap.Verifier(sim_platform.tdx_collateral(),
                                                     root_ca=sim_platform.root_ca_der))
    assert ident.tee == "tdx" and ident.mr_td == sgxsim.DEFAULT_MR_TD and ident.evidence_format == "dice"


def test_the_client_makes_dice_evidence_in_a_td(tsm, sim_platform):
    """asps_client's evidence step picks the DICE shape for the tdx provider (no flag needed)."""
    import asps_client
    import ratls

    kernel = tsm()
    ev = asps_client.make_evidence("tdx", key_type="p256", tsm_root=str(kernel.root), mkdir=kernel.mkdir)
    ident = ratls.verify_evidence(ev.cert_der, dcap.Verifier(sim_platform.tdx_collateral(),
                                                             root_ca=sim_platform.root_ca_der))
    assert (ident.tee, ident.evidence_format) == ("tdx", "dice") and len(kernel.served) == 1


def _hostile_entry(tmp_path: Path, **links: str):
    """A `mkdir` that makes an entry whose named attributes are symbolic links (a wrong tsm_root, or a
    hostile file system): the provider must neither follow them nor read without bound."""

    def mkdir(path: str) -> None:
        entry = Path(path)
        os.mkdir(entry)
        (entry / "provider").write_text("tdx_guest\n")
        (entry / "generation").write_text("0\n")
        for name in ("inblob", "outblob"):
            (entry / name).write_bytes(b"")
        for name, target in links.items():
            (entry / name).unlink(missing_ok=True)
            os.symlink(target, entry / name)

    root = tmp_path / "hostile" / "report"
    root.mkdir(parents=True)
    return attester.get_provider("tdx", tsm_root=str(root), mkdir=mkdir)


@pytest.mark.parametrize("name", ["outblob", "generation", "provider"])
def test_an_attribute_that_is_a_link_to_an_endless_file_is_refused_not_read(tmp_path, name):
    with pytest.raises(attester.ProviderError, match=name):
        _hostile_entry(tmp_path, **{name: "/dev/zero"}).get_quote(RD)


def test_report_data_is_never_written_through_a_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"untouched")
    with pytest.raises(attester.ProviderError, match="inblob"):
        _hostile_entry(tmp_path, inblob=str(victim)).get_quote(RD)
    assert victim.read_bytes() == b"untouched"


def test_an_oversized_attribute_is_refused(tmp_path):
    big = tmp_path / "big"
    big.write_bytes(b"1" * 100)

    def mkdir(path: str) -> None:
        entry = Path(path)
        os.mkdir(entry)
        (entry / "provider").write_text("tdx_guest\n")
        (entry / "generation").write_bytes(b"1" * 100)  # more than any counter's digits

    root = tmp_path / "big-gen" / "report"
    root.mkdir(parents=True)
    with pytest.raises(attester.ProviderError, match="generation holds more than 32 bytes"):
        attester.get_provider("tdx", tsm_root=str(root), mkdir=mkdir).get_quote(RD)


def test_gramine_reads_its_quote_with_the_same_bound_and_no_links(tmp_path):
    """Gramine's /dev/attestation goes through the same bounded, link-refusing read as configfs-tsm."""
    root = tmp_path / "attestation"
    root.mkdir()
    (root / "attestation_type").write_text("dcap")
    (root / "user_report_data").write_bytes(bytes(64))
    os.symlink("/dev/zero", root / "quote")
    gramine = attester.get_provider("gramine", root=str(root))
    with pytest.raises(attester.ProviderError, match=r"gramine: cannot read .*quote"):
        gramine.get_quote(RD)
    (root / "quote").unlink()
    (root / "quote").write_bytes(b"\1" * (attester.MAX_QUOTE_SIZE + 1))
    with pytest.raises(attester.ProviderError, match="holds more than"):
        gramine.get_quote(RD)
