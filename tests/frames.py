"""What crosses a link, as a packet capture sees it: the 802.1Q tag of a frame (PACKET_AUXDATA:
veth and offloading NICs carry the tag beside the frame, not in it)."""

from __future__ import annotations

import socket
import struct
import sys
from collections.abc import Callable
from typing import Protocol

SOL_PACKET = 263
PACKET_AUXDATA = 8
TP_STATUS_VLAN_VALID = 0x10
_AUX = struct.Struct("IIIHHHH")  # tp_status, len, snaplen, mac, net, vlan_tci, vlan_tpid
ETH_P_IP = 0x0800
ETH_P_8021Q = 0x8100


def vlan_of_next_frame(ifname: str, send: Callable[[], None], timeout: float = 10.0) -> int | None:
    """The 802.1Q VLAN id of the first IPv4 frame ``send()`` puts on ``ifname`` (of the calling
    thread's namespace), as a capture sees it; None when it leaves untagged. Raises
    TimeoutError when no IPv4 frame comes by in ``timeout``."""
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003)) as cap:
        cap.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
        cap.bind((ifname, 0))
        cap.settimeout(timeout)
        send()
        while True:
            frame, ancillary, _, _ = cap.recvmsg(65535, socket.CMSG_SPACE(_AUX.size))
            if len(frame) < 18:
                continue
            ethertype = struct.unpack("!H", frame[12:14])[0]
            if ethertype == ETH_P_8021Q and struct.unpack("!H", frame[16:18])[0] == ETH_P_IP:
                return struct.unpack("!H", frame[14:16])[0] & 0x0FFF  # the tag in the frame
            if ethertype != ETH_P_IP:
                continue  # ARP, IPv6: not the probe
            for level, kind, data in ancillary:
                if level == SOL_PACKET and kind == PACKET_AUXDATA:
                    status, *_, tci, tpid = _AUX.unpack(data[: _AUX.size])
                    if tpid in (0, 0x8100) and status & TP_STATUS_VLAN_VALID:
                        return tci & 0x0FFF
            return None


def udp_probe(source: str, to: str, port: int = 9) -> Callable[[], None]:
    """A sender of one UDP datagram from ``source`` to ``to`` (in the caller's namespace)."""

    def send() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((source, 0))
            s.sendto(b"x", (to, port))

    return send


class _Runs(Protocol):
    def run(self, *cmd: str, check: bool = True) -> object: ...


def udp_from(ns: _Runs, to: str, port: int = 9) -> Callable[[], None]:
    """A sender of one UDP datagram from another namespace (a pod's: ``tests.netns.Netns``)."""
    code = f"import socket; socket.socket(2, 2).sendto(b'x', ('{to}', {port}))"

    def send() -> None:
        ns.run(sys.executable, "-c", code)

    return send
