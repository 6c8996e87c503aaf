"""802.1Q for kernels without VLAN devices: eBPF programs under tc that tag and demultiplex
(``programs``: the bytecode, pure; ``tc``: the rtnetlink messages, pure; ``kernel``: loading
and attaching), and the ``vlan.eth.<vid>`` links built from them (``links``). The agent uses
them for branch ENIs where ``type vlan`` links cannot be made; the emulator's VPC router uses
the programs for its side of trunk cables.
"""

from netlink.dot1q.links import Dot1qLink, Support, support
from netlink.dot1q.programs import Branch, demux, tagger, tags

__all__ = ["Branch", "Dot1qLink", "Support", "demux", "support", "tagger", "tags"]
