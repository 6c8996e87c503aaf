"""agentctl's security-groups views render what the agent answers (pure functions)."""

from __future__ import annotations

from agent.ctl import show_branches, show_pods, show_sg_line

READY = {
    "enabled": True,
    "state": "ready",
    "reason": "trunk eni-trunk on eth2",
    "mode": "strict",
    "branches": "agent",
    "link": "vlan",
    "limit": 9,
    "trunk": {
        "eni_id": "eni-trunk",
        "mac": "02:00:00:00:0e:01",
        "device_index": 2,
        "link": "eth2",
        "index": 7,
    },
    "counts": {"creating": 1, "associated": 2, "cooling": 1, "deleting": 0},
    "held_by_others": 1,
    "cooldown_s": 60.0,
}


def test_status_line_says_why_when_unavailable() -> None:
    assert show_sg_line({"enabled": False}) == "off"
    line = show_sg_line(
        {**READY, "state": "unsupported", "reason": "t3.large does not support ENI trunking"}
    )
    assert (
        line
        == "strict mode, branches by agent; UNSUPPORTED: t3.large does not support ENI trunking"
    )
    assert show_sg_line(READY) == (
        "strict mode, branches by agent, 802.1Q VLAN links; trunk eni-trunk on eth2; "
        "9 branches: 2 in use, 1 cooling, 1 creating, 0 deleting, 1 EKS-made"
    )
    assert show_sg_line({**READY, "link": "ebpf"}).startswith(
        "strict mode, branches by agent, 802.1Q links by eBPF; trunk"
    )
    no_8021q = "no 802.1Q: this kernel has no VLAN devices and load eBPF program: ..."
    assert show_sg_line({**READY, "state": "unsupported", "reason": no_8021q}) == (
        f"strict mode, branches by agent; UNSUPPORTED: {no_8021q}"
    )


def test_branches_view_lists_vlan_state_pod_and_cooldown() -> None:
    rows = [
        {
            "branch": "eni-b1",
            "vlan": 1,
            "state": "associated",
            "pod": "shop/orders",
            "ip": "10.0.1.15",
            "groups": ["sg-0000a990"],
            "source": "annotation",
            "cooldown_left_s": None,
            "error": "",
        },
        {
            "branch": "eni-b2",
            "vlan": 2,
            "state": "cooling",
            "pod": "shop/old",
            "ip": "10.0.1.16",
            "groups": ["sg-0000a990"],
            "source": "agent",
            "cooldown_left_s": 41.5,
            "error": "",
        },
        {
            "branch": "eni-x",
            "vlan": 7,
            "state": "associated",
            "pod": "shop/eks",
            "ip": "10.0.1.77",
            "groups": [],
            "source": "eks",
            "cooldown_left_s": None,
            "error": "",
        },
    ]
    out = show_branches({**READY, "rows": rows}).splitlines()
    assert out[1].startswith("trunk eni-trunk: link eth2 (ifindex 7), device 2")
    assert out[2].split() == [
        "BRANCH",
        "ENI",
        "VLAN",
        "STATE",
        "POD",
        "IP",
        "GROUPS",
        "SOURCE",
        "ERROR",
    ]
    assert out[3].split() == [
        "eni-b1",
        "1",
        "associated",
        "shop/orders",
        "10.0.1.15",
        "sg-0000a990",
        "annotation",
    ]
    assert "cooling (41.5s left)" in out[4]
    assert out[5].split()[-2:] == ["(EKS)", "eks"]


def test_pods_view_shows_groups_or_the_shared_pool() -> None:
    base = {
        "namespace": "shop",
        "container_id": "c" * 20,
        "ifname": "eth0",
        "network": "podwire",
        "netns": "/x",
        "age_s": 5.0,
        "host_veth": "pwv1",
    }
    pods = [
        {**base, "name": "web", "ip": "10.0.1.5", "owner": "eni-0", "groups": [], "branch": None},
        {
            **base,
            "name": "orders",
            "ip": "10.0.1.15",
            "owner": "eni-b1",
            "groups": ["sg-0000a990"],
            "branch": {"eni": "eni-b1", "vlan": 1, "mode": "strict", "source": "annotation"},
        },
    ]
    out = show_pods(pods).splitlines()
    assert "SECURITY GROUPS" in out[0]
    assert "shared pool" in out[1]
    assert "sg-0000a990 vlan 1 strict" in out[2]
