"""``podwire-agent``: run the daemon, install or remove the CNI plugin."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agent import config as config_mod
from agent.install import (
    CAPABILITY_PLUGINS,
    CNI_VERSION,
    CNI_VERSIONS,
    DEFAULT_CAPABILITIES,
    NETWORK_NAME,
)


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
    from agent.install import InstallError

    try:
        anyio.run(daemon.run, cfg, backend="asyncio")
    except InstallError as e:
        print(f"podwire-agent: invalid setting cni.{e.setting}: {e.reason}", file=sys.stderr)
        return 2
    except CheckpointCorrupt as e:
        print(f"podwire-agent: {e}", file=sys.stderr)
        return 3
    except config_mod.ConfigError as e:  # found at start (credentials a setting names)
        print(f"podwire-agent: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


def _cmd_install(args: argparse.Namespace) -> int:
    from agent.install import InstallError, install

    try:
        changed = install(
            bin_dir=args.bin_dir,
            conf_dir=args.conf_dir,
            socket=args.socket,
            spool_dir=args.spool_dir,
            mtu=args.mtu,
            chain=[c for c in args.chain.split(",") if c],
            name=args.name,
            cni_version=args.cni_version,
            capabilities=[c for c in args.capabilities.split(",") if c],
        )
    except InstallError as e:
        print(f"podwire-agent install-cni: {e}", file=sys.stderr)
        return 2
    for path in changed:
        print(f"installed {path}")
    if not changed:
        print("already installed")
    return 0


def _cmd_uninstall(args: argparse.Namespace) -> int:
    from agent.install import uninstall
    from agent.snat.service import remove_all

    removed = [
        f"removed {path}" for path in uninstall(bin_dir=args.bin_dir, conf_dir=args.conf_dir)
    ]
    # the SNAT state goes only on this explicit request, never when the agent stops
    removed += [f"removed SNAT state ({backend})" for backend in remove_all()]
    from agent.sg.service import remove_node_state

    removed += [f"removed {what}" for what in remove_node_state()]
    print("\n".join(removed) if removed else "nothing to remove")
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
            s.add_argument("--name", default=NETWORK_NAME, help="the network name")
            s.add_argument(
                "--cni-version",
                default=CNI_VERSION,
                choices=CNI_VERSIONS,
                help="the conflist's cniVersion (containerd 1.6 needs 1.0.0)",
            )
            s.add_argument(
                "--capabilities",
                default=",".join(DEFAULT_CAPABILITIES),
                help="capabilities to declare, of "
                + ", ".join(CAPABILITY_PLUGINS)
                + " (portMappings and bandwidth need portmap and bandwidth in --chain,"
                " which declare them anyway); '' for none",
            )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "run" and args.config is None and config_mod.DEFAULT_PATH.exists():
        args.config = config_mod.DEFAULT_PATH
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
