"""Coverage-guided fuzzing (atheris / libFuzzer) of ASPS's untrusted-input parsers, for long runs.

Not part of the test suite (tests/test_fuzz_parsers.py is the quick, reproducible Hypothesis
version).  Atheris instruments the Python bytecode of dcap, ratls and policy, so it steers towards
new branches instead of guessing: worth a few hours before a release.

    pip install atheris        # a cp311 manylinux wheel exists; not in requirements-dev.txt
    python bench/fuzz_atheris.py quote -max_total_time=600
    python bench/fuzz_atheris.py evidence corpus_dir/ -max_total_time=3600
    python bench/fuzz_atheris.py --list

Targets: quote (parse_quote), verify (Verifier.verify of a mutated genuine sample quote),
collateral (Collateral.from_json), tcb (parse_tcb_info + parse_qe_identity), evidence
(ratls.verify_evidence of a self-signed certificate whose RA-TLS extension holds the input), dice
(the same, input as the DICE CBOR extension), refvals (ReferenceValues.from_dict of input JSON),
policy (policy.load_policy of the input file).  Seeds come from ../shared/samples and the shipped
policies.  A crash is any exception other than the target's documented one; libFuzzer then
writes the input to crash-<sha1> and stops.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO.parent / "shared" / "samples"
sys.path.insert(0, str(REPO))

import atheris  # noqa: E402

with atheris.instrument_imports():
    import dcap
    import dcap_quote
    import policy
    import ratls
    import ratls_attest
    from dcap_collateral import Collateral

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402


def _seeds(pattern: str) -> list[bytes]:
    return [p.read_bytes() for p in sorted(SAMPLES.glob(pattern))]


def _sample_case() -> tuple[bytes, dcap.Verifier, int]:
    d = SAMPLES / "intel-sgx-v3"
    coll = Collateral.from_json((d / "collateral.json").read_text())
    now = json.loads((d / "expected.json").read_text())["now"]
    return (d / "quote.bin").read_bytes(), dcap.Verifier(coll), now


def _sim():
    import sgxsim

    plat = sgxsim.SimPlatform.init(Path(tempfile.gettempdir()) / "asps-atheris-sim")
    return plat, dcap.Verifier(plat.collateral(), root_ca=plat.root_ca_der)


def _cert_with(key: ec.EllipticCurvePrivateKey, oid: str, value: bytes) -> bytes:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .serial_number(1)
        .public_key(key.public_key())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value), False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


def target(name: str) -> tuple[Callable[[bytes], None], list[bytes]]:
    """(one-input function, seeds) for a target name."""
    if name == "quote":

        def run(data: bytes) -> None:
            with contextlib.suppress(dcap_quote.QuoteError):
                dcap_quote.parse_quote(data)

        return run, _seeds("**/quote.bin")
    if name == "verify":
        quote, verifier, now = _sample_case()

        def run(data: bytes) -> None:
            with contextlib.suppress(dcap.DcapError):
                verifier.verify(data, now=now)

        return run, [quote]
    if name == "collateral":

        def run(data: bytes) -> None:
            with contextlib.suppress(dcap.CollateralError):
                Collateral.from_json(data)

        return run, _seeds("**/collateral.json")
    if name == "tcb":
        seeds = []
        for text in _seeds("**/collateral.json"):
            c = Collateral.from_json(text)
            seeds += [c.tcb_info.encode(), c.qe_identity.encode()]

        def run(data: bytes) -> None:
            text = data.decode("utf-8", "replace")
            for parse in (dcap.parse_tcb_info, dcap.parse_qe_identity):
                with contextlib.suppress(dcap.CollateralError):
                    parse(text)

        return run, seeds
    if name in ("evidence", "dice"):
        plat, verifier = _sim()
        key = ec.generate_private_key(ec.SECP256R1())
        oid = (ratls_attest.OID_CCZOO_QUOTE if name == "evidence"
               else ratls_attest.OID_TCG_DICE_TAGGED_EVIDENCE)
        spki_hash = ratls_attest.pubkey_hash(key.public_key())
        if name == "evidence":
            seeds = [plat.make_quote(spki_hash + bytes(32))]
        else:
            claims = ratls_attest.dice_claims(key.public_key())
            seeds = [
                ratls_attest.dice_evidence(plat.make_quote(hashlib.sha256(claims).digest() + bytes(32)),
                                           claims)
            ]

        def run(data: bytes) -> None:
            with contextlib.suppress(ratls.EvidenceError):
                ratls.verify_evidence(_cert_with(key, oid, data), verifier)

        return run, seeds
    if name == "refvals":

        def run(data: bytes) -> None:
            try:
                value = json.loads(data)
            except (ValueError, RecursionError):
                return
            with contextlib.suppress(policy.ReferenceValuesError):
                policy.ReferenceValues.from_dict(value)

        return run, [json.dumps({"mr_enclave": "00" * 32, "allowed_tcb_statuses": ["UpToDate"]}).encode()]
    if name == "policy":
        path = Path(tempfile.mkdtemp(prefix="asps-atheris-policy-")) / "policy.json"

        def run(data: bytes) -> None:
            path.write_bytes(data)
            with contextlib.suppress(policy.PolicyError):
                policy.load_policy(path)

        return run, [(REPO / "policy_vault.json").read_bytes(), (REPO / "policy_no_kms.json").read_bytes()]
    raise SystemExit(f"unknown target {name!r}; try --list")


TARGETS = ("quote", "verify", "collateral", "tcb", "evidence", "dice", "refvals", "policy")


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help", "--list"):
        print(__doc__)
        print("targets:", ", ".join(TARGETS))
        return
    name = sys.argv.pop(1)
    run, seeds = target(name)
    corpus = [a for a in sys.argv[1:] if not a.startswith("-")]
    if not corpus:  # seed a fresh corpus directory so libFuzzer starts from genuine inputs
        seed_dir = Path(tempfile.mkdtemp(prefix=f"asps-atheris-{name}-"))
        for i, seed in enumerate(seeds):
            (seed_dir / f"seed{i}").write_bytes(seed)
        sys.argv.append(str(seed_dir))
        print(f"corpus: {seed_dir}", file=sys.stderr)
    atheris.Setup(sys.argv, run)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
