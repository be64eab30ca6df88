"""A tiny DER writer for tests: the one copy the tests use to craft certificates, CRLs and extensions.

Independent on purpose of sgxsim's encoder and of every parser under test (dcap, ratls,
`cryptography`), so a test does not trust the code it checks.  Import as ``der_writer`` (tests/ is on
sys.path, like asps_testkit).
"""

from __future__ import annotations


def length(n: int) -> bytes:
    """A DER length: short form below 0x80, else 0x80|count followed by big-endian bytes."""
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def tlv(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + length(len(content)) + content


def seq(*items: bytes) -> bytes:
    return tlv(0x30, b"".join(items))


def oid_content(dotted: str) -> bytes:
    """DER content bytes of an OBJECT IDENTIFIER (first two arcs folded, base-128 arcs)."""
    arcs = [int(a) for a in dotted.split(".")]
    out = bytearray()
    for a in [40 * arcs[0] + arcs[1], *arcs[2:]]:
        chunk = [a & 0x7F]
        a >>= 7
        while a:
            chunk.append(0x80 | (a & 0x7F))
            a >>= 7
        out += bytes(reversed(chunk))
    return bytes(out)


def oid_raw(content: bytes) -> bytes:
    """An OBJECT IDENTIFIER from its content bytes as given (malformed ones included)."""
    return tlv(0x06, content)
