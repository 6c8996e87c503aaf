"""nftables from Python: libnftables through ctypes, or the ``nft`` binary, bound to one netns.

Namespaces (measured with nftables 1.0.6): ``nft_ctx_new`` opens the context's netlink socket
and every later command goes through that socket, so a libnftables context acts in the network
namespace it was *created* in, whatever thread calls it later. The ``nft`` binary acts in the
namespace of the thread that starts it (a child inherits the calling thread's namespaces).
To give both the same meaning, an ``Nft`` is bound to one namespace when opened:

* ``Nft.open()`` binds to the calling thread's namespace; every later call must come from a
  thread in that same namespace (checked; ``NftWrongNamespace`` otherwise), which is what the
  agent's worker threads that entered the node's namespace do;
* ``Nft.open(netns_path=P)`` creates the context inside ``P`` (the opening thread enters it
  for the duration of ``nft_ctx_new``) and runs the binary with ``nsenter --net=P``; it can
  then be used from any thread.

Blocking calls: run them in a worker thread (``anyio.to_thread.run_sync``). One context is not
thread-safe, so calls on one ``Nft`` are serialised by a lock.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
import threading
from typing import Any, Literal

import orjson

from netlink.errors import NetlinkError
from netlink.ns import entered_path

LIBNFTABLES = "libnftables.so.1"
NFT_CTX_OUTPUT_JSON = 1 << 4
_EXCERPT_LINES = 12
_EXCERPT_CHARS = 800

NftKind = Literal["libnftables", "nft"]


class NftError(NetlinkError):
    """nft rejected a script. Carries the start of the script and nft's error text."""

    def __init__(self, script_excerpt: str, stderr: str) -> None:
        super().__init__(f"nft failed: {stderr.strip() or 'no error text'}")
        self.script_excerpt = script_excerpt
        self.stderr = stderr


class NftUnavailable(NetlinkError):
    """Neither libnftables nor the ``nft`` binary can be used here."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"nftables unavailable: {reason}")
        self.reason = reason


class WrongNamespace(NetlinkError):
    """A backend bound to one network namespace was called from a thread in another."""

    def __init__(self, bound: tuple[int, int], caller: tuple[int, int]) -> None:
        super().__init__(f"bound to netns {bound}, called from netns {caller}")
        self.bound = bound
        self.caller = caller


def _thread_netns() -> tuple[int, int]:
    st = os.stat("/proc/thread-self/ns/net")
    return (st.st_dev, st.st_ino)


class NetnsBinding:
    """Which namespace a backend acts in: a path (commands enter it with ``nsenter``) or the
    namespace of the thread that created the binding (callers must be in it too)."""

    def __init__(self, netns_path: str | None) -> None:
        self.netns_path = netns_path
        self._home = None if netns_path else _thread_netns()

    def check(self) -> None:
        """Raise WrongNamespace when bound to the creator's namespace and the calling thread
        is elsewhere."""
        if self._home is not None:
            here = _thread_netns()
            if here != self._home:
                raise WrongNamespace(self._home, here)

    def command(self, argv: list[str]) -> list[str]:
        """Return ``argv`` wrapped to run in the bound namespace."""
        if self.netns_path is None:
            return argv
        return ["nsenter", f"--net={self.netns_path}", "--", *argv]


def _excerpt(script: str) -> str:
    lines = script.splitlines()
    text = "\n".join(lines[:_EXCERPT_LINES])
    if len(lines) > _EXCERPT_LINES:
        text += f"\n... ({len(lines) - _EXCERPT_LINES} more lines)"
    return text[:_EXCERPT_CHARS]


@functools.cache
def _load_library(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    lib.nft_ctx_new.argtypes = (ctypes.c_uint32,)
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_free.argtypes = (ctypes.c_void_p,)
    lib.nft_ctx_free.restype = None
    for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
        getattr(lib, name).argtypes = (ctypes.c_void_p,)
        getattr(lib, name).restype = ctypes.c_int
    for name in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
        getattr(lib, name).argtypes = (ctypes.c_void_p,)
        getattr(lib, name).restype = ctypes.c_char_p
    lib.nft_run_cmd_from_buffer.argtypes = (ctypes.c_void_p, ctypes.c_char_p)
    lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
    lib.nft_ctx_output_get_flags.argtypes = (ctypes.c_void_p,)
    lib.nft_ctx_output_get_flags.restype = ctypes.c_uint
    lib.nft_ctx_output_set_flags.argtypes = (ctypes.c_void_p, ctypes.c_uint)
    lib.nft_ctx_output_set_flags.restype = None
    return lib


class _Library:
    """One libnftables context with buffered output and errors."""

    kind: NftKind = "libnftables"

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        ctx = lib.nft_ctx_new(0)
        if not ctx:
            raise NftUnavailable("nft_ctx_new returned NULL")
        self._ctx: int | None = ctx
        if lib.nft_ctx_buffer_output(ctx) or lib.nft_ctx_buffer_error(ctx):
            lib.nft_ctx_free(ctx)
            raise NftUnavailable("cannot buffer libnftables output")
        self._flags = int(lib.nft_ctx_output_get_flags(ctx))

    def run(self, script: str, *, json: bool) -> str:
        ctx = self._ctx
        if ctx is None:
            raise NftUnavailable("context closed")
        lib = self._lib
        if json:
            lib.nft_ctx_output_set_flags(ctx, self._flags | NFT_CTX_OUTPUT_JSON)
        try:
            rc = lib.nft_run_cmd_from_buffer(ctx, script.encode())
            # Reading a buffer also rewinds it for the next command.
            out = lib.nft_ctx_get_output_buffer(ctx) or b""
            err = lib.nft_ctx_get_error_buffer(ctx) or b""
        finally:
            if json:
                lib.nft_ctx_output_set_flags(ctx, self._flags)
        if rc != 0:
            raise NftError(_excerpt(script), err.decode(errors="replace"))
        return str(out.decode(errors="replace"))

    def close(self) -> None:
        if self._ctx is not None:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None


class _Binary:
    """The ``nft`` binary, one process per command, script on stdin."""

    kind: NftKind = "nft"

    def __init__(self, path: str, binding: NetnsBinding) -> None:
        self._path = path
        self._binding = binding

    def run(self, script: str, *, json: bool) -> str:
        # With -j, nft reads -f input as JSON; a (one-line) listing command goes in argv.
        argv = [self._path, "-j", script.strip()] if json else [self._path, "-f", "-"]
        try:
            proc = subprocess.run(
                self._binding.command(argv),
                input=b"" if json else script.encode(),
                capture_output=True,
                check=False,
                timeout=60,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise NftUnavailable(f"cannot run {self._path}: {e}") from e
        if proc.returncode != 0:
            raise NftError(_excerpt(script), proc.stderr.decode(errors="replace"))
        return proc.stdout.decode(errors="replace")

    def close(self) -> None:
        pass


class Nft:
    """nft scripts run as one transaction each, through libnftables or the ``nft`` binary."""

    def __init__(self, runner: _Library | _Binary, binding: NetnsBinding) -> None:
        self._runner = runner
        self._binding = binding
        self._lock = threading.Lock()

    @classmethod
    def open(
        cls,
        prefer_library: bool = True,
        *,
        netns_path: str | None = None,
        library: str = LIBNFTABLES,
        binary: str = "nft",
    ) -> Nft:
        """Return a backend bound to the calling thread's namespace, or to ``netns_path``.

        Loads libnftables when ``prefer_library`` and it loads, else uses the ``nft`` binary.
        Raises NftUnavailable when neither is there, and NetnsNotFound / NotANetns for a bad
        ``netns_path``.
        """
        binding = NetnsBinding(netns_path)
        if prefer_library:
            try:
                lib = _load_library(library)
            except OSError:
                pass
            else:
                if netns_path is None:
                    return cls(_Library(lib), binding)
                with entered_path(netns_path):
                    return cls(_Library(lib), binding)
        path = shutil.which(binary)
        if path is None:
            raise NftUnavailable(f"no {library} and no {binary!r} binary")
        if netns_path is not None and shutil.which("nsenter") is None:
            raise NftUnavailable("nsenter is needed to run nft in another namespace")
        return cls(_Binary(path, binding), binding)

    @property
    def kind(self) -> NftKind:
        """``libnftables`` or ``nft``."""
        return self._runner.kind

    def run(self, script: str) -> str:
        """Run an nft script as one transaction; return its output.

        Raises NftError when nft rejects it, WrongNamespace when called from another netns.
        """
        return self._run(script, json=False)

    def _run(self, script: str, *, json: bool) -> str:
        self._binding.check()
        with self._lock:
            return self._runner.run(script, json=json)

    def list_table_json(self, family: str, table: str) -> dict[str, Any] | None:
        """Return ``nft -j list table <family> <table>`` as a dict, or None when the table is
        absent. Raises NftError."""
        try:
            out = self._run(f"list table {family} {table}", json=True)
        except NftError as e:
            if "No such file or directory" in e.stderr:
                return None
            raise
        doc = orjson.loads(out)
        if not isinstance(doc, dict):
            raise NftError(f"list table {family} {table}", f"unexpected JSON: {out[:200]}")
        return doc

    def close(self) -> None:
        """Free the libnftables context (no-op for the binary)."""
        with self._lock:
            self._runner.close()

    def __enter__(self) -> Nft:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = self._binding.netns_path or "opener's netns"
        return f"Nft(kind={self.kind!r}, netns={where!r})"
