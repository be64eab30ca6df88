"""Shared by the stand-in commands: the call log and the stand-in enclave file.

The stand-ins replace Occlum, copy_bom, sgx_sign and gramine-manifest in tests so that
build_occlum_instance.sh and the Gramine template can be checked on a machine without SGX.
Each call is appended as one JSON line to $ASPS_STANDIN_LOG (when set), so a test can
assert the exact command sequence.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

SIGNED_SO_MAGIC = "ASPS-STANDIN-SIGNED-ENCLAVE"


def record(tool: str, argv: list[str]) -> None:
    """Append one call to the log named by ASPS_STANDIN_LOG."""
    log = os.environ.get("ASPS_STANDIN_LOG")
    if not log:
        return
    entry = {"tool": tool, "argv": argv, "cwd": os.getcwd()}
    with open(log, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


def fail(tool: str, message: str, code: int = 1) -> None:
    """Exit like the real tool would on a usage error."""
    print(f"{tool} (stand-in): error: {message}", file=sys.stderr)
    sys.exit(code)


def tree_digest(root: Path) -> bytes:
    """SHA-256 over the paths, link targets and file bytes under root (not mtimes)."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            h.update(f"L {rel} {os.readlink(path)}\n".encode())
        elif path.is_dir():
            h.update(f"D {rel}\n".encode())
        else:
            h.update(f"F {rel} {len(path.read_bytes())}\n".encode())
            h.update(path.read_bytes())
    return h.digest()


def write_signed_so(path: Path, mr_enclave: bytes, mr_signer: bytes) -> None:
    """The stand-in 'enclave': a text file carrying the two measurements."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{SIGNED_SO_MAGIC}\nmrenclave {mr_enclave.hex()}\nmrsigner {mr_signer.hex()}\n")


def read_signed_so(path: Path) -> tuple[bytes, bytes]:
    """Inverse of write_signed_so; ValueError when the file is not a stand-in enclave."""
    lines = path.read_text(errors="replace").splitlines()
    if len(lines) < 3 or lines[0] != SIGNED_SO_MAGIC:
        raise ValueError(f"{path} is not a stand-in signed enclave")
    fields = dict(line.split(" ", 1) for line in lines[1:3])
    return bytes.fromhex(fields["mrenclave"]), bytes.fromhex(fields["mrsigner"])
