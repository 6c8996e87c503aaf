"""Command line: ``python -m cloud.emulator serve|cleanup``.

``serve`` starts the emulator, prints one JSON line (``VpcInfo``: urls, namespaces, nodes) once
it is ready, and runs until SIGINT/SIGTERM, then removes everything it made. ``cleanup`` removes
the namespaces (and the processes inside them) of runs whose process is gone.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from cloud.emulator import info
from cloud.emulator.api import Vpc
from cloud.emulator.netns import cleanup


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cloud.emulator")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the emulator until interrupted")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=0, help="EC2 API port (0: pick a free one)")
    serve.add_argument("--cidr", default="10.0.0.0/16", help="the VPC's CIDR")
    serve.add_argument("--region", default="us-east-1")
    serve.add_argument(
        "--subnet", action="append", default=[], metavar="CIDR[@AZ]", help="repeatable"
    )
    serve.add_argument(
        "--node",
        action="append",
        default=[],
        metavar="TYPE[@SUBNET-CIDR][,POD-CIDR]",
        help="repeatable; a POD-CIDR makes a static-provider node",
    )
    serve.add_argument("--no-fabric", action="store_true", help="EC2 API and IMDS only")
    serve.add_argument(
        "--no-security-groups",
        action="store_true",
        help="the router forwards everything (security groups kept in the API only)",
    )
    clean = sub.add_parser("cleanup", help="remove what crashed runs left behind")
    clean.add_argument("--all", action="store_true", help="also namespaces of live runs")
    clean.add_argument("--pid", type=int, help="only the namespaces of the run with this pid")
    return parser


def _serve(args: argparse.Namespace) -> int:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with Vpc.start(
        args.cidr,
        region=args.region,
        fabric=not args.no_fabric,
        security_groups=not args.no_security_groups,
        host=args.host,
        port=args.port,
    ) as vpc:
        by_cidr = {}
        for spec in args.subnet:
            cidr, _, az = spec.partition("@")
            by_cidr[cidr] = vpc.add_subnet(cidr, az or None)
        for spec in args.node:
            head, _, pod_cidr = spec.partition(",")
            instance_type, _, subnet_cidr = head.partition("@")
            vpc.add_node(
                instance_type or "m5.large",
                by_cidr[subnet_cidr] if subnet_cidr else None,
                pod_cidr=pod_cidr or None,
            )
        sys.stdout.write(info.converter.dumps(vpc.describe()).decode() + "\n")
        sys.stdout.flush()
        stop.wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    removed = cleanup(everything=args.all, pid=args.pid)
    print(f"removed {len(removed)} namespace(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
