"""Egress SNAT: the desired state and its rulesets as pure functions (``rules``), the kernel
backends that apply them (``backends``, over netlink's nftables and iptables transports) and
the reconciler that keeps them true (``service``)."""
