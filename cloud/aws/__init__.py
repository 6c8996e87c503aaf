"""The aws provider: EC2 through aiobotocore, instance facts through IMDSv2 (asyncio only)."""

from cloud.aws.ec2 import EC2_ACTIONS_USED, Credentials, Ec2, RetryPolicy, TokenBucket, open_ec2
from cloud.aws.imds import Imds
from cloud.aws.provider import (
    AwsProvider,
    AwsSettings,
    EniInfo,
    EniLinks,
    LinkWaiter,
    NetlinkEniLinks,
)

__all__ = [
    "EC2_ACTIONS_USED",
    "AwsProvider",
    "AwsSettings",
    "Credentials",
    "Ec2",
    "EniInfo",
    "EniLinks",
    "Imds",
    "LinkWaiter",
    "NetlinkEniLinks",
    "RetryPolicy",
    "TokenBucket",
    "open_ec2",
]
