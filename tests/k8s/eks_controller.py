"""A stand-in for EKS's VPC resource controller, for the EKS drop-in path of tests/k8s.

What Amazon's controller does for security groups for pods (../shared/SG-FOR-PODS.md 1.1-1.6),
reduced to what a node sees, through the emulator's EC2 API and the test cluster's API server:

* it creates a CNINode for every node (here: for the nodes it is told about);
* a node whose CNINode has the feature ``SecurityGroupsForPods`` gets a trunk ENI (the primary
  ENI's subnet and groups, InterfaceType trunk, the next device index) and
  ``vpc.amazonaws.com/pod-eni`` in its capacity (the scheduler then places pods that ask);
* a pod on such a node that asks for ``vpc.amazonaws.com/pod-eni`` gets a branch ENI with the
  groups its SecurityGroupPolicy objects give (the same matcher), associated with the trunk on
  the lowest free VLAN id, and the annotation ``vpc.amazonaws.com/pod-eni`` (the JSON the
  controller writes, ``vlanId`` spelling); a deleted pod's branch is disassociated and deleted
  (no cooldown here).

It polls (every 0.2 s) rather than watches: a test fixture, not a product.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from typing import Any

import boto3

from agent.sg.kube import policy as to_policy
from agent.sg.policy import PodIdentity, decide
from cloud.emulator import Vpc
from cloud.kube.objects import parse_pod, parse_policy
from tests.k8s.api import Api, ApiError, NotFound

log = logging.getLogger("tests.eks_controller")

POD_ENI = "vpc.amazonaws.com/pod-eni"
CNINODES = "/apis/networking.k8s.aws/v1alpha1/cninodes"
FEATURE = "SecurityGroupsForPods"


class EksController:
    def __init__(self, api: Api, vpc: Vpc, nodes: Sequence[str], *, branches: int = 9) -> None:
        self.api = api
        self.vpc = vpc
        self.ec2 = boto3.client("ec2", **vpc.client_kwargs())
        self.nodes = list(nodes)
        self.branches = branches
        self.trunks: dict[str, str] = {}  # node -> trunk ENI id
        self.made: dict[str, dict[str, Any]] = {}  # pod uid -> {eni, assoc, vlan, node}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="eks-controller", daemon=True)

    def start(self) -> EksController:
        for node in self.nodes:
            try:
                self.api.create(
                    CNINODES,
                    {
                        "apiVersion": "networking.k8s.aws/v1alpha1",
                        "kind": "CNINode",
                        "metadata": {"name": node},
                        "spec": {"features": []},
                    },
                )
            except ApiError as e:
                if e.status != 409:
                    raise
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for node in self.nodes:
                try:
                    self._reconcile(node)
                except Exception as e:  # a fixture: keep going, let the test see it
                    self.errors.append(f"{node}: {type(e).__name__}: {e}")
                    log.exception("EKS stand-in")

    # -- the node ------------------------------------------------------------------------------

    def _instance(self, node: str) -> str:
        provider_id = self.api.get(f"/api/v1/nodes/{node}")["spec"]["providerID"]
        return str(provider_id.rsplit("/", 1)[-1])

    def _reconcile(self, node: str) -> None:
        if node not in self.trunks:
            cninode = self.api.get(f"{CNINODES}/{node}")
            features = (cninode.get("spec") or {}).get("features") or []
            if not any(f.get("name") == FEATURE for f in features):
                return
            self.trunks[node] = self._trunk(node)
            for field in ("capacity", "allocatable"):
                self.api.patch(
                    f"/api/v1/nodes/{node}/status",
                    {"status": {field: {POD_ENI: str(self.branches)}}},
                )
        self._pods(node)

    def _trunk(self, node: str) -> str:
        instance = self._instance(node)
        enis = self.ec2.describe_network_interfaces(
            Filters=[{"Name": "attachment.instance-id", "Values": [instance]}]
        )["NetworkInterfaces"]
        for eni in enis:
            if eni.get("InterfaceType") == "trunk":
                return str(eni["NetworkInterfaceId"])
        primary = next(e for e in enis if e["Attachment"]["DeviceIndex"] == 0)
        trunk = self.ec2.create_network_interface(
            SubnetId=primary["SubnetId"],
            Groups=[g["GroupId"] for g in primary["Groups"]],
            InterfaceType="trunk",
            Description="aws-k8s-trunk-eni",
            TagSpecifications=[
                {
                    "ResourceType": "network-interface",
                    "Tags": [
                        {"Key": "node.k8s.amazonaws.com/instance_id", "Value": instance},
                        {"Key": "eks:eni:owner", "Value": "eks-vpc-resource-controller"},
                    ],
                }
            ],
        )["NetworkInterface"]["NetworkInterfaceId"]
        used = {e["Attachment"]["DeviceIndex"] for e in enis}
        index = next(i for i in range(1, 16) if i not in used)
        self.ec2.attach_network_interface(
            NetworkInterfaceId=trunk, InstanceId=instance, DeviceIndex=index
        )
        return str(trunk)

    # -- pods ----------------------------------------------------------------------------------

    def _pods(self, node: str) -> None:
        pods = self.api.items("/api/v1/pods", fieldSelector=f"spec.nodeName={node}")
        live = set()
        for raw in pods:
            p = parse_pod(raw)
            live.add(p.uid)
            if not p.requests_pod_eni or POD_ENI in p.annotations or p.uid in self.made:
                continue
            self._branch(node, raw)
        for uid in [u for u, m in self.made.items() if m["node"] == node and u not in live]:
            m = self.made.pop(uid)
            self.ec2.disassociate_trunk_interface(AssociationId=m["assoc"])
            self.ec2.delete_network_interface(NetworkInterfaceId=m["eni"])

    def _groups(self, raw: dict[str, Any]) -> list[str]:
        p = parse_pod(raw)
        items = self.api.items(
            f"/apis/vpcresources.k8s.aws/v1beta1/namespaces/{p.namespace}/securitygrouppolicies"
        )
        policies = [pol for i in items if (pol := to_policy(parse_policy(i))) is not None]
        sa_labels: dict[str, str] = {}
        try:
            sa = self.api.get(
                f"/api/v1/namespaces/{p.namespace}/serviceaccounts/{p.service_account}"
            )
            sa_labels = sa["metadata"].get("labels") or {}
        except NotFound:
            pass
        d = decide(
            PodIdentity(
                namespace=p.namespace,
                name=p.name,
                labels=p.labels,
                service_account_labels=sa_labels,
            ),
            policies,
        )
        if d.groups:
            return list(d.groups)
        # none matched: the instance's groups (the controller's SecurityGroupRequested case)
        trunk = self.ec2.describe_network_interfaces(
            NetworkInterfaceIds=[self.trunks[p.node_name]]
        )["NetworkInterfaces"][0]
        return [g["GroupId"] for g in trunk["Groups"]]

    def _branch(self, node: str, raw: dict[str, Any]) -> None:
        p = parse_pod(raw)
        trunk_id = self.trunks[node]
        trunk = self.ec2.describe_network_interfaces(NetworkInterfaceIds=[trunk_id])[
            "NetworkInterfaces"
        ][0]
        held = {m["vlan"] for m in self.made.values() if m["node"] == node}
        vlan = next(v for v in range(1, 121) if v not in held)
        eni = self.ec2.create_network_interface(
            SubnetId=trunk["SubnetId"],
            Groups=self._groups(raw),
            Description="aws-k8s-branch-eni",
            TagSpecifications=[
                {
                    "ResourceType": "network-interface",
                    "Tags": [
                        {"Key": "vpcresources.k8s.aws/vlan-id", "Value": str(vlan)},
                        {"Key": "vpcresources.k8s.aws/trunk-eni-id", "Value": trunk_id},
                        {"Key": "eks:eni:owner", "Value": "eks-vpc-resource-controller"},
                    ],
                }
            ],
        )["NetworkInterface"]
        assoc = self.ec2.associate_trunk_interface(
            BranchInterfaceId=eni["NetworkInterfaceId"], TrunkInterfaceId=trunk_id, VlanId=vlan
        )["InterfaceAssociation"]["AssociationId"]
        subnet = self.ec2.describe_subnets(SubnetIds=[trunk["SubnetId"]])["Subnets"][0]
        self.made[p.uid] = {
            "eni": eni["NetworkInterfaceId"],
            "assoc": assoc,
            "vlan": vlan,
            "node": node,
        }
        annotation = [
            {
                "eniId": eni["NetworkInterfaceId"],
                "ifAddress": eni["MacAddress"],
                "privateIp": eni["PrivateIpAddress"],
                "ipv6Addr": "",
                "vlanId": vlan,
                "subnetCidr": subnet["CidrBlock"],
                "subnetV6Cidr": "",
                "associationID": assoc,
            }
        ]
        self.api.patch(
            f"/api/v1/namespaces/{p.namespace}/pods/{p.name}",
            {"metadata": {"annotations": {POD_ENI: json.dumps(annotation)}}},
        )
