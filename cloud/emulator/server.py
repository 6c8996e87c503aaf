"""HTTP: the EC2 front end (faults, then moto under the state lock) and threaded servers that
can listen inside a namespace."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

import attrs
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from cloud.emulator.faults import ErrorReply
from cloud.emulator.netns import call_in_netns
from cloud.emulator.state import CloudState

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
CONTROL_PREFIX = "/_emulator"


class _QuietHandler(WSGIRequestHandler):
    def log(self, type: str, message: str, *args: Any) -> None:
        pass


def action_of(environ: dict[str, Any], body: bytes) -> str:
    """The EC2 action a query-protocol request names (form body or query string), or ``""``."""
    for source in (body.decode("utf-8", "replace"), environ.get("QUERY_STRING", "")):
        found: list[str] = parse_qs(source).get("Action", [])
        if found:
            return found[0]
    return ""


def _error_response(start_response: Callable[..., Any], reply: ErrorReply) -> list[bytes]:
    body = reply.body()
    reason = {500: "Internal Server Error", 503: "Service Unavailable"}.get(reply.status, "Error")
    start_response(
        f"{reply.status} {reason}",
        [("Content-Type", "text/xml"), ("Content-Length", str(len(body)))],
    )
    return [body]


class Ec2Frontend:
    """WSGI app for the EC2 API: planned faults first, then moto under the state lock, then the
    fabric brought up to date; paths under ``/_emulator`` go to the control app if one is set."""

    def __init__(self, state: CloudState, moto_app: WsgiApp, control: WsgiApp | None) -> None:
        self.state = state
        self.moto_app = moto_app
        self.control = control

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if self.control is not None and environ.get("PATH_INFO", "").startswith(CONTROL_PREFIX):
            return self.control(environ, start_response)
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(body)
        decision = self.state.faults.decide(action_of(environ, body))
        if decision.delay > 0:
            time.sleep(decision.delay)
        if decision.reply is not None:
            return _error_response(start_response, decision.reply)

        captured: list[Any] = []

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
            captured[:] = [status, headers]

        def call_moto() -> bytes:
            chunks = self.moto_app(environ, capture)
            try:
                return b"".join(chunks)
            finally:
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()

        payload = self.state.call(call_moto)
        status, headers = captured
        headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        start_response(status, [*headers, ("Content-Length", str(len(payload)))])
        return [payload]


@attrs.define
class HttpServer:
    """A threaded HTTP server running in a daemon thread; ``stop()`` ends it."""

    server: BaseWSGIServer
    thread: threading.Thread

    @property
    def host(self) -> str:
        return str(self.server.server_address[0])

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve(app: WsgiApp, host: str, port: int, netns_path: str | None = None) -> HttpServer:
    """Listen on ``host:port`` (0 picks a free port), inside ``netns_path`` if given, and serve
    ``app`` from a daemon thread; return the running server."""

    def bind() -> BaseWSGIServer:
        return make_server(host, port, app, threaded=True, request_handler=_QuietHandler)

    server = call_in_netns(netns_path, bind) if netns_path else bind()
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": 0.05},
        daemon=True,
        name=f"pw-http-{host}:{server.server_address[1]}",
    )
    thread.start()
    return HttpServer(server, thread)
