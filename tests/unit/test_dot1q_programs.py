"""The 802.1Q eBPF programs (netlink/dot1q/programs.py), run on a tiny
interpreter of the instructions they use: pure, no kernel. That the kernel's verifier takes them
and frames really travel tagged is in tests/integration/test_dot1q.py and
tests/e2e/test_emulator_vlans.py."""

from __future__ import annotations

import socket
import struct

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from netlink.dot1q.programs import BPF_F_INGRESS, TC_ACT_OK, Branch, demux, tagger, tags

TC_ACT_REDIRECT = 7


@attrs.define
class Frame:
    src_mac: bytes
    vlan: int | None = None  # the tag, in the skb's metadata as on veth
    calls: list[tuple[str, tuple[int, ...]]] = attrs.field(factory=list)


def run(program: bytes, frame: Frame) -> int:
    """Execute ``program`` on ``frame``; return r0 at exit, recording the helper calls."""
    insns = [struct.unpack("<BBhi", program[i : i + 8]) for i in range(0, len(program), 8)]
    reg = [0] * 11
    reg[1], reg[10] = 1_000_000, 2_000_000  # ctx, frame pointer: opaque bases
    stack = bytearray(16)
    pc = 0
    for _ in range(10_000):
        code, regs, off, imm = insns[pc]
        dst, src = regs & 0x0F, regs >> 4
        pc += 1
        if code == 0xBF:
            reg[dst] = reg[src]
        elif code == 0xB7:
            reg[dst] = imm & 0xFFFFFFFFFFFFFFFF
        elif code == 0x07:
            reg[dst] = (reg[dst] + imm) & 0xFFFFFFFFFFFFFFFF
        elif code == 0x57:
            reg[dst] &= imm & 0xFFFFFFFFFFFFFFFF
        elif code in (0x61, 0x69):
            size = 4 if code == 0x61 else 2
            if reg[src] == 1_000_000:  # __sk_buff
                value = {20: int(frame.vlan is not None), 24: frame.vlan or 0}[off]
            else:
                at = reg[src] + off - (2_000_000 - 16)
                value = int.from_bytes(stack[at : at + size], "little")
            reg[dst] = value
        elif code in (0x15, 0x55, 0x56):
            left = reg[dst] & (0xFFFFFFFF if code == 0x56 else 0xFFFFFFFFFFFFFFFF)
            right = imm & (0xFFFFFFFF if code == 0x56 else 0xFFFFFFFFFFFFFFFF)
            taken = (left == right) == (code == 0x15)
            if taken:
                pc += off
        elif code == 0x85:
            name = {18: "push", 19: "pop", 23: "redirect", 26: "load"}[imm]
            frame.calls.append((name, tuple(reg[1:4])))
            if name == "load":  # bpf_skb_load_bytes(skb, 6, fp-8, 6): the source MAC
                at = reg[3] - (2_000_000 - 16)
                stack[at : at + reg[4]] = frame.src_mac
                reg[0] = 0
            elif name == "redirect":
                reg[0] = TC_ACT_REDIRECT
            else:
                reg[0] = 0
        elif code == 0x95:
            return reg[0]
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")
    raise AssertionError("no exit")


MAC_A = bytes.fromhex("02aabbccdd01")
MAC_B = bytes.fromhex("0a1b2c3d4e5f")
BRANCHES = [
    Branch(vlan_id=10, ifindex=41, mac="02:aa:bb:cc:dd:01"),
    Branch(vlan_id=4094, ifindex=42, mac="0a:1b:2c:3d:4e:5f"),
]


def redirected_to(frame: Frame) -> int | None:
    done = [c for c in frame.calls if c[0] == "redirect"]
    return done[0][1][0] if done else None


@pytest.mark.parametrize(
    ("frame", "ifindex", "popped"),
    [
        (Frame(MAC_A, 10), 41, True),
        (Frame(MAC_B, 4094), 42, True),
        (Frame(MAC_B, 10), None, False),  # the right VLAN from the wrong MAC
        (Frame(MAC_A, 11), None, False),  # no branch on VLAN 11
        (Frame(MAC_A), None, False),  # untagged: the trunk's own
    ],
)
def test_demux(frame: Frame, ifindex: int | None, popped: bool) -> None:
    verdict = run(demux(BRANCHES), frame)
    assert redirected_to(frame) == ifindex
    assert ("pop" in [c[0] for c in frame.calls]) == popped
    if ifindex is None:
        assert verdict == TC_ACT_OK
    else:
        assert verdict == TC_ACT_REDIRECT
        assert next(c for c in frame.calls if c[0] == "redirect")[1][1] == BPF_F_INGRESS


def test_demux_without_macs_goes_by_vlan_only() -> None:
    program = demux([Branch(vlan_id=7, ifindex=9)])
    frame = Frame(MAC_B, 7)
    run(program, frame)
    assert redirected_to(frame) == 9
    assert "load" not in [c[0] for c in frame.calls]


def test_tagger_pushes_and_redirects_out_of_the_parent() -> None:
    frame = Frame(MAC_A)
    assert run(tagger(300, 17), frame) == TC_ACT_REDIRECT
    assert frame.calls[0] == ("push", (frame.calls[0][1][0], socket.htons(0x8100), 300))
    assert frame.calls[1][0] == "redirect" and frame.calls[1][1][:2] == (17, 0)


def test_duplicate_vlan_ids_are_refused() -> None:
    with pytest.raises(ValueError):
        demux([Branch(vlan_id=3, ifindex=1), Branch(vlan_id=3, ifindex=2)])


@given(
    st.lists(st.integers(1, 4094), unique=True, max_size=40),
    st.integers(0, 4095),
    st.binary(min_size=6, max_size=6),
)
def test_demux_finds_exactly_the_branch_of_its_vlan_and_mac(
    vlans: list[int], vlan: int, mac: bytes
) -> None:
    branches = [
        Branch(
            vlan_id=v, ifindex=100 + v, mac=":".join(f"{b:02x}" for b in (mac if v % 2 else MAC_A))
        )
        for v in vlans
    ]
    frame = Frame(mac, vlan)
    run(demux(branches), frame)
    expected = next(
        (b.ifindex for b in branches if b.vlan_id == vlan and (vlan % 2 or mac == MAC_A)), None
    )
    assert redirected_to(frame) == expected


def test_tags_are_the_kernels_hashes_of_the_instructions() -> None:
    trivial = struct.pack("<BBhi", 0xB7, 0, 0, 0) + struct.pack("<BBhi", 0x95, 0, 0, 0)
    # what Linux 6.18 reported for this program (tc filter show ... tag), and its SHA-1 tag
    assert "59f4a931744dcdc6" in tags(trivial)
    assert len(tags(trivial)) == 2
    assert tags(demux(BRANCHES)) != tags(demux(BRANCHES[:1]))
    assert tags(tagger(5, 3)) == tags(tagger(5, 3)) != tags(tagger(5, 4))
