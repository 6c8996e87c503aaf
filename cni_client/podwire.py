#!/usr/bin/python3 -IS
"""podwire: the CNI plugin. It forwards each runtime call to podwire-agent and prints the answer.

One file, standard library only; installed by ``podwire-agent install-cni`` with an absolute
interpreter in the shebang. Its start-up is the product's headline latency, so the success path
imports nothing but ``_socket`` (~0.15 ms, where ``json`` and ``socket`` cost ~6 ms each here,
and ``os`` ~1.1 ms: the built-in ``posix`` serves instead): the request is assembled from bytes
— the network config from stdin is passed through as is — and the result is sliced out of the
agent's canonical reply (``{"id":1,"result":...}``) without parsing it. ``json`` is imported
only on error paths.

VERSION is answered here. If the agent cannot be reached: a config that is not a JSON object
answers code 6 (it is parsed only then), STATUS code 50, ADD code 11 (try again later), and DEL
is written to the spool directory and succeeds — the agent replays the spool when it starts, so
a DEL is never lost and never strands a pod in Terminating. Whatever happens, the runtime gets
CNI error JSON on stdout, never a traceback.
"""

import _socket
import posix  # not os: posix is built in and loaded at start, os costs ~1.1 ms of imports here
import sys
import time  # built in and already loaded by the interpreter: costs nothing

T_START = time.monotonic_ns()  # the phase trace's first stamp (agent/trace.py)

SUPPORTED = ("0.4.0", "1.0.0", "1.1.0")
DEFAULT_SOCKET = "/run/podwire/agent.sock"
DEFAULT_SPOOL = "/run/podwire/spool"
TIMEOUT = 45.0  # above the agent's own per-request deadline (30 s by default)
ENV_KEYS = ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH")
ENV_KEYS_BYTES = tuple(k.encode() for k in ENV_KEYS)
METHODS = {
    "ADD": b"cni.add",
    "DEL": b"cni.del",
    "CHECK": b"cni.check",
    "STATUS": b"cni.status",
    "GC": b"cni.gc",
}
REPLY_PREFIX = b'{"id":1,"result":'

_ESCAPES = {0x22: '\\"', 0x5C: "\\\\", **{c: f"\\u{c:04x}" for c in range(0x20)}}


def _jstr(value):
    return b'"' + value.translate(_ESCAPES).encode("utf-8", "replace") + b'"'


def _conf_str(conf, key):
    """Return the string value of top-level-looking ``key`` in the raw config, or None.

    A cheap scan instead of a JSON parse; used for the socket path, the spool directory and the
    version of error replies. A value with escapes falls back to a real parse.
    """
    needle = b'"' + key + b'"'
    at = conf.find(needle)
    if at < 0:
        return None
    i = at + len(needle)
    n = len(conf)
    while i < n and conf[i] in b" \t\r\n:":
        i += 1
    if i >= n or conf[i] != 0x22:
        return None
    end = conf.find(b'"', i + 1)
    if end < 0:
        return None
    raw = conf[i + 1 : end]
    if b"\\" in raw:
        try:
            import json

            value = json.loads(conf).get(key.decode())
            return value if isinstance(value, str) else None
        except (ValueError, AttributeError, RecursionError):
            return None
    return raw.decode("utf-8", "replace")


class Unreachable(Exception):
    pass


def _request(path, head):
    """Send one request line (``head`` and the trace stamps) and return the reply line; raises
    Unreachable."""
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        s.settimeout(TIMEOUT)
        try:
            s.connect(path)
        except OSError as e:
            raise Unreachable(f"cannot connect to {path}: {e.strerror or e}") from None
        payload = b'%s,"trace":[%d,%d]}}\n' % (head, T_START, time.monotonic_ns())
        try:
            s.sendall(payload)
        except OSError as e:
            # The agent may have answered and closed while we were still writing (a request
            # too large): its reply is still there to read.
            return _reply(s, "agent connection failed: %s" % (e.strerror or e))
        return _reply(s, None)
    finally:
        s.close()


def _reply(s, send_error):
    chunks = []
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            if chunk.endswith(b"\n"):
                return b"".join(chunks)
    except OSError as e:
        if send_error is None:
            raise Unreachable("agent connection failed: %s" % (e.strerror or e)) from None
    raise Unreachable(send_error or "agent closed the connection without answering")


def _parse_error(conf):
    """Return why ``conf`` is not a JSON object, in the user's own lines and columns, or None."""
    import json

    try:
        doc = json.loads(conf)
    except ValueError as e:
        if isinstance(e, json.JSONDecodeError):
            return f"{e.msg}: line {e.lineno} column {e.colno} (char {e.pos})"
        return str(e)
    except RecursionError:
        return "nested too deeply"
    return None if isinstance(doc, dict) else "stdin must hold a JSON object"


def _error(conf, code, msg, details=""):
    import json

    version = _conf_str(conf, b"cniVersion") or SUPPORTED[-1]
    doc = {"cniVersion": version, "code": code, "msg": msg}
    if details:
        doc["details"] = details
    return 1, json.dumps(doc).encode() + b"\n"


def _spool(conf, env_json, spool_dir):
    """Record a DEL for the agent to replay at start: temp file, fsync, rename."""
    import os

    os.makedirs(spool_dir, mode=0o700, exist_ok=True)
    name = f"del-{os.getpid()}-{int.from_bytes(os.urandom(6), 'big')}"
    tmp = os.path.join(spool_dir, "." + name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, b'{"env":' + env_json + b',"config":' + conf.strip() + b"}\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, os.path.join(spool_dir, name + ".json"))


def run(environ, conf):
    """Handle one invocation; return (exit code, bytes for stdout)."""
    command = environ.get("CNI_COMMAND", "")
    if command == "VERSION":
        import json

        want = _conf_str(conf, b"cniVersion")
        version = want if want in SUPPORTED else SUPPORTED[-1]
        doc = {"cniVersion": version, "supportedVersions": list(SUPPORTED)}
        return 0, json.dumps(doc).encode() + b"\n"
    method = METHODS.get(command)
    if method is None:
        if not command:
            return _error(conf, 4, "required env variables [CNI_COMMAND] missing")
        return _error(conf, 4, f"unknown CNI_COMMAND: {command}")
    env_json = (
        b"{"
        + b",".join(_jstr(k) + b":" + _jstr(environ[k]) for k in ENV_KEYS if environ.get(k))
        + b"}"
    )
    # JSON text holds newlines only as whitespace, so flattening them keeps one frame per line.
    flat = conf.replace(b"\r", b" ").replace(b"\n", b" ").strip()
    if not flat.startswith(b"{"):
        return _error(conf, 6, "invalid network configuration", "stdin must hold a JSON object")
    head = b'{"id":1,"method":"' + method + b'","params":{"env":' + env_json + b',"config":' + flat
    path = _conf_str(conf, b"agentSocket") or DEFAULT_SOCKET
    try:
        reply = _request(path, head)
    except Unreachable as e:
        # The socket path may have come from a config the agent would have refused: say so,
        # rather than "try again" (or spooling a DEL that can never be replayed).
        bad = _parse_error(conf)
        if bad is not None:
            return _error(conf, 6, "invalid network configuration", bad)
        if command == "DEL":
            try:
                _spool(conf, env_json, _conf_str(conf, b"spoolDir") or DEFAULT_SPOOL)
            except OSError as spool_err:
                return _error(
                    conf, 5, "agent unreachable and DEL could not be spooled", f"{e}; {spool_err}"
                )
            return 0, b""
        if command == "STATUS":
            return _error(conf, 50, "podwire-agent is not reachable", str(e))
        return _error(conf, 11, "podwire-agent is not reachable", str(e))
    if reply.startswith(REPLY_PREFIX) and reply.endswith(b"}\n"):
        result = reply[len(REPLY_PREFIX) : -2]
        return 0, b"" if result == b"null" else result + b"\n"
    import json

    try:
        doc = json.loads(reply)
        err = doc["error"]
        code, msg, details = int(err["code"]), str(err["msg"]), str(err.get("details", ""))
    except (ValueError, KeyError, TypeError, RecursionError):
        excerpt = reply[:200].decode("utf-8", "replace")
        return _error(conf, 999, "malformed reply from podwire-agent", excerpt)
    if code == 6 and doc.get("id") is None:
        # The agent could not decode the request line, whose position means nothing to the
        # user: name the place in their own config, if that is where the fault is.
        bad = _parse_error(conf)
        if bad is not None:
            return _error(conf, 6, "invalid network configuration", bad)
    return _error(conf, code, msg, details)


def _read_stdin():
    stdin = sys.stdin
    if stdin is None:  # descriptor 0 closed
        return b""
    try:
        return stdin.buffer.read()
    except (OSError, ValueError, AttributeError):
        return b""


def _environ():
    """The CNI variables, decoded as ``os.environ`` would decode them."""
    env = posix.environ
    return {
        k: env[b].decode("utf-8", "surrogateescape")
        for k, b in zip(ENV_KEYS, ENV_KEYS_BYTES, strict=True)
        if b in env
    }


def main():
    conf = _read_stdin()
    try:
        code, out = run(_environ(), conf)
    except Exception as e:  # never a traceback instead of CNI error JSON
        try:
            code, out = _error(conf, 999, "podwire plugin failed", f"{type(e).__name__}: {e}")
        except Exception:
            code, out = 1, b'{"cniVersion": "1.0.0", "code": 999, "msg": "podwire plugin failed"}\n'
    if out:
        sys.stdout.buffer.write(out)
        sys.stdout.buffer.flush()
    return code


if __name__ == "__main__":
    # Output is written and flushed: skip the interpreter's teardown (~1.5 ms here).
    posix._exit(main())
