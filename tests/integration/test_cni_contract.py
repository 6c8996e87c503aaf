"""The CNI contract to the letter, through the installed plugin as a runtime runs it: DEL and GC
undo ADD before they answer, requested addresses, hostile input, the node's own namespace."""

from __future__ import annotations

import concurrent.futures
import subprocess
from collections.abc import Iterator

import pytest

from tests.harness import Node, ping, running_node
from tests.netns import Netns, unique_name

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    with running_node(tag="ct", cidrs=("10.79.0.0/24",), cooldown=30.0) as n:
        yield n


def links_of(ns: Netns) -> set[str]:
    out = ns.run("ip", "-o", "link", "show").stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def allocated(node: Node) -> dict[str, str]:
    return {p["container_id"]: p["ip"] for p in node.call("agent.pods")}


# -- DEL and GC undo ADD before they answer (issue 15, item 1) -------------------------------


def test_del_answers_once_the_netns_holds_only_lo(node: Node) -> None:
    pod = node.new_pod()
    add = node.add(pod)
    assert add.code == 0, add
    host_veth = add.doc["interfaces"][0]["name"]
    assert node.delete(pod).code == 0
    assert links_of(pod) == {"lo"}  # as cnitool checks, right after DEL
    assert host_veth not in links_of(node.netns)
    assert add.ip not in node.netns.run("ip", "route").stdout
    again = node.delete(pod)  # a repeated DEL finds nothing and succeeds
    assert (again.code, again.stdout) == (0, b"")
    # another container ID into the same netns at once: the name eth0 is free again
    other = node.add(pod, container_id=pod.name + "-2")
    assert other.code == 0, other
    assert node.delete(pod, container_id=pod.name + "-2").code == 0
    assert links_of(pod) == {"lo"}


def test_parallel_dels_each_answer_after_their_netns_is_clean(node: Node) -> None:
    pods = [node.new_pod("par") for _ in range(50)]
    with concurrent.futures.ThreadPoolExecutor(16) as ex:
        adds = list(ex.map(node.add, pods))
    assert all(r.code == 0 for r in adds), [r for r in adds if r.code]

    def delete_and_look(pod: Netns) -> tuple[int, set[str]]:
        r = node.delete(pod)
        return r.code, links_of(pod)

    with concurrent.futures.ThreadPoolExecutor(16) as ex:
        outcomes = list(ex.map(delete_and_look, pods))
    assert outcomes == [(0, {"lo"})] * 50
    assert not {p.name for p in pods} & set(allocated(node))
    assert not [n for n in links_of(node.netns) if n.startswith("pwv")]


def test_gc_answers_once_the_released_veths_are_gone(node: Node) -> None:
    keep, drop = node.new_pod(), node.new_pod()
    kept, dropped = node.add(keep), node.add(drop)
    assert kept.code == 0 and dropped.code == 0
    conf = node.plugin_conf(
        "1.1.0", **{"cni.dev/valid-attachments": [{"containerID": keep.name, "ifname": "eth0"}]}
    )
    r = node.cni("GC", conf=conf)
    assert (r.code, r.stdout) == (0, b"")
    host_links = links_of(node.netns)
    assert dropped.doc["interfaces"][0]["name"] not in host_links
    assert kept.doc["interfaces"][0]["name"] in host_links
    assert links_of(drop) == {"lo"} and "eth0" in links_of(keep)
    assert node.delete(keep).code == 0


# -- requested addresses (item 2) -------------------------------------------------------------


def test_a_requested_address_through_cni_args_and_the_ips_capability(node: Node) -> None:
    first, second, third = node.new_pod(), node.new_pod(), node.new_pod()
    r = node.add(first, args="IgnoreUnknown=1;IP=10.79.0.200")
    assert r.code == 0 and r.ip == "10.79.0.200", r
    assert ping(node.netns, "10.79.0.200")
    conf = node.plugin_conf(runtimeConfig={"ips": ["10.79.0.201/24"]})
    r = node.add(second, conf=conf)
    assert r.code == 0 and r.ip == "10.79.0.201" and r.doc["ips"][0]["address"].endswith("/32")
    before = allocated(node)
    taken = node.add(third, args="IP=10.79.0.200")
    assert taken.code == 1 and taken.doc["code"] == 11 and first.name in taken.doc["details"]
    outside = node.add(third, args="IP=10.80.0.1")
    assert outside.code == 1 and outside.doc["code"] == 7 and "10.80.0.1" in outside.doc["details"]
    assert allocated(node) == before and links_of(third) == {"lo"}
    # released, the address cools for 30 s; asked for by name it is handed out at once
    assert node.delete(first).code == 0
    r = node.add(third, args="IP=10.79.0.200")
    assert r.code == 0 and r.ip == "10.79.0.200", r
    for pod in (second, third):
        assert node.delete(pod).code == 0


# -- hostile or broken input (items 3, 4, 6, 7) ----------------------------------------------


def test_the_nodes_own_netns_is_refused_and_nothing_touched(node: Node) -> None:
    assert node.proc is not None
    bound = unique_name("ctbind")
    subprocess.run(["ip", "netns", "attach", bound, str(node.proc.pid)], check=True)
    try:
        links, routes = links_of(node.netns), node.netns.run("ip", "route").stdout
        before, pool = allocated(node), node.call("agent.status")["pool"]
        for netns in (
            "/proc/self/ns/net",
            f"/proc/{node.proc.pid}/ns/net",
            node.netns.path,
            f"/run/netns/{bound}",
        ):
            r = node.cni("ADD", "own-netns", netns)
            assert r.code == 1 and r.doc["code"] == 4 and "node's own" in r.doc["msg"], (netns, r)
        assert links_of(node.netns) == links and node.netns.run("ip", "route").stdout == routes
        assert allocated(node) == before and node.call("agent.status")["pool"] == pool
    finally:
        subprocess.run(["ip", "netns", "del", bound], check=False)


def test_a_config_the_plugin_cannot_parse_is_6_even_without_a_socket_path(node: Node) -> None:
    pod = node.new_pod()
    r = node.add(pod, conf=b'{"cniVersion": "1.0.0", "name": ')
    assert r.code == 1 and r.doc["code"] == 6 and "line 1 column" in r.doc["details"], r
    # with the socket path, the agent answers, and the column is the user's, not the frame's
    raw = b'{"agentSocket": "%s",\n "cniVersion": "1.0.0",\n "name": nope}' % node.socket.encode()
    r = node.add(pod, conf=raw)
    assert r.code == 1 and r.doc["code"] == 6 and "line 3 column 10" in r.doc["details"], r


def test_an_oversized_config_is_6_on_add_and_on_del_and_nothing_is_spooled(node: Node) -> None:
    pod = node.new_pod()
    big = node.plugin_conf(pad="x" * (8 << 20))
    for command in ("ADD", "DEL"):
        r = node.cni(command, pod.name, pod.path, conf=big)
        assert r.code == 1 and r.doc["code"] == 6 and r.doc["msg"] == "request too large", r
    assert not list((node.dir / "spool").glob("*"))
    assert node.call("agent.status")["ready"]


def test_check_with_a_malformed_prev_result_is_a_decode_error(node: Node) -> None:
    pod = node.new_pod()
    assert node.add(pod).code == 0
    r = node.cni("CHECK", pod.name, pod.path, conf=node.plugin_conf(prevResult={"ips": 5}))
    assert r.code == 1 and r.doc["code"] == 6 and "$.prevResult.ips" in r.doc["details"], r
    assert node.delete(pod).code == 0


def test_a_missing_network_name_is_named(node: Node) -> None:
    conf = {k: v for k, v in node.plugin_conf().items() if k != "name"}
    pod = node.new_pod()
    r = node.add(pod, conf=conf)
    assert r.code == 1 and r.doc["code"] == 7 and r.doc["msg"] == "missing network name"
    assert "None" not in r.doc.get("details", "")


def test_stale_checkpoint_temp_files_are_removed_at_start() -> None:
    with running_node(tag="cttmp") as node:
        assert node.add(node.new_pod()).code == 0
        node.kill()
        stale = node.dir / "state" / ".state.json.4242.tmp"
        stale.write_text('{"half": ')
        node.start()
        assert not stale.exists() and len(allocated(node)) == 1


def test_the_agent_refuses_to_start_when_a_chained_plugin_is_missing() -> None:
    node = Node(tag="ctchain")
    try:
        node.config_path.write_text(
            node.config_path.read_text()
            + f'[cni]\ninstall = true\nbin_dir = "{node.bin_dir}"\n'
            + f'conf_dir = "{node.dir / "conf"}"\nchain = ["nosuchplugin"]\n'
        )
        with pytest.raises(RuntimeError, match="exited with 2"):
            node.start()
        assert "cni.chain: plugin 'nosuchplugin' is not an executable" in node.log()
        assert not (node.dir / "conf").exists()
    finally:
        node.close()
