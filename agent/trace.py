"""Phase traces of CNI requests: where an ADD's or DEL's time goes, plugin start to reply.

Theory of operation. Every timestamp is CLOCK_MONOTONIC in nanoseconds (``time.monotonic_ns``),
one clock for every process of the machine, so the plugin's stamps and the agent's line up. The
plugin stamps its start (its first statement, after the interpreter started and compiled it)
and its connect, and sends both in the request (``params.trace``); the RPC server stamps when
the request line was read (``rpc.server.RequestTiming``); the CNI service marks each phase it
finishes (``mark("ipam")``) through a context variable, so nothing is passed down the layers;
the server stamps when the reply was written and the trace ends. A phase is named by what
finished at its mark and lasts from the previous mark:

    connect     plugin start -> connected              (the plugin)
    send        connected -> request line read         (plugin write, agent accept and read)
    validate    -> request decoded and validated
    ipam        -> address assigned (ADD; includes waiting for the key's lock)
    delete      -> veth pair gone (DEL)
    checkpoint  -> allocations durable
    wire        -> pod wired (ADD)
    reply       -> reply written

What only the runtime sees (exec -> plugin start: interpreter start and compile; reply written
-> plugin exit) make bench adds from its own stamps. Finished traces go to
``podwire_cni_phase_seconds{command,phase}`` and a ring read by ``agent.traces``.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from typing import Any

import attrs

_current: ContextVar[Trace | None] = ContextVar("podwire_trace", default=None)


def mark(phase: str) -> None:
    """Mark the end of ``phase`` in the current request's trace (a no-op outside one)."""
    trace = _current.get()
    if trace is not None:
        trace.marks.append((phase, time.monotonic_ns()))


@attrs.define(kw_only=True)
class Trace:
    command: str
    key: str
    marks: list[tuple[str, int]] = attrs.field(factory=list)  # (phase that ended, t ns)
    code: int = 0

    def phases(self) -> list[tuple[str, float]]:
        """Each phase with its duration in seconds, in order."""
        return [
            (name, (t - prev) / 1e9)
            for (_, prev), (name, t) in zip(self.marks, self.marks[1:], strict=False)
        ]

    def as_dict(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "key": self.key,
            "code": self.code,
            "marks": [[name, t] for name, t in self.marks],
        }


Observe = Callable[[str, str, float], None]


class Traces:
    """Starts and finishes traces; keeps the last ``keep`` finished ones."""

    def __init__(self, *, keep: int = 1024, observe: Observe | None = None) -> None:
        self._ring: collections.deque[Trace] = collections.deque(maxlen=keep)
        self._observe = observe

    def start(self, command: str, key: str, plugin: Sequence[int], received: int | None) -> Trace:
        """Begin the trace of one request and make it current; ``plugin`` holds the plugin's
        start and connect stamps (empty from other clients), ``received`` the server's."""
        trace = Trace(command=command, key=key)
        if len(plugin) == 2:
            trace.marks += [("start", plugin[0]), ("connect", plugin[1])]
        if received is not None:
            trace.marks.append(("send" if trace.marks else "start", received))
        else:
            trace.marks.append(("start", time.monotonic_ns()))
        _current.set(trace)
        return trace

    def finish(self, trace: Trace, replied: int) -> None:
        """End ``trace`` at ``replied``: observe its phases, keep it."""
        trace.marks.append(("reply", replied))
        if _current.get() is trace:
            _current.set(None)
        if self._observe is not None:
            for phase, seconds in trace.phases():
                self._observe(trace.command, phase, seconds)
        self._ring.append(trace)

    def recent(self, since: int = 0) -> list[dict[str, Any]]:
        """The kept traces that started at or after ``since`` (ns), oldest first."""
        return [t.as_dict() for t in self._ring if t.marks and t.marks[0][1] >= since]
