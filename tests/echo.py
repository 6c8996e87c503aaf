"""A tiny echo service for traffic tests: it answers every datagram or line with the source
address it saw, so a test learns whether the packet was SNATed on the way.

    python -m tests.echo serve PORT          # UDP and TCP on PORT, forever
    python -m tests.echo ask HOST PORT       # prints the address HOST saw (UDP)
"""

from __future__ import annotations

import socket
import sys
import threading


def serve(port: int) -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", port))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("0.0.0.0", port))
    tcp.listen(64)

    def udp_loop() -> None:
        while True:
            _, peer = udp.recvfrom(2048)
            udp.sendto(peer[0].encode(), peer)

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
