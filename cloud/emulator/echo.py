"""Echo services inside a namespace, for traffic tests and the demo (a stand-in database or
service VM): every TCP line and every UDP datagram is answered with the caller's address and
port, so a client learns both that it got through and how the server saw it.

The listening socket is created in the namespace (by a thread that entered it) and served by
daemon threads of this process; ``stop()`` closes it and every open connection.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from typing import Literal, TypeVar

T = TypeVar("T")
Protocol = Literal["tcp", "udp"]


class EchoServer:
    """A TCP or UDP echo service on ``address:port``; counts what it answered."""

    def __init__(self, sock: socket.socket, protocol: Protocol) -> None:
        self.protocol: Protocol = protocol
        self.address, self.port = sock.getsockname()[:2]
        self._sock = sock
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._stopped = False
        self.accepted = 0  # TCP connections accepted
        self.answered = 0  # lines or datagrams answered
        target = self._serve_tcp if protocol == "tcp" else self._serve_udp
        self._thread = threading.Thread(
            target=target, daemon=True, name=f"pw-echo-{protocol}-{self.port}"
        )
        self._thread.start()

    @classmethod
    def start(
        cls,
        run_inside: Callable[[Callable[[], socket.socket]], socket.socket],
        port: int,
        protocol: Protocol = "tcp",
        address: str = "0.0.0.0",
    ) -> EchoServer:
        """Bind ``address:port`` (0: any free port) with ``run_inside`` (which runs a function
        in the namespace) and start answering; return the server."""

        def bind() -> socket.socket:
            kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
            sock = socket.socket(socket.AF_INET, kind)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((address, port))
                if protocol == "tcp":
                    sock.listen(128)
            except BaseException:
                sock.close()
                raise
            return sock

        return cls(run_inside(bind), protocol)

    def _serve_tcp(self) -> None:
        while True:
            try:
                conn, peer = self._sock.accept()
            except OSError:
                return
            with self._lock:
                if self._stopped:
                    conn.close()
                    return
                self._conns.add(conn)
                self.accepted += 1
            threading.Thread(
                target=self._answer_tcp, args=(conn, peer), daemon=True, name="pw-echo-conn"
            ).start()

    def _answer_tcp(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        reply = f"{peer[0]}:{peer[1]}\n".encode()
        try:
            with conn, conn.makefile("rb") as lines:
                for _ in lines:
                    conn.sendall(reply)
                    with self._lock:
                        self.answered += 1
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)

    def _serve_udp(self) -> None:
        while True:
            try:
                _, peer = self._sock.recvfrom(65535)
            except OSError:
                return
            with self._lock:
                # shutdown() wakes a blocked recvfrom with an empty datagram.
                if self._stopped:
                    return
                self.answered += 1
            with contextlib.suppress(OSError):
                self._sock.sendto(f"{peer[0]}:{peer[1]}\n".encode(), peer)

    def stop(self) -> None:
        """Close the listening socket and every open connection (idempotent)."""
        with self._lock:
            self._stopped = True
            conns, self._conns = set(self._conns), set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        self._thread.join(timeout=5)

    def __repr__(self) -> str:
        return (
            f"EchoServer({self.protocol} {self.address}:{self.port}, accepted={self.accepted}, "
            f"answered={self.answered})"
        )
