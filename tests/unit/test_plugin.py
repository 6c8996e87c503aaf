"""The plugin's own logic, called as a function (the e2e tests exec the installed file)."""

from __future__ import annotations

import json
import socket
import threading
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
    assert request["params"]["config"]["name"] == "podwire" and got[0].count(b"\n") == 1
