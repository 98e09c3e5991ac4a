"""The bare multisig script template: builder, tokenizer and strict parser (no dependencies).

The only script this verifier accepts, as the witness script (p2wsh, p2sh-p2wsh) or the
redeem script (p2sh), with the keys sorted as BIP-67 says (lexicographic bytes):

    OP_m      0x21 <key_1: 33 bytes>  ...  0x21 <key_n: 33 bytes>   OP_n      OP_CHECKMULTISIG
    0x50+m    push 33                      push 33                  0x50+n    0xae

1 <= m <= n <= 20; every key compressed (first byte 0x02 or 0x03); nothing before OP_m and
nothing after OP_CHECKMULTISIG.
"""

from __future__ import annotations

from dataclasses import dataclass

OP_0 = 0x00
OP_PUSHDATA1 = 0x4C
OP_PUSHDATA2 = 0x4D
OP_PUSHDATA4 = 0x4E
OP_1NEGATE = 0x4F
OP_1 = 0x51
OP_16 = 0x60
OP_CHECKMULTISIG = 0xAE
KEY_PUSH = 0x21  # direct push of the next 33 bytes


def small_int_opcode(value: int) -> int:
    """OP_1..OP_16 for 1..16; raises ValueError otherwise."""
    if not 1 <= value <= 16:
        raise ValueError(f"{value} has no small-integer opcode")
    return OP_1 + value - 1


def build_multisig(m: int, keys: list[bytes]) -> bytes:
    """OP_m <key>... OP_n OP_CHECKMULTISIG with the keys in the order given.

    Raises ValueError if m or n is outside 1..16 or a key is not 33 bytes.
    """
    if any(len(k) != 33 for k in keys):
        raise ValueError("every key must be 33 bytes")
    pushes = b"".join(bytes([KEY_PUSH]) + k for k in keys)
    return bytes([small_int_opcode(m)]) + pushes + bytes([small_int_opcode(len(keys))]) + b"\xae"


@dataclass(frozen=True)
class Op:
    """One script element: its offset, opcode, and the data it pushes (None if no push)."""

    offset: int
    opcode: int
    data: bytes | None

    @property
    def size(self) -> int:
        """Encoded length in bytes."""
        if self.data is None:
            return 1
        header = {OP_PUSHDATA1: 2, OP_PUSHDATA2: 3, OP_PUSHDATA4: 5}.get(self.opcode, 1)
        return header + len(self.data)


class ScriptError(ValueError):
    """A script that cannot be read as the multisig template; the message says why."""


def tokenize(script: bytes) -> list[Op]:
    """Split ``script`` into elements. Raises ScriptError on a push that runs past the end."""
    ops: list[Op] = []
    pos = 0
    while pos < len(script):
        opcode = script[pos]
        start = pos
        pos += 1
        if OP_0 < opcode < OP_PUSHDATA1:
            length = opcode
        elif opcode in (OP_PUSHDATA1, OP_PUSHDATA2, OP_PUSHDATA4):
            width = {OP_PUSHDATA1: 1, OP_PUSHDATA2: 2, OP_PUSHDATA4: 4}[opcode]
            if pos + width > len(script):
                raise ScriptError(f"push length at byte {start} runs past the end")
            length = int.from_bytes(script[pos : pos + width], "little")
            pos += width
        else:
            ops.append(Op(start, opcode, None))
            continue
        if pos + length > len(script):
            raise ScriptError(f"push of {length} bytes at byte {start} runs past the end")
        ops.append(Op(start, opcode, script[pos : pos + length]))
        pos += length
    return ops


def _small_int(op: Op) -> int | None:
    return op.opcode - OP_1 + 1 if op.data is None and OP_1 <= op.opcode <= OP_16 else None


@dataclass(frozen=True)
class Multisig:
    """What a script says, read leniently enough to name every deviation from the template."""

    m: int
    n: int
    keys: tuple[bytes, ...]
    key_opcodes: tuple[int, ...]
    bytes_before: int
    bytes_after: int


def parse_multisig(script: bytes) -> Multisig:
    """Find OP_m <push>... OP_n OP_CHECKMULTISIG in ``script`` and report what surrounds it.

    Raises ScriptError if there is no such pattern at all (message names what is missing).
    Extra bytes before/after, non-33-byte pushes and m/n values are left to the caller.
    """
    ops = tokenize(script)
    cms = [i for i, op in enumerate(ops) if op.opcode == OP_CHECKMULTISIG and op.data is None]
    if not cms:
        raise ScriptError("no OP_CHECKMULTISIG")
    end = cms[0]
    if end == 0 or _small_int(ops[end - 1]) is None:
        raise ScriptError("OP_CHECKMULTISIG is not preceded by OP_n (n = 1..16)")
    n = _small_int(ops[end - 1])
    first_key = end - 1
    while first_key > 0 and ops[first_key - 1].data is not None:
        first_key -= 1
    if first_key == 0 or _small_int(ops[first_key - 1]) is None:
        raise ScriptError("the key pushes are not preceded by OP_m (m = 1..16)")
    m = _small_int(ops[first_key - 1])
    assert m is not None and n is not None
    keys = ops[first_key : end - 1]
    after = ops[end].offset + 1
    return Multisig(
        m=m,
        n=n,
        keys=tuple(op.data or b"" for op in keys),
        key_opcodes=tuple(op.opcode for op in keys),
        bytes_before=ops[first_key - 1].offset,
        bytes_after=len(script) - after,
    )


def p2wsh_script_pubkey(program: bytes) -> bytes:
    """OP_0 <32-byte SHA256 of the witness script>: 0x00 0x20 <program>."""
    return b"\x00\x20" + program


def p2sh_script_pubkey(script_hash: bytes) -> bytes:
    """OP_HASH160 <20-byte hash> OP_EQUAL: 0xa9 0x14 <hash> 0x87."""
    return b"\xa9\x14" + script_hash + b"\x87"
