"""The EC2 actions the agent may call: the one list behind ``deploy/iam-policy.json``.

The AWS provider calls nothing outside ``EC2_ACTIONS``; ``tests/unit/test_deploy.py`` checks
that the policy file is exactly ``iam_policy()``. Tagging is allowed on network interfaces
only (the agent tags the ENIs it creates, as ``CreateNetworkInterface``'s tag specification
and with ``CreateTags``), never on instances or anything else.
"""

from __future__ import annotations

from typing import Any

EC2_ACTIONS: tuple[str, ...] = (
    "ec2:DescribeInstances",
    "ec2:DescribeInstanceTypes",
    "ec2:DescribeNetworkInterfaces",
    "ec2:DescribeSubnets",
    "ec2:CreateNetworkInterface",
    "ec2:AttachNetworkInterface",
    "ec2:DetachNetworkInterface",
    "ec2:DeleteNetworkInterface",
    "ec2:ModifyNetworkInterfaceAttribute",
    "ec2:AssignPrivateIpAddresses",
    "ec2:UnassignPrivateIpAddresses",
    "ec2:CreateTags",
    # Security groups for pods with agent-made branches: AWS allows these to EKS's own control
    # plane only (the emulator and allowlisted accounts let the agent call them).
    "ec2:AssociateTrunkInterface",
    "ec2:DisassociateTrunkInterface",
    "ec2:DescribeTrunkInterfaceAssociations",
)

TAGGING_ACTIONS: tuple[str, ...] = ("ec2:CreateTags",)
TAGGABLE_RESOURCES: tuple[str, ...] = ("arn:aws:ec2:*:*:network-interface/*",)


def api_names() -> frozenset[str]:
    """The actions as EC2 API names (``DescribeSubnets``), as the provider spells them."""
    return frozenset(a.removeprefix("ec2:") for a in EC2_ACTIONS)


def iam_policy() -> dict[str, Any]:
    """The IAM policy document granting exactly ``EC2_ACTIONS`` (what deploy/ ships)."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "PodwireEc2",
                "Effect": "Allow",
                "Action": [a for a in EC2_ACTIONS if a not in TAGGING_ACTIONS],
                # EC2's Describe* actions and most ENI actions take no resource-level
                # restriction worth having here: the agent works on whatever ENIs its own
                # instance holds.
                "Resource": "*",
            },
            {
                "Sid": "PodwireTagNetworkInterfaces",
                "Effect": "Allow",
                "Action": list(TAGGING_ACTIONS),
                "Resource": list(TAGGABLE_RESOURCES),
            },
        ],
    }
