"""One node end to end: the agent in a namespace, pods as namespaces, the installed plugin
executed as a runtime would, real packets."""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Node, ping, running_node

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    with running_node(tag="it") as n:
        yield n


def allocated(node: Node) -> dict[str, str]:
    return {p["container_id"]: p["ip"] for p in node.call("agent.pods")}


def host_veths(node: Node) -> set[str]:
    out = node.netns.run("ip", "-o", "link", "show").stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if "pwv" in line}


def leaked_veths(node: Node, settle: float = 5.0) -> set[str]:
    """Host veths that belong to no allocation, once background deletions had time to end."""
    deadline = time.monotonic() + settle
    while True:
        owned = {p["host_veth"] for p in node.call("agent.pods")}
        extra = host_veths(node) - owned
        if not extra or time.monotonic() > deadline:
            return extra
        time.sleep(0.05)


def test_pods_talk_to_each_other_and_to_the_node(node: Node) -> None:
    pods = [node.new_pod() for _ in range(3)]
    results = [node.add(p) for p in pods]
    assert all(r.code == 0 for r in results), results
    ips = [r.ip for r in results]
    assert len(set(ips)) == 3
    assert ping(pods[0], ips[1]) and ping(pods[2], ips[0])
    assert ping(node.netns, ips[1]) and ping(pods[1], node.primary_ip)
    # the pod's view is the recipe: /32, link route to the gateway, default via it
    routes = pods[0].run("ip", "route").stdout
    assert (
        "default via 169.254.1.1 dev eth0" in routes and "169.254.1.1 dev eth0 scope link" in routes
    )
    assert "PERMANENT" in pods[0].run("ip", "neigh").stdout
    for p in pods:
        assert node.delete(p).code == 0


def test_check_finds_a_deleted_route_and_a_deleted_address() -> None:
    # repair off: with it on, the agent puts the route back before CHECK can miss it
    with running_node(tag="chk", env={"PODWIRE_AGENT_REPAIR": "false"}) as node:
        _check_finds_what_is_missing(node)


def _check_finds_what_is_missing(node: Node) -> None:
    pod = node.new_pod()
    add = node.add(pod)
    assert add.code == 0, add
    conf = node.plugin_conf(prevResult=add.doc)
    assert node.cni("CHECK", pod.name, pod.path, conf=conf).code == 0
    node.netns.run("ip", "route", "del", f"{add.ip}/32")
    r = node.cni("CHECK", pod.name, pod.path, conf=conf)
    assert r.code == 1 and r.doc["code"] == 110 and f"host route {add.ip}/32" in r.doc["details"]
    assert r.doc["cniVersion"] == "1.0.0"
    # ADD again repairs it (same key, same address)
    again = node.add(pod)
    assert again.code == 0 and again.ip == add.ip
    pod.run("ip", "addr", "del", f"{add.ip}/32", "dev", "eth0")
    r = node.cni("CHECK", pod.name, pod.path, conf=conf)
    assert r.code == 1 and "address" in r.doc["details"]
    assert node.delete(pod).code == 0


def test_del_twice_and_del_after_the_netns_is_gone(node: Node) -> None:
    pod = node.new_pod()
    add = node.add(pod)
    assert add.code == 0
    first, second = node.delete(pod), node.delete(pod)
    assert (first.code, first.stdout, second.code, second.stdout) == (0, b"", 0, b"")
    gone = node.new_pod()
    assert node.add(gone).code == 0
    gone.close()
    r = node.delete(gone)
    assert r.code == 0, r
    assert gone.name not in allocated(node)
    # without a netns variable at all, as a runtime may send after a reboot
    assert node.cni("DEL", gone.name, "").code == 0


def test_same_key_twice_keeps_one_address(node: Node) -> None:
    pod = node.new_pod()
    a, b = node.add(pod), node.add(pod)
    assert a.code == b.code == 0 and a.ip == b.ip
    assert list(allocated(node).values()).count(a.ip) == 1
    assert ping(node.netns, a.ip)
    assert node.delete(pod).code == 0


def test_concurrent_adds_for_many_pods(node: Node) -> None:
    pods = [node.new_pod() for _ in range(40)]
    with concurrent.futures.ThreadPoolExecutor(16) as ex:
        results = list(ex.map(node.add, pods))
    assert all(r.code == 0 for r in results), [r for r in results if r.code]
    ips = [r.ip for r in results]
    assert len(set(ips)) == 40
    state = json.loads((node.dir / "state" / "state.json").read_text())
    assert {a["ip"] for a in state["allocations"]} >= set(ips)
    assert all(ping(node.netns, ip) for ip in random.sample(ips, 5))
    with concurrent.futures.ThreadPoolExecutor(16) as ex:
        assert all(r.code == 0 for r in ex.map(node.delete, pods))
    assert not set(ips) & set(allocated(node).values())


BAD_ENV = [
    ("no command", {"CNI_COMMAND": ""}, 4),
    ("unknown command", {"CNI_COMMAND": "FROB"}, 4),
    ("no container id", {"CNI_CONTAINERID": ""}, 3),
    ("bad container id", {"CNI_CONTAINERID": "../x"}, 4),
    ("no netns", {"CNI_NETNS": ""}, 4),
    ("relative netns", {"CNI_NETNS": "netns"}, 4),
    ("missing netns", {"CNI_NETNS": "/run/netns/pw-does-not-exist"}, 4),
    ("netns is a directory", {"CNI_NETNS": "/tmp"}, 4),
    ("netns is a file", {"CNI_NETNS": "/etc/hostname"}, 4),
    ("no ifname", {"CNI_IFNAME": ""}, 4),
    ("long ifname", {"CNI_IFNAME": "x" * 16}, 4),
    ("ifname with slash", {"CNI_IFNAME": "a/b"}, 4),
    ("bad CNI_ARGS", {"CNI_ARGS": "K8S_POD_NAME"}, 4),
]


@pytest.mark.parametrize(("case", "env", "code"), BAD_ENV, ids=[c[0] for c in BAD_ENV])
def test_bad_env(node: Node, case: str, env: dict[str, str], code: int) -> None:
    pod = node.new_pod()
    base = {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": pod.name,
        "CNI_NETNS": pod.path,
        "CNI_IFNAME": "eth0",
        "CNI_PATH": str(node.bin_dir),
    }
    before = allocated(node)
    r = node.cni("ADD", env={**base, **env})
    assert r.code == 1 and r.doc["code"] == code, r
    assert r.doc["cniVersion"] == "1.0.0" and r.doc["msg"]
    assert allocated(node) == before and not leaked_veths(node)  # nothing leaked
    assert "eth0" not in pod.run("ip", "link").stdout


BAD_CONF = [
    ("malformed json", b'{"cniVersion": "1.0.0", "name": ', 6),
    ("not an object", b"[1, 2]", 6),
    ("empty stdin", b"", 6),
    ("unknown version", {"cniVersion": "0.9.9"}, 1),
    ("bad network name", {"name": "no spaces"}, 7),
    ("bad mtu", {"mtu": 12}, 7),
    ("oversized", {"pad": "x" * (1 << 20)}, 6),
]


@pytest.mark.parametrize(("case", "conf", "code"), BAD_CONF, ids=[c[0] for c in BAD_CONF])
def test_bad_config(node: Node, case: str, conf: dict[str, object] | bytes, code: int) -> None:
    pod = node.new_pod()
    if isinstance(conf, dict):
        raw = json.dumps({**node.plugin_conf(), **conf}).encode()
    elif conf.startswith(b"{"):  # still name the agent's socket, as the installed conflist does
        raw = b'{"agentSocket": "%s", ' % node.socket.encode() + conf[1:]
    else:
        raw = conf
    before = allocated(node)
    r = node.add(pod, conf=raw)
    assert r.code == 1 and r.doc["code"] == code, r
    assert allocated(node) == before and not leaked_veths(node)


def test_version_is_answered_locally(node: Node) -> None:
    for version in ("0.4.0", "1.0.0", "1.1.0"):
        r = node.cni("VERSION", conf={"cniVersion": version})
        assert r.code == 0 and r.doc == {
            "cniVersion": version,
            "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"],
        }


def test_result_versions(node: Node) -> None:
    pod = node.new_pod()
    for version in ("0.4.0", "1.1.0"):
        r = node.add(pod, conf=node.plugin_conf(version))
        assert r.code == 0 and r.doc["cniVersion"] == version
    assert r.doc["interfaces"][1]["mtu"] == 1500
    assert node.delete(pod, conf=node.plugin_conf("1.1.0")).code == 0


def test_gc_and_status_through_the_plugin(node: Node) -> None:
    keep, drop = node.new_pod(), node.new_pod()
    assert node.add(keep).code == 0 and node.add(drop).code == 0
    conf = node.plugin_conf(
        "1.1.0", **{"cni.dev/valid-attachments": [{"containerID": keep.name, "ifname": "eth0"}]}
    )
    r = node.cni("GC", conf=conf)
    assert (r.code, r.stdout) == (0, b"")
    pods = allocated(node)
    assert keep.name in pods and drop.name not in pods
    assert node.cni("STATUS", conf=node.plugin_conf("1.1.0")).code == 0
    assert node.delete(keep).code == 0


def test_pool_exhaustion_answers_11() -> None:
    with running_node(cidrs=("10.78.0.0/30",), tag="small") as node:
        pods = [node.new_pod() for _ in range(3)]
        assert node.add(pods[0]).code == 0 and node.add(pods[1]).code == 0
        r = node.add(pods[2])
        assert r.code == 1 and r.doc["code"] == 11 and "all 2 addresses in use" in r.doc["details"]
        st = node.cni("STATUS", conf=node.plugin_conf("1.1.0"))
        assert st.doc["code"] == 50
        assert node.delete(pods[0]).code == 0
        r = node.add(pods[2])  # the freed address is cooling: still 11, with the reason
        assert r.doc["code"] == 11 and "cooling" in r.doc["details"]


def test_agent_down_add_11_status_50_del_spooled_and_replayed() -> None:
    node = Node(tag="down")
    try:
        node.start()
        pod = node.new_pod()
        add = node.add(pod)
        assert add.code == 0
        node.stop()
        r = node.add(node.new_pod())
        assert r.code == 1 and r.doc["code"] == 11 and "not reachable" in r.doc["msg"]
        assert node.cni("STATUS", conf=node.plugin_conf("1.1.0")).doc["code"] == 50
        d = node.delete(pod)
        assert (d.code, d.stdout) == (0, b"")
        spooled = list((node.dir / "spool").glob("*.json"))
        assert len(spooled) == 1
        node.start()
        assert pod.name not in allocated(node)
        assert not list((node.dir / "spool").glob("*.json"))
        assert any(e["msg"] == "replayed spooled DEL" for e in node.log_events())
        # the host route is gone and the address is cooling, not handed out again
        assert add.ip not in node.netns.run("ip", "route").stdout
        assert node.call("agent.status")["pool"]["cooling"] == 1
    finally:
        node.close()


def test_sigkill_at_any_moment_loses_nothing_and_never_doubles() -> None:
    node = Node(tag="kill")
    try:
        node.start()
        pods = [node.new_pod() for _ in range(24)]
        succeeded: dict[str, str] = {}
        rnd = random.Random(7)
        pending = list(pods)
        for _ in range(3):
            with concurrent.futures.ThreadPoolExecutor(8) as ex:
                futures = {ex.submit(node.add, p): p for p in pending}
                time.sleep(rnd.uniform(0.02, 0.15))
                node.kill()
                for f, p in futures.items():
                    r = f.result()
                    if r.code == 0:
                        succeeded[p.name] = r.ip
            node.start()
            live = allocated(node)
            # every ADD that was answered with success survived the kill, with its address
            for cid, ip in succeeded.items():
                assert live.get(cid) == ip, (cid, ip, live.get(cid))
            assert len(set(live.values())) == len(live)  # no address twice
            pending = [p for p in pods if p.name not in succeeded]
        # the runtime retries what failed; everything ends wired, distinct and reachable
        for p in pending:
            r = node.add(p)
            assert r.code == 0, r
            succeeded[p.name] = r.ip
        assert len(set(succeeded.values())) == len(pods)
        assert all(ping(node.netns, ip) for ip in list(succeeded.values())[:5])
    finally:
        node.close()


def test_chained_portmap_and_bandwidth_consume_our_result() -> None:
    if not all((Path("/usr/lib/cni") / p).exists() for p in ("portmap", "bandwidth")):
        pytest.skip("containernetworking-plugins not installed")
    with running_node(chain=("portmap", "bandwidth"), tag="chain") as node:
        pod = node.new_pod()
        runtime = {
            "portMappings": [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}],
            "bandwidth": {"ingressRate": 8_000_000, "ingressBurst": 1_000_000},
        }
        prev = None
        plugins = node.conflist["plugins"]
        for plugin in plugins:
            conf = {
                "cniVersion": node.conflist["cniVersion"],
                "name": node.conflist["name"],
                **plugin,
            }
            if prev is not None:
                conf["prevResult"] = prev
            conf["runtimeConfig"] = {
                k: v for k, v in runtime.items() if plugin.get("capabilities", {}).get(k)
            }
            r = node.cni("ADD", pod.name, pod.path, conf=conf, plugin=plugin["type"])
            assert r.code == 0, (plugin["type"], r)
            prev = r.doc
        assert prev is not None and prev["ips"][0]["address"].endswith("/32")
        ip = prev["ips"][0]["address"].split("/")[0]
        nat = node.netns.run("iptables-save", "-t", "nat").stdout
        assert "--dport 18080" in nat and ip in nat  # portmap used our address
        host_veth = prev["interfaces"][0]["name"]
        assert (
            "tbf" in node.netns.run("tc", "qdisc", "show", "dev", host_veth).stdout
        )  # bandwidth found our host veth
        for plugin in reversed(plugins):
            conf = {
                "cniVersion": node.conflist["cniVersion"],
                "name": node.conflist["name"],
                **plugin,
                "prevResult": prev,
                "runtimeConfig": {
                    k: v for k, v in runtime.items() if plugin.get("capabilities", {}).get(k)
                },
            }
            r = node.cni("DEL", pod.name, pod.path, conf=conf, plugin=plugin["type"])
            assert r.code == 0, (plugin["type"], r)
        assert "--dport 18080" not in node.netns.run("iptables-save", "-t", "nat").stdout
        assert not allocated(node) and not leaked_veths(node)


def test_machine_namespace_untouched() -> None:
    rules = subprocess.run(["ip", "rule"], capture_output=True, text=True).stdout
    assert all(line.split(":")[0] in ("0", "32766", "32767") for line in rules.splitlines())
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert "pwv" not in links
    assert os.path.exists("/proc/self/ns/net")


def test_deleted_host_route_and_downed_veth_come_back(node: Node) -> None:
    pod = node.new_pod()
    add = node.add(pod)
    assert add.code == 0
    host_veth = add.doc["interfaces"][0]["name"]
    node.netns.run("ip", "route", "del", f"{add.ip}/32")
    deadline = time.monotonic() + 10
    while f"{add.ip} dev {host_veth}" not in node.netns.run("ip", "route").stdout:
        assert time.monotonic() < deadline, "route not put back"
        time.sleep(0.05)
    assert ping(node.netns, add.ip)
    node.netns.run("ip", "link", "set", host_veth, "down")
    while "state UP" not in node.netns.run("ip", "link", "show", host_veth).stdout:
        assert time.monotonic() < deadline + 10, "veth not brought back up"
        time.sleep(0.05)
    kinds = [e.get("what") for e in node.call("agent.events") if e["kind"] == "repaired"]
    assert "route" in kinds and "link down" in kinds
    assert 'podwire_gc_repairs_total{kind="route"}' in node.ctl("metrics").stdout
    assert node.delete(pod).code == 0
    # a DEL's own route removal is never "repaired"
    time.sleep(0.3)
    assert add.ip not in node.netns.run("ip", "route").stdout
