"""Security groups enforced on real packets in the VPC router: ``model`` (the policy as plain
values), ``build`` (the policy from moto's state), ``render`` (pure: policy -> nftables),
``firewall`` (the shell that applies it and reads the drop counters)."""

from cloud.emulator.firewall.build import desired_policy
from cloud.emulator.firewall.firewall import Firewall
from cloud.emulator.firewall.model import Eni, Group, Policy, Port, Rule, TrunkCable

__all__ = ["Eni", "Firewall", "Group", "Policy", "Port", "Rule", "TrunkCable", "desired_policy"]
