"""``podwire-agent``: run the daemon, install or remove the CNI plugin."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agent import config as config_mod


def _cmd_run(args: argparse.Namespace) -> int:
    import anyio

    from agent import daemon, logs
    from agent.checkpoint import CheckpointCorrupt

    try:
        cfg = config_mod.load(args.config)
    except config_mod.ConfigError as e:
        print(f"podwire-agent: {e}", file=sys.stderr)
        return 2
    logs.setup(cfg.agent.log_level, cfg.agent.log_format)
    try:
        anyio.run(daemon.run, cfg, backend="asyncio")
    except CheckpointCorrupt as e:
        print(f"podwire-agent: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        pass
    return 0


def _cmd_install(args: argparse.Namespace) -> int:
    from agent.install import install

    changed = install(
        bin_dir=args.bin_dir,
        conf_dir=args.conf_dir,
        socket=args.socket,
        spool_dir=args.spool_dir,
        mtu=args.mtu,
        chain=[c for c in args.chain.split(",") if c],
    )
    for path in changed:
        print(f"installed {path}")
    if not changed:
        print("already installed")
    return 0


def _cmd_uninstall(args: argparse.Namespace) -> int:
    from agent.install import uninstall
    from agent.snat.service import remove_all

    for path in uninstall(bin_dir=args.bin_dir, conf_dir=args.conf_dir):
        print(f"removed {path}")
    # the SNAT state goes only on this explicit request, never when the agent stops
    for backend in remove_all():
        print(f"removed SNAT state ({backend})")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="podwire-agent", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the agent in the foreground")
    run.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"TOML file (default: {config_mod.DEFAULT_PATH} when it exists)",
    )
    run.set_defaults(func=_cmd_run)
    for name, func, text in (
        ("install-cni", _cmd_install, "install the podwire plugin and its conflist"),
        ("uninstall", _cmd_uninstall, "remove the conflist, the plugin and the SNAT state"),
    ):
        s = sub.add_parser(name, help=text)
        s.add_argument("--bin-dir", type=Path, default=Path("/opt/cni/bin"))
        s.add_argument("--conf-dir", type=Path, default=Path("/etc/cni/net.d"))
        s.set_defaults(func=func)
        if name == "install-cni":
            s.add_argument("--socket", default="/run/podwire/agent.sock")
            s.add_argument("--spool-dir", default="/run/podwire/spool")
            s.add_argument("--mtu", type=int, default=None)
            s.add_argument(
                "--chain", default="", help="plugins to chain after podwire, e.g. portmap,bandwidth"
            )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "run" and args.config is None and config_mod.DEFAULT_PATH.exists():
        args.config = config_mod.DEFAULT_PATH
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
