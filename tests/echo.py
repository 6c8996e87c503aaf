"""A tiny echo service for traffic tests: it answers every datagram or line with the source
address it saw, so a test learns whether the packet was SNATed on the way.

    python -m tests.echo serve PORT          # UDP and TCP on PORT, forever
    python -m tests.echo ask HOST PORT       # prints the address HOST saw (UDP)
"""

from __future__ import annotations

import socket
import struct
import sys
import threading

# <linux/in.h>: not exported by the socket module on every Python.
IP_PKTINFO = 8
_PKTINFO = struct.Struct("I4s4s")  # ifindex, spec_dst, addr


def serve(port: int) -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    udp.bind(("0.0.0.0", port))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("0.0.0.0", port))
    tcp.listen(64)

    def udp_loop() -> None:
        # Answer from the address the datagram was sent to, as a connected TCP socket does: a
        # namespace with several addresses would otherwise answer from its primary one, and a
        # stateful firewall between (the emulated VPC's security groups) rightly drops that.
        while True:
            _, ancillary, _, peer = udp.recvmsg(2048, socket.CMSG_SPACE(_PKTINFO.size))
            control = []
            for level, kind, data in ancillary:
                if level == socket.IPPROTO_IP and kind == IP_PKTINFO:
                    _, _, to = _PKTINFO.unpack(data[: _PKTINFO.size])
                    control = [(socket.IPPROTO_IP, IP_PKTINFO, _PKTINFO.pack(0, to, bytes(4)))]
            udp.sendmsg([peer[0].encode()], control, 0, peer)

    def tcp_conn(conn: socket.socket, peer: tuple[str, int]) -> None:
        with conn, conn.makefile("rwb") as f:
            for _ in f:
                f.write(peer[0].encode() + b"\n")
                f.flush()

    threading.Thread(target=udp_loop, daemon=True).start()
    print("ready", flush=True)
    while True:
        conn, peer = tcp.accept()
        threading.Thread(target=tcp_conn, args=(conn, peer), daemon=True).start()


def ask(host: str, port: int, timeout: float = 2.0) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        for _ in range(3):
            s.sendto(b"?", (host, port))
            try:
                return s.recv(2048).decode()
            except TimeoutError:
                continue
    return "timeout"


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    else:
        print(ask(sys.argv[2], int(sys.argv[3])))
