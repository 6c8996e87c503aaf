"""The emulator podwire's tests and demo run against: an EC2 API (moto, patched to enforce the
EC2 rules the agent depends on), IMDSv2 per node, fault injection, and a VPC fabric made of
network namespaces. See ``api`` for the Python API and ``__main__`` for the command line."""

from cloud.emulator.api import Instance, Node, Subnet, Vpc
from cloud.emulator.echo import EchoServer
from cloud.emulator.errors import EmulatorError, FabricError
from cloud.emulator.faults import FaultPlan

__all__ = [
    "EchoServer",
    "EmulatorError",
    "FabricError",
    "FaultPlan",
    "Instance",
    "Node",
    "Subnet",
    "Vpc",
]
