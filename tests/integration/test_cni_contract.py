"""The CNI contract to the letter, through the installed plugin as a runtime runs it: DEL and GC
undo ADD before they answer, requested addresses, hostile input, the node's own namespace."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator

import pytest

from tests.harness import Node, running_node
from tests.netns import Netns

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
