from __future__ import annotations

import enum
from typing import Any

import attrs
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rpc.errors import CODE_DECODE, DecodeError
from rpc.messages import (
    CniEnv,
    CniParams,
    ErrorBody,
    Peer,
    Request,
    structure,
    unstructure,
)

WIRE_NAMES = {
    "command": "CNI_COMMAND",
    "container_id": "CNI_CONTAINERID",
    "netns": "CNI_NETNS",
    "ifname": "CNI_IFNAME",
    "args": "CNI_ARGS",
    "path": "CNI_PATH",
}

json_scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text()
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
cni_envs = st.builds(
    CniEnv,
    command=st.sampled_from(["ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION"]),
    container_id=st.text(),
    netns=st.text(),
    ifname=st.text(),
    args=st.text(),
    path=st.text(),
)
cni_params = st.builds(
    CniParams, env=cni_envs, config=st.dictionaries(st.text(), json_values, max_size=5)
)


@given(cni_envs)
def test_cni_env_round_trip_with_wire_names(env: CniEnv) -> None:
    wire = unstructure(env)
    assert wire == {key: getattr(env, name) for name, key in WIRE_NAMES.items()}
    assert structure(orjson.loads(orjson.dumps(wire)), CniEnv) == env


@given(cni_params)
def test_cni_params_round_trip_through_json(params: CniParams) -> None:
    wire = orjson.loads(orjson.dumps(unstructure(params)))
    assert set(wire) == {"env", "config", "trace"}
    assert set(wire["env"]) == set(WIRE_NAMES.values())
    assert structure(wire, CniParams) == params


@given(
    cni_envs, st.dictionaries(st.text().filter(lambda k: k not in WIRE_NAMES.values()), st.text())
)
def test_unknown_env_keys_are_ignored(env: CniEnv, extra: dict[str, str]) -> None:
    assert structure({**extra, **unstructure(env)}, CniEnv) == env


def test_defaults_fill_missing_env_keys() -> None:
    assert structure({"CNI_COMMAND": "VERSION"}, CniEnv) == CniEnv(command="VERSION")


def test_request_defaults_params() -> None:
    assert structure({"id": 1, "method": "agent.status"}, Request) == Request(
        id=1, method="agent.status", params={}
    )


@given(st.builds(ErrorBody, code=st.integers(), msg=st.text(), details=st.text()))
def test_error_body_round_trip(body: ErrorBody) -> None:
    assert structure(unstructure(body), ErrorBody) == body


def test_peer_round_trip() -> None:
    peer = Peer(pid=10, uid=0, gid=0)
    assert structure(unstructure(peer), Peer) == peer


def decode_error(obj: Any, cls: type[Any]) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        structure(obj, cls)
    assert info.value.code == CODE_DECODE
    assert info.value.msg == "invalid request"
    return info.value


@pytest.mark.parametrize(
    ("obj", "detail"),
    [
        (
            {"env": {"CNI_COMMAND": "ADD", "CNI_IFNAME": 5}, "config": {}},
            "invalid value for type, expected str @ $.env.CNI_IFNAME",
        ),
        ({"env": {}, "config": {}}, "required field missing @ $.env.CNI_COMMAND"),
        ({"env": "ADD", "config": {}}, "expected CniEnv @ $.env"),
        ({"env": {"CNI_COMMAND": "ADD"}, "config": []}, "expected dict @ $.config"),
        ({"env": {"CNI_COMMAND": "ADD"}}, "required field missing @ $.config"),
        ([], "expected CniParams @ $"),
    ],
)
def test_decode_error_names_the_wire_path(obj: Any, detail: str) -> None:
    assert detail in decode_error(obj, CniParams).details


def test_decode_error_lists_every_bad_field() -> None:
    details = decode_error({"id": "1", "method": 2, "params": []}, Request).details
    assert "expected int @ $.id" in details
    assert "expected str @ $.method" in details
    assert "@ $.params" in details


@pytest.mark.parametrize("bad_id", [True, 1.0, "1", None])
def test_request_id_must_be_an_integer(bad_id: Any) -> None:
    assert "@ $.id" in decode_error({"id": bad_id, "method": "m"}, Request).details


class Colour(enum.IntEnum):
    RED = 1


@attrs.frozen(kw_only=True)
class Strict:
    names: list[str]
    ratio: float
    flag: bool
    colour: Colour


def test_converter_does_not_coerce() -> None:
    good = {"names": ["eth0"], "ratio": 1, "flag": False, "colour": 1}
    assert structure(good, Strict) == Strict(
        names=["eth0"], ratio=1.0, flag=False, colour=Colour.RED
    )
    details = decode_error({"names": "eth0", "ratio": True, "flag": 0, "colour": 2}, Strict).details
    for field in ("names", "ratio", "flag", "colour"):
        assert f"@ $.{field}" in details


def test_strictness_survives_repeated_use() -> None:
    # cattrs registers some generated hooks directly on first use; the checks must stay.
    for _ in range(3):
        assert (
            "expected dict @ $.config"
            in decode_error({"env": {"CNI_COMMAND": "ADD"}, "config": []}, CniParams).details
        )
        assert (
            "expected dict @ $.params"
            in decode_error({"id": 1, "method": "m", "params": ["x"]}, Request).details
        )
