"""Security groups for pods from the cluster (issue 12 items 3-4): a SecurityGroupPolicy applied
through the API selects a pod created through the API and run by kubelet; that pod reaches the
VM its groups admit and a pod the policy does not select cannot (real TCP on the emulated VPC,
whose router enforces security groups). Then live changes, which EKS cannot do: the policy
edited, the pod's branch gets the new groups at once (EC2, agentctl, metric, events); a pod
that cannot change in place is reported "restart to apply"."""

from __future__ import annotations

import datetime
import json
import secrets
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

from cloud.kube.client import ACCESS
from tests.cri import wait_for
from tests.k8s.cluster import Cluster, Worker
from tests.k8s.eks_controller import CNINODES, EksController
from tests.k8s.workloads import DEADLINE, HTTP_PORT, Namespace, http_get, pod_url, server_pod

pytestmark = pytest.mark.root

DB_PORT = 5432
SGP = "/apis/vpcresources.k8s.aws/v1beta1/namespaces/{ns}/securitygrouppolicies"


class Groups:
    """Security groups and a database VM on the cluster's VPC."""

    def __init__(self, cluster: Cluster) -> None:
        self.vpc = cluster.vpc
        self.ec2 = boto3.client("ec2", **cluster.vpc.client_kwargs())
        tag = secrets.token_hex(3)
        self.app = self.group(f"app-{tag}")
        self.ops = self.group(f"ops-{tag}")
        self.db = self.group(f"db-{tag}")
        self.admin = self.group(f"admin-{tag}")
        # the database admits TCP from group app, the admin VM from group ops
        for target, source in ((self.db, self.app), (self.admin, self.ops)):
            self.ec2.authorize_security_group_ingress(
                GroupId=target,
                IpPermissions=[
                    {
                        "IpProtocol": "tcp",
                        "FromPort": DB_PORT,
                        "ToPort": DB_PORT,
                        "UserIdGroupPairs": [{"GroupId": source}],
                    }
                ],
            )
        # strict mode: kubelet's probes (and the tests' HTTP) reach a pod from its node through
        # the VPC, judged by the pod's groups, which must admit the node's (as on EKS)
        (node_group, *_) = cluster.workers["aws"].vnode.security_groups
        for group in (self.app, self.ops):
            self.ec2.authorize_security_group_ingress(
                GroupId=group,
                IpPermissions=[
                    {
                        "IpProtocol": "tcp",
                        "FromPort": HTTP_PORT,
                        "ToPort": HTTP_PORT,
                        "UserIdGroupPairs": [{"GroupId": node_group}],
                    }
                ],
            )
        self.db_vm = self.vpc.add_instance(security_groups=[self.db])
        self.db_vm.serve(DB_PORT)
        self.admin_vm = self.vpc.add_instance(security_groups=[self.admin])
        self.admin_vm.serve(DB_PORT)

    def group(self, name: str) -> str:
        return str(
            self.ec2.create_security_group(GroupName=name, Description=name, VpcId=self.vpc.vpc_id)[
                "GroupId"
            ]
        )

    def eni_groups(self, eni: str) -> list[str]:
        (found,) = self.ec2.describe_network_interfaces(NetworkInterfaceIds=[eni])[
            "NetworkInterfaces"
        ]
        return [g["GroupId"] for g in found["Groups"]]

    def close(self) -> None:
        for vm in (self.db_vm, self.admin_vm):
            self.vpc.remove_instance(vm)


@pytest.fixture(scope="module")
def groups(cluster: Cluster) -> Iterator[Groups]:
    g = Groups(cluster)
    try:
        yield g
    finally:
        g.close()


def policy(ns: Namespace, name: str, groups: list[str], **selectors: Any) -> Any:
    return ns.api.create(
        SGP.format(ns=ns.name),
        {
            "apiVersion": "vpcresources.k8s.aws/v1beta1",
            "kind": "SecurityGroupPolicy",
            "metadata": {"name": name},
            "spec": {**selectors, "securityGroups": {"groupIds": groups}},
        },
    )


def dial(worker: Worker, pod: Any, ip: str) -> tuple[int, str]:
    """From inside ``pod``, a TCP connection to ``ip:5432`` (the pod's test server dials and
    echoes; 502 when it times out). Returns the status and the body: the VM's view of the
    caller."""
    return http_get(worker.vnode.netns_path, pod_url(pod, "/call", tcp=f"{ip}:{DB_PORT}"), 20)


def agent_pod(worker: Worker, ns: Namespace, name: str) -> dict[str, Any]:
    return worker.pods()[(ns.name, name)]


def test_a_policy_selects_a_pod_that_reaches_what_its_groups_admit(
    cluster: Cluster, groups: Groups, ns: Namespace
) -> None:
    worker = cluster.workers["aws"]
    policy(ns, "app", [groups.app], podSelector={"matchLabels": {"role": "app"}})
    selected = ns.run(server_pod("web", node="aws", labels={"role": "app"}), on_fail=worker.logs)
    other = ns.run(server_pod("other", node="aws", labels={"role": "batch"}), on_fail=worker.logs)
    # a policy that selects by the pod's service account's labels (the agent watches the
    # namespace's service accounts once such a policy exists)
    ns.api.create(
        ns.path("serviceaccounts"),
        {"metadata": {"name": "reporting", "labels": {"tier": "gold"}}},
    )
    policy(ns, "gold", [groups.app], serviceAccountSelector={"matchLabels": {"tier": "gold"}})
    manifest = server_pod("report", node="aws", labels={"role": "batch"})
    manifest["spec"]["serviceAccountName"] = "reporting"
    report = ns.run(manifest, on_fail=worker.logs)
    assert agent_pod(worker, ns, "report")["groups"] == [groups.app]
    assert dial(worker, report, groups.db_vm.primary_ip)[0] == 200
    row = agent_pod(worker, ns, "web")
    assert row["groups"] == [groups.app] and row["branch"]["source"] == "policy", row
    assert agent_pod(worker, ns, "other")["groups"] == []  # an ordinary pod: the shared pool
    assert groups.eni_groups(row["branch"]["eni"]) == [groups.app]

    status, body = dial(worker, selected, groups.db_vm.primary_ip)
    assert status == 200, body
    assert body.split(":")[0] == selected["status"]["podIP"]  # no NAT: the VM sees the pod
    status, body = dial(worker, other, groups.db_vm.primary_ip)
    assert status == 502 and "timeout" in body, body  # dropped by the VPC: a real timeout


def test_editing_the_policy_changes_a_running_pods_groups(
    cluster: Cluster, groups: Groups, ns: Namespace
) -> None:
    worker = cluster.workers["aws"]
    policy(ns, "team", [groups.app], podSelector={"matchLabels": {"team": "x"}})
    pod = ns.run(server_pod("svc", node="aws", labels={"team": "x"}), on_fail=worker.logs)
    bystander = ns.run(server_pod("plain", node="aws", labels={"team": "y"}), on_fail=worker.logs)
    branch = agent_pod(worker, ns, "svc")["branch"]["eni"]
    assert dial(worker, pod, groups.db_vm.primary_ip)[0] == 200
    assert dial(worker, pod, groups.admin_vm.primary_ip)[0] == 502

    # the policy now gives group ops instead of app: the running pod's branch follows at once
    path = SGP.format(ns=ns.name) + "/team"
    ns.api.patch(path, {"spec": {"securityGroups": {"groupIds": [groups.ops]}}})
    wait_for(
        "the branch gets the new groups",
        lambda: groups.eni_groups(branch) == [groups.ops],
        DEADLINE,
        on_fail=lambda: worker.agent.log()[-3000:],
    )
    wait_for(
        "the agent records them",
        lambda: agent_pod(worker, ns, "svc")["groups"] == [groups.ops],
        DEADLINE,
    )
    assert agent_pod(worker, ns, "svc")["branch"]["eni"] == branch  # same branch and address
    # new connections are judged by the new groups
    assert dial(worker, pod, groups.admin_vm.primary_ip)[0] == 200
    assert dial(worker, pod, groups.db_vm.primary_ip)[0] == 502
    # visibly: an event on the pod, the agent's events, its metric
    wait_for(
        "the pod's event",
        lambda: [e for e in ns.events("svc") if e["reason"] == "SecurityGroupsChanged"] or None,
        DEADLINE,
    )
    kinds = [e["kind"] for e in worker.agent.call("agent.events")]
    assert "sg.retargeted" in kinds
    assert metric(worker, 'podwire_sg_live_changes_total{outcome="applied"}') >= 1

    # a pod on the shared pool that the policy now selects cannot change in place
    ns.api.patch(
        path,
        {
            "spec": {
                "podSelector": {
                    "matchLabels": {"team": None},  # merge patch: null removes the key
                    "matchExpressions": [{"key": "team", "operator": "Exists"}],
                }
            }
        },
    )
    wait_for(
        "restart to apply reported",
        lambda: (
            [
                r
                for r in worker.agent.call("agent.kube")["groups"]["pods"]
                if r["pod"] == f"{ns.name}/plain"
            ]
            or None
        ),
        DEADLINE,
    )
    rows = worker.agent.call("agent.kube")["groups"]["pods"]
    mine = [r for r in rows if r["pod"] == f"{ns.name}/plain"]
    assert len(mine) == 1, (rows, worker.agent.log()[-4000:])
    (row,) = mine
    assert row["running"] == [] and row["resolved"] == [groups.ops]
    assert row["state"].startswith("restart to apply")
    assert "restart to apply" in worker.agent.ctl("kube").stdout
    wait_for(
        "the pod's warning",
        lambda: (
            [e for e in ns.events("plain") if e["reason"] == "SecurityGroupsRestartToApply"] or None
        ),
        DEADLINE,
    )
    assert agent_pod(worker, ns, "plain")["groups"] == []  # untouched meanwhile
    assert dial(worker, bystander, groups.admin_vm.primary_ip)[0] == 502


def metric(worker: Worker, name: str) -> float:
    for line in worker.agent.ctl("metrics").stdout.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


@pytest.fixture(scope="module")
def eks(cluster: Cluster) -> Iterator[EksController]:
    controller = EksController(cluster.api, cluster.vpc, ["eks"]).start()
    try:
        yield controller
    finally:
        controller.close()


def test_eks_drop_in_wires_the_branch_eks_made(
    cluster: Cluster, groups: Groups, ns: Namespace, eks: EksController
) -> None:
    # [security_groups] branch_source = "eks": the agent asks for SecurityGroupsForPods on its
    # CNINode, EKS's controller (the stand-in) attaches the trunk and advertises pod-eni
    worker = cluster.workers["eks"]
    wait_for(
        "the agent's CNINode feature",
        lambda: any(
            f.get("name") == "SecurityGroupsForPods"
            for f in cluster.api.get(f"{CNINODES}/eks")["spec"].get("features") or []
        ),
        DEADLINE,
        on_fail=lambda: worker.agent.log()[-3000:],
    )
    wait_for(
        "the trunk EKS's controller attached",
        lambda: worker.agent.call("agent.status")["security_groups"]["state"] == "ready",
        DEADLINE,
        on_fail=lambda: str(eks.errors) + worker.agent.log()[-3000:],
    )
    assert (
        worker.agent.call("agent.status")["security_groups"]["trunk"]["eni_id"] == eks.trunks["eks"]
    )
    assert worker.agent.call("agent.kube")["cninode"]["state"] == "SecurityGroupsForPods requested"
    # a pod the policy selects asks for vpc.amazonaws.com/pod-eni (EKS's webhook adds it)
    policy(ns, "db-clients", [groups.app], podSelector={"matchLabels": {"role": "db-client"}})
    manifest = server_pod("eks-web", node="eks", labels={"role": "db-client"})
    manifest["spec"]["containers"][0]["resources"] = {
        "limits": {"vpc.amazonaws.com/pod-eni": "1"},
        "requests": {"vpc.amazonaws.com/pod-eni": "1"},
    }
    pod = ns.run(manifest, on_fail=lambda: str(eks.errors) + worker.logs())
    annotation = json.loads(pod["metadata"]["annotations"]["vpc.amazonaws.com/pod-eni"])[0]
    row = agent_pod(worker, ns, "eks-web")
    assert row["branch"]["source"] == "eks" and row["branch"]["eni"] == annotation["eniId"]
    assert row["ip"] == annotation["privateIp"] == pod["status"]["podIP"]
    assert groups.eni_groups(annotation["eniId"]) == [groups.app]
    plain = ns.run(server_pod("eks-plain", node="eks"), on_fail=worker.logs)
    assert agent_pod(worker, ns, "eks-plain")["branch"] is None
    assert dial(worker, pod, groups.db_vm.primary_ip)[0] == 200
    assert dial(worker, plain, groups.db_vm.primary_ip)[0] == 502
    # the agent made no branch of its own: EKS's controller did the EC2 work
    assert (
        metric(worker, 'podwire_ec2_requests_total{action="AssociateTrunkInterface",outcome="ok"}')
        == 0
    )


def test_the_agents_use_exactly_their_rbac(cluster: Cluster) -> None:
    # every agent of the cluster runs as deploy/kubernetes's service account: from the API
    # server's audit log, each (group, resource, verb) rbac.yaml grants was used, and nothing
    # was ever refused (tests earlier in this session exercised every feed)
    used: set[tuple[str, str, str]] = set()
    refused, starting = [], []
    for e in cluster.cp.audit():
        if e.get("stage") not in ("ResponseStarted", "ResponseComplete"):
            continue
        ref = e.get("objectRef") or {}
        code = (e.get("responseStatus") or {}).get("code", 0)
        if code in (401, 403):
            at = datetime.datetime.fromisoformat(e["requestReceivedTimestamp"])
            # a starting API server (test_kube restarts it) refuses until its RBAC is loaded
            late = [s for s in cluster.cp.apiserver_starts if s[0] <= at <= s[1]]
            (starting if late else refused).append((e["verb"], e.get("requestURI"), code))
        if code < 400:
            used.add((ref.get("apiGroup", ""), ref.get("resource", ""), e["verb"]))
    granted = {(g, r, v) for (g, r), verbs in ACCESS.items() for v in verbs}
    assert refused == [], {"refused": refused, "while starting": starting}
    assert used == granted, {"unused": granted - used, "beyond": used - granted}
