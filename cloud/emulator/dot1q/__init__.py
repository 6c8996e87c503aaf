"""802.1Q on a kernel without VLAN devices: eBPF tagging and demultiplexing under tc
(``programs``: the bytecode, pure; ``kernel``: loading and attaching), and VLAN links built from
them (``links``) for the node side of tests."""

from cloud.emulator.dot1q.kernel import attach, detach, load
from cloud.emulator.dot1q.programs import Branch, demux, tagger

__all__ = ["Branch", "attach", "demux", "detach", "load", "tagger"]
