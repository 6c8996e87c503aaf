"""802.1Q tagging and demultiplexing as eBPF programs for tc: pure bytecode builders.

Some kernels have no VLAN devices (CONFIG_VLAN_8021Q unset, and with it the bridge's VLAN
filtering and tc's vlan action are gone too) but run eBPF classifiers. There a VLAN "link" is a
veth end whose egress program pushes the tag and redirects the frame out of the parent
(``tagger``), and the parent's ingress program pops the tag of a frame with a known VLAN id and
redirects it into that link as if it had arrived there (``demux``). On the wire the frames are
real 802.1Q frames: the tag travels in the skb's VLAN metadata, as with hardware offload, and
``tcpdump``/AF_PACKET see ``vlan <id>``.

The programs are straight-line code generated per configuration (one compare per VLAN id, no
maps): a few instructions per branch, replaced whole when the set changes. Being a pure
function of the configuration, a program attached in the kernel is recognised by its tag
(``tags``): the kernel's hash of the instructions, reported by tc.
"""

from __future__ import annotations

import hashlib
import socket
import struct
from collections.abc import Sequence

import attrs

# struct __sk_buff offsets (uapi/linux/bpf.h).
_VLAN_PRESENT = 20
_VLAN_TCI = 24
# Helper ids (enum bpf_func_id).
_VLAN_PUSH = 18
_VLAN_POP = 19
_REDIRECT = 23
_LOAD_BYTES = 26
BPF_F_INGRESS = 1
TC_ACT_OK = 0
ETH_P_8021Q = 0x8100
VLAN_VID_MASK = 0x0FFF

# Opcodes used here (class | op | source).
_MOV64_X = 0xBF
_MOV64_K = 0xB7
_ADD64_K = 0x07
_AND64_K = 0x57
_LDX_W = 0x61
_LDX_H = 0x69
_JEQ_K = 0x15
_JNE_K = 0x55
_JNE32_K = 0x56
_CALL = 0x85
_EXIT = 0x95

_R0, _R1, _R2, _R3, _R4, _R6, _R7, _FP = 0, 1, 2, 3, 4, 6, 7, 10


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def _s32(value: int) -> int:
    """``value`` (0..2**32-1) as the signed 32-bit immediate with the same bits."""
    return struct.unpack("<i", struct.pack("<I", value & 0xFFFFFFFF))[0]  # type: ignore[no-any-return]


@attrs.frozen(kw_only=True)
class Branch:
    """One branch of a parent link: frames tagged ``vlan_id`` (and, if ``mac`` is set, sent from
    that MAC: the VPC's side checks the branch ENI's) go to interface ``ifindex``."""

    vlan_id: int
    ifindex: int
    mac: str | None = None


class _Asm:
    """A few instructions with forward jumps to named labels."""

    def __init__(self) -> None:
        self.code: list[bytes | tuple[int, int, int, str]] = []
        self.labels: dict[str, int] = {}

    def op(self, code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> None:
        self.code.append(_insn(code, dst, src, off, imm))

    def jump(self, code: int, reg: int, imm: int, label: str) -> None:
        self.code.append((code, reg, imm, label))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def assemble(self) -> bytes:
        out = []
        for at, item in enumerate(self.code):
            if isinstance(item, bytes):
                out.append(item)
            else:
                code, reg, imm, label = item
                out.append(_insn(code, reg, off=self.labels[label] - at - 1, imm=_s32(imm)))
        return b"".join(out)


def tagger(vlan_id: int, parent_ifindex: int) -> bytes:
    """Egress program of a branch link: push the tag, send the frame out of the parent."""
    asm = _Asm()
    asm.op(_MOV64_X, _R6, _R1)
    asm.op(_MOV64_X, _R1, _R6)
    asm.op(_MOV64_K, _R2, imm=socket.htons(ETH_P_8021Q))
    asm.op(_MOV64_K, _R3, imm=vlan_id)
    asm.op(_CALL, imm=_VLAN_PUSH)
    asm.op(_MOV64_K, _R1, imm=parent_ifindex)
    asm.op(_MOV64_K, _R2, imm=0)
    asm.op(_CALL, imm=_REDIRECT)
    asm.op(_EXIT)
    return asm.assemble()


def _mac_compare(asm: _Asm, mac: str, miss: str) -> None:
    raw = bytes.fromhex(mac.replace(":", ""))
    asm.op(_LDX_W, _R2, _FP, -8)
    asm.jump(_JNE32_K, _R2, struct.unpack("<I", raw[:4])[0], miss)
    asm.op(_LDX_H, _R2, _FP, -4)
    asm.jump(_JNE32_K, _R2, struct.unpack("<H", raw[4:])[0], miss)


def _deliver(asm: _Asm, ifindex: int) -> None:
    asm.op(_MOV64_X, _R1, _R6)
    asm.op(_CALL, imm=_VLAN_POP)
    asm.op(_MOV64_K, _R1, imm=ifindex)
    asm.op(_MOV64_K, _R2, imm=BPF_F_INGRESS)
    asm.op(_CALL, imm=_REDIRECT)
    asm.op(_EXIT)


def demux(branches: Sequence[Branch]) -> bytes:
    """Ingress program of a parent link: a tagged frame whose VLAN id (and source MAC, where
    given) is a branch's loses its tag and arrives on that branch's link; every other frame
    goes on unchanged (untagged ones are the parent's own; the rest are for netfilter to
    refuse, or dropped by the stack as another host's)."""
    if len({b.vlan_id for b in branches}) != len(branches):
        raise ValueError("VLAN ids must be unique on one parent")
    asm = _Asm()
    asm.op(_MOV64_X, _R6, _R1)
    if any(b.mac for b in branches):
        # The source MAC (bytes 6-11 of the frame) onto the stack at fp-8.
        asm.op(_MOV64_X, _R1, _R6)
        asm.op(_MOV64_K, _R2, imm=6)
        asm.op(_MOV64_X, _R3, _FP)
        asm.op(_ADD64_K, _R3, imm=-8)
        asm.op(_MOV64_K, _R4, imm=6)
        asm.op(_CALL, imm=_LOAD_BYTES)
        asm.jump(_JNE_K, _R0, 0, "pass")
    asm.op(_LDX_W, _R2, _R6, _VLAN_PRESENT)
    asm.jump(_JEQ_K, _R2, 0, "pass")
    asm.op(_LDX_W, _R7, _R6, _VLAN_TCI)
    asm.op(_AND64_K, _R7, imm=VLAN_VID_MASK)
    for i, branch in enumerate(branches):
        asm.jump(_JNE_K, _R7, branch.vlan_id, f"next{i}")
        if branch.mac:
            _mac_compare(asm, branch.mac, "pass")
        _deliver(asm, branch.ifindex)
        asm.label(f"next{i}")
    asm.label("pass")
    asm.op(_MOV64_K, _R0, imm=TC_ACT_OK)
    asm.op(_EXIT)
    return asm.assemble()


def tags(program: bytes) -> frozenset[str]:
    """The tags the kernel may give ``program`` (``tc filter show``'s ``tag``, TCA_BPF_TAG, in
    hex): the first 8 bytes of its SHA-256 (recent kernels: 6.18 has it) or SHA-1 (older) over
    the instructions as loaded (these programs hold no map references, which the kernel would
    blank out first)."""
    return frozenset(hashlib.new(h, program).hexdigest()[:16] for h in ("sha256", "sha1"))
