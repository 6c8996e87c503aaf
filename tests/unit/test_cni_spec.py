from __future__ import annotations

from ipaddress import IPv4Address
from typing import Any

import pytest

from agent.cni.spec import (
    AddOutcome,
    CniError,
    parse_cni_args,
    prev_result_ip,
    render_add_result,
    render_error,
    validate,
)

CONF = {"cniVersion": "1.0.0", "name": "podwire", "type": "podwire"}
ENV = {
    "CNI_COMMAND": "ADD",
    "CNI_CONTAINERID": "abc123",
    "CNI_NETNS": "/run/netns/x",
    "CNI_IFNAME": "eth0",
    "CNI_PATH": "/opt/cni/bin",
}


def env(**kw: str) -> dict[str, str]:
    out = dict(ENV)
    for k, v in kw.items():
        out[f"CNI_{k}"] = v
    return out


def code_of(env: dict[str, str], conf: dict[str, Any] = CONF) -> int:
    with pytest.raises(CniError) as e:
        validate(env, conf)
    return e.value.code


def test_valid_add() -> None:
    req = validate(env(ARGS="K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-1;IgnoreUnknown=1"), CONF)
    assert req.key.network == "podwire" and req.key.container_id == "abc123"
    assert (req.pod_namespace, req.pod_name) == ("default", "web-1")


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"COMMAND": ""}, 4),
        ({"COMMAND": "FROB"}, 4),
        ({"CONTAINERID": ""}, 3),
        ({"CONTAINERID": "-bad"}, 4),
        ({"CONTAINERID": "a b"}, 4),
        ({"NETNS": ""}, 4),
        ({"NETNS": "relative/path"}, 4),
        ({"IFNAME": ""}, 4),
        ({"IFNAME": "x" * 16}, 4),
        ({"IFNAME": "."}, 4),
        ({"IFNAME": "a/b"}, 4),
        ({"IFNAME": "a:b"}, 4),
        ({"IFNAME": "a b"}, 4),
        ({"ARGS": "novalue"}, 4),
    ],
    ids=lambda v: repr(v),
)
def test_bad_env(changes: dict[str, str], code: int) -> None:
    assert code_of(env(**changes)) == code


@pytest.mark.parametrize(
    ("conf", "code"),
    [
        ({"name": "podwire"}, 1),
        ({"cniVersion": "9.9.9", "name": "podwire"}, 1),
        ({"cniVersion": 1, "name": "podwire"}, 1),
        ({"cniVersion": "1.0.0"}, 7),
        ({"cniVersion": "1.0.0", "name": "bad name"}, 7),
        ({"cniVersion": "1.0.0", "name": "podwire", "mtu": 10}, 7),
        ({"cniVersion": "1.0.0", "name": "podwire", "mtu": "1500"}, 7),
        ({"cniVersion": "1.0.0", "name": "podwire", "prevResult": []}, 6),
    ],
)
def test_bad_config(conf: dict[str, Any], code: int) -> None:
    assert code_of(env(), conf) == code


def test_del_needs_no_netns() -> None:
    assert validate(env(COMMAND="DEL", NETNS=""), CONF).netns == ""


def test_gc_and_status_need_1_1_0() -> None:
    assert code_of({"CNI_COMMAND": "STATUS"}, CONF) == 1
    conf = {**CONF, "cniVersion": "1.1.0"}
    assert validate({"CNI_COMMAND": "STATUS"}, conf).command == "STATUS"
    assert code_of({"CNI_COMMAND": "GC"}, conf) == 4  # CNI_PATH missing


def test_gc_reads_both_attachment_keys() -> None:
    base = {**CONF, "cniVersion": "1.1.0"}
    gc_env = {"CNI_COMMAND": "GC", "CNI_PATH": "/opt/cni/bin"}
    for key in ("cni.dev/valid-attachments", "cni.dev/attachments"):
        req = validate(gc_env, {**base, key: [{"containerID": "a", "ifname": "eth0"}]})
        assert req.conf.valid_attachments == (("a", "eth0"),)
    assert code_of(gc_env, {**base, "cni.dev/valid-attachments": [{"containerID": 1}]}) == 6


def test_cni_args() -> None:
    assert parse_cni_args("A=1;;B=x=y") == {"A": "1", "B": "x=y"}


OUT = AddOutcome(
    ifname="eth0",
    netns="/run/netns/x",
    pod_mac="aa:bb:cc:dd:ee:01",
    host_veth="pwv0123456789ab",
    host_mac="aa:bb:cc:dd:ee:02",
    ip=IPv4Address("10.0.1.5"),
    mtu=1500,
)


def test_render_1_0_0() -> None:
    r = render_add_result("1.0.0", OUT, None)
    assert r == {
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "pwv0123456789ab", "mac": "aa:bb:cc:dd:ee:02"},
            {"name": "eth0", "mac": "aa:bb:cc:dd:ee:01", "sandbox": "/run/netns/x"},
        ],
        "ips": [{"address": "10.0.1.5/32", "gateway": "169.254.1.1", "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}],
        "dns": {},
    }


def test_render_versions_differ_where_the_spec_does() -> None:
    old = render_add_result("0.4.0", OUT, {"nameservers": ["10.0.0.2"]})
    assert old["ips"][0]["version"] == "4" and old["dns"] == {"nameservers": ["10.0.0.2"]}
    new = render_add_result("1.1.0", OUT, None)
    assert "version" not in new["ips"][0] and new["interfaces"][1]["mtu"] == 1500


def test_render_error_and_prev_result() -> None:
    assert render_error("1.0.0", CniError(11, "no IP", "pool empty")) == {
        "cniVersion": "1.0.0",
        "code": 11,
        "msg": "no IP",
        "details": "pool empty",
    }
    assert prev_result_ip(render_add_result("1.0.0", OUT, None)) == IPv4Address("10.0.1.5")
    assert prev_result_ip({"ips": [{"address": "junk"}]}) is None


def test_a_missing_network_name_says_so() -> None:
    with pytest.raises(CniError) as e:
        validate(env(), {"cniVersion": "1.0.0"})
    assert (e.value.code, e.value.msg) == (7, "missing network name")
    assert "None" not in e.value.details


@pytest.mark.parametrize(
    ("prev", "path"),
    [
        ({"ips": 5}, "expected a list @ $.prevResult.ips"),
        ({"ips": [5]}, "expected an object @ $.prevResult.ips[0]"),
        ({"ips": [{"address": 5}]}, "expected a string @ $.prevResult.ips[0].address"),
        ({"interfaces": [{"name": "a", "mtu": "x"}]}, "@ $.prevResult.interfaces[0].mtu"),
        ({"routes": {}}, "expected a list @ $.prevResult.routes"),
        ({"dns": []}, "expected an object @ $.prevResult.dns"),
        ({"cniVersion": 1}, "@ $.prevResult.cniVersion"),
    ],
)
def test_a_malformed_prev_result_is_a_decode_error_with_its_path(
    prev: dict[str, Any], path: str
) -> None:
    with pytest.raises(CniError) as e:
        validate(env(COMMAND="CHECK"), {**CONF, "prevResult": prev})
    assert e.value.code == 6 and path in e.value.details
    # DEL and GC do not read it: a runtime's odd cache never blocks a teardown
    assert validate(env(COMMAND="DEL"), {**CONF, "prevResult": prev}).command == "DEL"


def test_requested_address_from_each_place() -> None:
    assert validate(env(), CONF).requested_ip is None
    assert validate(env(ARGS="IgnoreUnknown=1;IP=10.0.1.7"), CONF).requested_ip == IPv4Address(
        "10.0.1.7"
    )
    runtime = {**CONF, "runtimeConfig": {"ips": ["10.0.1.8/24"]}}
    assert validate(env(), runtime).requested_ip == IPv4Address("10.0.1.8")
    conv = {**CONF, "args": {"cni": {"ips": ["10.0.1.9"]}}}
    assert validate(env(), conv).requested_ip == IPv4Address("10.0.1.9")
    both = {**CONF, "runtimeConfig": {"ips": ["10.0.1.8/16"]}}
    assert validate(env(ARGS="IP=10.0.1.8"), both).requested_ip == IPv4Address("10.0.1.8")
    # only ADD asks for an address
    assert validate(env(COMMAND="DEL", ARGS="IP=junk"), CONF).requested_ip is None


@pytest.mark.parametrize(
    ("args", "conf", "code", "text"),
    [
        ("IP=10.0.1.300", {}, 4, "invalid address in CNI_ARGS IP"),
        ("", {"runtimeConfig": {"ips": ["x"]}}, 7, "invalid address in runtimeConfig.ips"),
        ("", {"runtimeConfig": {"ips": "10.0.1.8"}}, 7, "invalid runtimeConfig.ips"),
        ("IP=fd00::5", {}, 2, "IPv4 only"),
        ("IP=10.0.1.5,10.0.1.6", {}, 2, "one IPv4 address"),
        ("IP=10.0.1.5", {"runtimeConfig": {"ips": ["10.0.1.6/24"]}}, 7, "conflicting"),
    ],
)
def test_requested_address_errors(args: str, conf: dict[str, Any], code: int, text: str) -> None:
    with pytest.raises(CniError) as e:
        validate(env(ARGS=args), {**CONF, **conf})
    assert e.value.code == code and text in f"{e.value.msg} {e.value.details}"


def test_pod_annotations_come_from_runtime_config() -> None:
    annotations = {"podwire.io/security-groups": "sg-0123abcd", "other": "x"}
    conf = {**CONF, "runtimeConfig": {"io.kubernetes.cri.pod-annotations": annotations}}
    assert validate(env(), conf).annotations == annotations
    assert validate(env(), CONF).annotations == {}
    assert validate(env(), {**CONF, "runtimeConfig": {"portMappings": []}}).annotations == {}


@pytest.mark.parametrize(
    "runtime",
    [
        {"io.kubernetes.cri.pod-annotations": ["a"]},
        {"io.kubernetes.cri.pod-annotations": {"a": 1}},
        "not an object",
    ],
)
def test_malformed_annotations_fail_add_but_never_del(runtime: Any) -> None:
    conf = {**CONF, "runtimeConfig": runtime}
    with pytest.raises(CniError) as e:
        validate(env(), conf)
    assert e.value.code == 6 and "io.kubernetes.cri.pod-annotations" in e.value.details
    assert validate(env(COMMAND="DEL"), conf).annotations == {}
