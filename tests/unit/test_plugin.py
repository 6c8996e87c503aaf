"""The plugin's own logic, called as a function (the e2e tests exec the installed file)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cni_client import podwire

ENV = {
    "CNI_COMMAND": "ADD",
    "CNI_CONTAINERID": "c1",
    "CNI_NETNS": "/run/netns/x",
    "CNI_IFNAME": "eth0",
}


def conf(tmp_path: Path, **extra: object) -> bytes:
    doc = {
        "cniVersion": "1.0.0",
        "name": "podwire",
        "type": "podwire",
        "agentSocket": str(tmp_path / "agent.sock"),
        "spoolDir": str(tmp_path / "spool"),
        **extra,
    }
    return json.dumps(doc, indent=2).encode()  # newlines, as runtimes may send


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",))))
def test_env_strings_are_valid_json(value: str) -> None:
    assert json.loads(podwire._jstr(value)) == value


def test_conf_scan(tmp_path: Path) -> None:
    raw = conf(tmp_path)
    assert podwire._conf_str(raw, b"agentSocket") == str(tmp_path / "agent.sock")
    assert podwire._conf_str(raw, b"missing") is None
    assert podwire._conf_str(b'{"cniVersion": 1}', b"cniVersion") is None
    assert podwire._conf_str(b'{"agentSocket": "/a\\"b"}', b"agentSocket") == '/a"b'


def test_version_and_unknown_commands(tmp_path: Path) -> None:
    code, out = podwire.run({"CNI_COMMAND": "VERSION"}, b'{"cniVersion": "0.4.0"}')
    assert code == 0 and json.loads(out) == {
        "cniVersion": "0.4.0",
        "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"],
    }
    code, out = podwire.run({"CNI_COMMAND": "FROB"}, conf(tmp_path))
    assert code == 1 and json.loads(out) == {
        "cniVersion": "1.0.0",
        "code": 4,
        "msg": "unknown CNI_COMMAND: FROB",
    }
    code, out = podwire.run({**ENV}, b"  ")
    assert code == 1 and json.loads(out)["code"] == 6


def test_unreachable_agent(tmp_path: Path) -> None:
    code, out = podwire.run(ENV, conf(tmp_path))
    assert code == 1 and json.loads(out)["code"] == 11
    code, out = podwire.run({**ENV, "CNI_COMMAND": "STATUS"}, conf(tmp_path, cniVersion="1.1.0"))
    assert code == 1 and json.loads(out) == {
        "cniVersion": "1.1.0",
        "code": 50,
        "msg": "podwire-agent is not reachable",
        "details": json.loads(out)["details"],
    }
    code, out = podwire.run(
        {**ENV, "CNI_COMMAND": "DEL", "CNI_ARGS": 'K8S_POD_NAME="x"'}, conf(tmp_path)
    )
    assert (code, out) == (0, b"")
    [spooled] = (tmp_path / "spool").glob("*.json")
    doc = json.loads(spooled.read_bytes())
    assert doc["env"]["CNI_COMMAND"] == "DEL" and doc["env"]["CNI_ARGS"] == 'K8S_POD_NAME="x"'
    assert doc["config"]["name"] == "podwire"
    assert not list((tmp_path / "spool").glob(".*"))  # no temp file left


def serve_once(path: Path, reply: bytes) -> list[bytes]:
    got: list[bytes] = []
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(1)

    def run() -> None:
        conn, _ = srv.accept()
        buf = b""
        while not buf.endswith(b"\n"):
            buf += conn.recv(65536)
        got.append(buf)
        conn.sendall(reply)
        conn.close()
        srv.close()

    threading.Thread(target=run, daemon=True).start()
    return got


@pytest.mark.parametrize(
    ("reply", "code", "out"),
    [
        (
            b'{"id":1,"result":{"cniVersion":"1.0.0","ips":[]}}\n',
            0,
            b'{"cniVersion":"1.0.0","ips":[]}\n',
        ),
        (b'{"id":1,"result":null}\n', 0, b""),
        (
            b'{"id":1,"error":{"code":11,"msg":"no IP","details":"pool"}}\n',
            1,
            b'{"cniVersion": "1.0.0", "code": 11, "msg": "no IP", "details": "pool"}\n',
        ),
        (b"garbage\n", 1, None),
    ],
)
def test_reply_handling(tmp_path: Path, reply: bytes, code: int, out: bytes | None) -> None:
    got = serve_once(tmp_path / "agent.sock", reply)
    rc, printed = podwire.run({**ENV, "CNI_ARGS": "A=1"}, conf(tmp_path))
    assert rc == code
    if out is not None:
        assert printed == out
    else:
        assert json.loads(printed)["code"] == 999
    request = json.loads(got[0])  # one line, valid JSON, config passed through
    assert request["method"] == "cni.add" and request["params"]["env"]["CNI_ARGS"] == "A=1"
    start, connected = request["params"]["trace"]  # the phase trace's stamps (ns)
    assert podwire.T_START == start <= connected <= time.monotonic_ns()
    assert request["params"]["config"]["name"] == "podwire" and got[0].count(b"\n") == 1


PLUGIN = Path(podwire.__file__)


def exec_plugin(
    env: dict[str, str], stdin: bytes | None, close_stdin: bool = False
) -> subprocess.CompletedProcess[bytes]:
    """Run the plugin file as a runtime does (``python3 -IS``), optionally with fd 0 closed."""
    return subprocess.run(
        [sys.executable, "-IS", str(PLUGIN)],
        env={"PATH": "/usr/bin:/bin", **env},
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=stdin is not None,
        stdout=None if stdin is not None else subprocess.PIPE,
        stderr=None if stdin is not None else subprocess.PIPE,
        preexec_fn=(lambda: os.close(0)) if close_stdin else None,
        timeout=30,
    )


def test_a_config_that_is_not_json_gets_6_even_without_a_socket_path(tmp_path: Path) -> None:
    # no agentSocket found in it: the default socket is absent here, and that is not the news
    for command in ("ADD", "CHECK", "DEL"):
        code, out = podwire.run({**ENV, "CNI_COMMAND": command}, b'{"cniVersion": "1.0.0", "na')
        doc = json.loads(out)
        assert (code, doc["code"]) == (1, 6) and "line 1 column" in doc["details"], command
    # and a malformed DEL is refused, not spooled for a replay that can never succeed
    spool = tmp_path / "spool"
    raw = b'{"spoolDir": "%s", "agentSocket": "%s/x", ' % (
        str(spool).encode(),
        str(tmp_path).encode(),
    )
    code, out = podwire.run({**ENV, "CNI_COMMAND": "DEL"}, raw)
    assert (code, json.loads(out)["code"]) == (1, 6) and not spool.exists()


def test_the_plugin_never_dies_with_a_traceback(tmp_path: Path) -> None:
    env = {**ENV, "CNI_COMMAND": "ADD"}
    closed = exec_plugin(env, None, close_stdin=True)
    assert closed.returncode == 1 and b"Traceback" not in closed.stderr
    assert json.loads(closed.stdout)["code"] == 6
    deep = b'{"cniVersion": "1.\\u0030.0", "agentSocket": "/a\\"b", "x": ' + b"[" * 200_000
    nested = exec_plugin(env, deep + b"]" * 200_000 + b"}")
    assert nested.returncode == 1 and b"Traceback" not in nested.stderr, nested.stderr[-500:]
    assert json.loads(nested.stdout)["code"] == 6
    version = exec_plugin({"CNI_COMMAND": "VERSION"}, None, close_stdin=True)
    assert version.returncode == 0 and json.loads(version.stdout)["supportedVersions"]


def test_a_reply_sent_while_the_plugin_was_still_writing_is_read(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(1)

    def agent() -> None:  # reads a little, answers as the agent does, closes
        conn, _ = srv.accept()
        conn.recv(65536)
        conn.sendall(
            b'{"id":null,"error":{"code":6,"msg":"request too large","details":"1 MiB"}}\n'
        )
        conn.close()
        srv.close()

    threading.Thread(target=agent, daemon=True).start()
    big = conf(tmp_path, pad="x" * (8 << 20))
    for command in ("ADD",):
        code, out = podwire.run({**ENV, "CNI_COMMAND": command}, big)
        assert (code, json.loads(out)["msg"]) == (1, "request too large")


def test_a_frame_decode_error_names_the_place_in_the_users_config(tmp_path: Path) -> None:
    got = serve_once(
        tmp_path / "agent.sock",
        b'{"id":null,"error":{"code":6,"msg":"invalid request","details":"line 1 column 412"}}\n',
    )
    raw = conf(tmp_path)[:-2] + b',\n  "x": nope\n}'
    code, out = podwire.run(ENV, raw)
    doc = json.loads(out)
    assert got and (code, doc["code"]) == (1, 6)
    assert doc["details"].endswith(f"line 7 column 8 (char {raw.index(b'nope')})")


def test_an_add_that_succeeds_imports_nothing_the_interpreter_had_not_loaded(
    tmp_path: Path,
) -> None:
    # The plugin's start-up is the product's headline latency: on the success path it may import
    # only what `python3 -IS` has loaded before any script runs, and the built-in _socket.
    def imported(argv: list[str], env: dict[str, str], stdin: bytes) -> set[str]:
        done = subprocess.run(
            [sys.executable, "-IS", "-X", "importtime", *argv],
            env={"PATH": "/usr/bin:/bin", **env},
            input=stdin,
            capture_output=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr[-500:]
        lines = done.stderr.decode().splitlines()
        return {ln.rsplit("|", 1)[1].strip() for ln in lines if ln.startswith("import time:")}

    at_start = imported(["-c", "pass"], {}, b"")
    got = serve_once(tmp_path / "agent.sock", b'{"id":1,"result":{"cniVersion":"1.0.0"}}\n')
    env = {**ENV, "CNI_ARGS": "K8S_POD_NAME=x"}
    plugin = imported([str(PLUGIN)], env, conf(tmp_path))
    assert got and json.loads(got[0])["params"]["env"] == env
    assert plugin - at_start == {"_socket"}
