"""The node side of 802.1Q trunks in emulator tests (``links.VlanLinks``), built with the
agent's own construction (``netlink.dot1q``)."""
