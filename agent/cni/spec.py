"""The CNI specification as pure functions: request validation, error codes, result rendering.

Validation follows libcni/skel so that a runtime sees the codes it expects (REFERENCE.md, "CNI
specification"); rendering produces the ADD result in the version the network config asks
for (0.4.0, 1.0.0 or 1.1.0). Nothing here does I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from ipaddress import IPv4Address, ip_interface
from typing import Any, Final

import attrs

SUPPORTED_VERSIONS: Final = ("0.4.0", "1.0.0", "1.1.0")
COMMANDS: Final = frozenset({"ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION"})

# Error codes of the spec (and libcni's 999); 100+ are ours.
INCOMPATIBLE_VERSION: Final = 1
UNSUPPORTED_FIELD: Final = 2
UNKNOWN_CONTAINER: Final = 3
INVALID_ENV: Final = 4
IO_FAILURE: Final = 5
DECODE_FAILURE: Final = 6
INVALID_CONFIG: Final = 7
TRY_AGAIN_LATER: Final = 11
STATUS_UNAVAILABLE: Final = 50
STATUS_IMPAIRED: Final = 51
CHECK_FAILED: Final = 110
INTERNAL: Final = 999

GATEWAY: Final = IPv4Address("169.254.1.1")
# The runtime capability that hands a plugin the pod's annotations (containerd, CRI-O).
POD_ANNOTATIONS_CAPABILITY: Final = "io.kubernetes.cri.pod-annotations"

_ID_RE: Final = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$")


class CniError(Exception):
    """A failure to report to the runtime as CNI error JSON."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(f"{msg} (code {code})" + (f": {details}" if details else ""))
        self.code = code
        self.msg = msg
        self.details = details


@attrs.frozen(kw_only=True)
class NetConf:
    """The parts of the network configuration podwire reads."""

    cni_version: str
    name: str
    mtu: int | None = None
    prev_result: Mapping[str, Any] | None = None
    dns: Mapping[str, Any] | None = None
    valid_attachments: tuple[tuple[str, str], ...] | None = None


@attrs.frozen(kw_only=True)
class PodKey:
    """What identifies one attachment: (network name, container ID, interface name)."""

    network: str
    container_id: str
    ifname: str

    def __str__(self) -> str:
        return f"{self.network}/{self.container_id}/{self.ifname}"


@attrs.frozen(kw_only=True)
class CniRequest:
    """A validated CNI invocation."""

    command: str
    container_id: str
    netns: str
    ifname: str
    args: Mapping[str, str]
    path: str
    conf: NetConf
    requested_ip: IPv4Address | None = None  # ADD: the address the runtime asks for
    # The pod's annotations as the runtime passed them (runtimeConfig
    # ``io.kubernetes.cri.pod-annotations``); empty when it passed none.
    annotations: Mapping[str, str] = attrs.field(factory=dict)

    @property
    def key(self) -> PodKey:
        return PodKey(network=self.conf.name, container_id=self.container_id, ifname=self.ifname)

    @property
    def pod_namespace(self) -> str:
        return self.args.get("K8S_POD_NAMESPACE", "")

    @property
    def pod_name(self) -> str:
        return self.args.get("K8S_POD_NAME", "")


def version_tuple(version: str) -> tuple[int, ...]:
    """Return ``"1.0.0"`` as ``(1, 0, 0)``; raises ValueError on anything else."""
    parts = version.split(".")
    if len(parts) != 3:
        raise ValueError(version)
    return tuple(int(p) for p in parts)


def check_ifname(ifname: str) -> None:
    """Raise CniError(4) unless ``ifname`` is a valid Linux interface name."""
    if not ifname:
        raise CniError(INVALID_ENV, "required env variables [CNI_IFNAME] missing")
    if len(ifname.encode()) > 15:
        raise CniError(INVALID_ENV, f"interface name is too long: {ifname!r}", "at most 15 bytes")
    if ifname in (".", "..") or any(c in ifname for c in "/:") or any(c.isspace() for c in ifname):
        raise CniError(INVALID_ENV, f"invalid interface name: {ifname!r}")


def parse_cni_args(raw: str) -> dict[str, str]:
    """Parse CNI_ARGS (``K=V;K2=V2``); raises CniError(4) on a pair without ``=``."""
    out: dict[str, str] = {}
    for pair in raw.split(";"):
        if not pair:
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CniError(INVALID_ENV, "invalid CNI_ARGS pair", repr(pair))
        out[key] = value
    return out


def parse_netconf(config: Mapping[str, Any], command: str) -> NetConf:
    """Read and check the network configuration; raises CniError with the spec's code."""
    version = config.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise CniError(INCOMPATIBLE_VERSION, "missing cniVersion in network configuration")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(
            INCOMPATIBLE_VERSION,
            f"incompatible CNI versions: config is {version!r}",
            f"plugin supports {', '.join(SUPPORTED_VERSIONS)}",
        )
    if command in ("GC", "STATUS") and version_tuple(version) < (1, 1, 0):
        raise CniError(
            INCOMPATIBLE_VERSION,
            f"config version does not allow {command}",
            f"{command} needs cniVersion 1.1.0 or later, config is {version}",
        )
    name = config.get("name")
    if name is None or name == "":
        raise CniError(INVALID_CONFIG, "missing network name", 'the configuration has no "name"')
    if not isinstance(name, str) or not _ID_RE.match(name):
        raise CniError(INVALID_CONFIG, "invalid network name", repr(name))
    mtu = config.get("mtu")
    if mtu is not None and (
        isinstance(mtu, bool) or not isinstance(mtu, int) or not 68 <= mtu <= 65535
    ):
        raise CniError(INVALID_CONFIG, "invalid mtu", f"{mtu!r}: expected an integer 68..65535")
    prev = config.get("prevResult")
    if prev is not None and not isinstance(prev, Mapping):
        raise CniError(DECODE_FAILURE, "invalid prevResult", "expected an object")
    if prev is not None and command in ("ADD", "CHECK"):
        check_result(prev, "$.prevResult")
    dns = config.get("dns")
    if dns is not None and not isinstance(dns, Mapping):
        raise CniError(INVALID_CONFIG, "invalid dns", "expected an object")
    return NetConf(
        cni_version=version,
        name=name,
        mtu=mtu,
        prev_result=prev,
        dns=dns,
        valid_attachments=_valid_attachments(config) if command == "GC" else None,
    )


# The result fields a plugin reads, with the JSON type each member must have.
_RESULT_LISTS: Final[dict[str, dict[str, type]]] = {
    "interfaces": {"name": str, "mac": str, "sandbox": str, "mtu": int},
    "ips": {"address": str, "gateway": str, "interface": int, "version": str},
    "routes": {"dst": str, "gw": str},
}
_JSON_TYPE: Final[dict[type, str]] = {
    str: "a string",
    int: "an integer",
    list: "a list",
    dict: "an object",
}


def check_result(doc: Mapping[str, Any], where: str) -> None:
    """Raise CniError(6) naming the path of the first field of a CNI result (``doc``, found at
    ``where``) whose type is wrong; unknown fields are left alone."""

    def bad(path: str, want: type) -> CniError:
        return CniError(
            DECODE_FAILURE, "invalid prevResult", f"expected {_JSON_TYPE[want]} @ {path}"
        )

    if "cniVersion" in doc and not isinstance(doc["cniVersion"], str):
        raise bad(f"{where}.cniVersion", str)
    if "dns" in doc and not isinstance(doc["dns"], Mapping):
        raise bad(f"{where}.dns", dict)
    for key, fields in _RESULT_LISTS.items():
        items = doc.get(key)
        if items is None:
            continue
        if not isinstance(items, list):
            raise bad(f"{where}.{key}", list)
        for i, item in enumerate(items):
            if not isinstance(item, Mapping):
                raise bad(f"{where}.{key}[{i}]", dict)
            for field, want in fields.items():
                value = item.get(field)
                if value is None:
                    continue
                if not isinstance(value, want) or isinstance(value, bool):
                    raise bad(f"{where}.{key}[{i}].{field}", want)


def _valid_attachments(config: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    raw = config.get("cni.dev/valid-attachments", config.get("cni.dev/attachments"))
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise CniError(DECODE_FAILURE, "invalid cni.dev/valid-attachments", "expected a list")
    out = []
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping):
            raise CniError(DECODE_FAILURE, "invalid cni.dev/valid-attachments", f"item {i}")
        cid, ifname = item.get("containerID"), item.get("ifname")
        if not isinstance(cid, str) or not isinstance(ifname, str):
            raise CniError(
                DECODE_FAILURE,
                "invalid cni.dev/valid-attachments",
                f"item {i}: need containerID and ifname",
            )
        out.append((cid, ifname))
    return tuple(out)


def validate(env: Mapping[str, str], config: Mapping[str, Any]) -> CniRequest:
    """Validate one invocation like libcni/skel; return the request or raise CniError.

    ``env`` holds the CNI_* variables as given (empty means absent).
    """
    command = env.get("CNI_COMMAND", "")
    if not command:
        raise CniError(INVALID_ENV, "required env variables [CNI_COMMAND] missing")
    if command not in COMMANDS:
        raise CniError(INVALID_ENV, f"unknown CNI_COMMAND: {command}")
    conf = parse_netconf(config, command)
    container_id = env.get("CNI_CONTAINERID", "")
    netns = env.get("CNI_NETNS", "")
    ifname = env.get("CNI_IFNAME", "")
    path = env.get("CNI_PATH", "")
    if command in ("ADD", "CHECK", "DEL"):
        if not container_id:
            raise CniError(UNKNOWN_CONTAINER, "missing containerID")
        if not _ID_RE.match(container_id):
            raise CniError(INVALID_ENV, "invalid characters in containerID", container_id)
        if command != "DEL" and not netns:
            raise CniError(INVALID_ENV, "required env variables [CNI_NETNS] missing")
        if netns and not netns.startswith("/"):
            raise CniError(INVALID_ENV, "CNI_NETNS must be an absolute path", netns)
        check_ifname(ifname)
    elif command == "GC" and not path:
        raise CniError(INVALID_ENV, "required env variables [CNI_PATH] missing")
    args = parse_cni_args(env.get("CNI_ARGS", ""))
    return CniRequest(
        command=command,
        container_id=container_id,
        netns=netns,
        ifname=ifname,
        args=args,
        path=path,
        conf=conf,
        requested_ip=requested_address(args, config) if command == "ADD" else None,
        annotations=pod_annotations(config, strict=command in ("ADD", "CHECK")),
    )


def pod_annotations(config: Mapping[str, Any], *, strict: bool = True) -> dict[str, str]:
    """Return the pod annotations of ``runtimeConfig`` (empty when absent).

    A malformed value raises CniError(6) when ``strict`` (ADD, CHECK: what the pod asks for must
    be read right); otherwise it is ignored (DEL must never fail over it).
    """
    runtime = config.get("runtimeConfig")
    if runtime is None:
        return {}
    raw = runtime.get(POD_ANNOTATIONS_CAPABILITY) if isinstance(runtime, Mapping) else runtime
    if raw is None:
        return {}
    if isinstance(raw, Mapping) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
    ):
        return dict(raw)
    if not strict:
        return {}
    raise CniError(
        DECODE_FAILURE,
        "invalid runtimeConfig",
        f"{POD_ANNOTATIONS_CAPABILITY} must be an object of string values",
    )


def requested_address(args: Mapping[str, str], config: Mapping[str, Any]) -> IPv4Address | None:
    """Return the address the runtime asks for, or None when it asks for none.

    Three places may ask, all honoured: ``runtimeConfig.ips`` (the ``ips`` capability),
    ``args.cni.ips`` (the args convention) and CNI_ARGS ``IP=`` (host-local's convention, which
    podman's ``--ip`` uses). Entries may carry a prefix length (``10.1.2.3/24``); the pod gets
    the address as a /32 whatever it is. Raises CniError: 4 (CNI_ARGS) or 7 for something that
    is not an address, 2 for an IPv6 address or a second address (a pod gets one IPv4
    address), 7 when two places ask for different addresses.
    """
    asked: dict[str, list[str]] = {}
    runtime = config.get("runtimeConfig")
    if isinstance(runtime, Mapping) and runtime.get("ips") is not None:
        asked["runtimeConfig.ips"] = _address_list(runtime["ips"], "runtimeConfig.ips")
    conf_args = config.get("args")
    cni_args = conf_args.get("cni") if isinstance(conf_args, Mapping) else None
    if isinstance(cni_args, Mapping) and cni_args.get("ips") is not None:
        asked["args.cni.ips"] = _address_list(cni_args["ips"], "args.cni.ips")
    if args.get("IP"):
        asked["CNI_ARGS IP"] = [v for v in args["IP"].split(",") if v.strip()]
    found: dict[str, IPv4Address] = {}
    for where, entries in asked.items():
        code = INVALID_ENV if where == "CNI_ARGS IP" else INVALID_CONFIG
        addresses: list[IPv4Address] = []
        for entry in entries:
            try:
                ip = ip_interface(entry.strip()).ip
            except ValueError:
                raise CniError(code, f"invalid address in {where}", repr(entry)) from None
            if not isinstance(ip, IPv4Address):
                raise CniError(
                    UNSUPPORTED_FIELD, f"unsupported address in {where}", f"{entry}: IPv4 only"
                )
            addresses.append(ip)
        distinct = list(dict.fromkeys(addresses))
        if len(distinct) > 1:
            raise CniError(
                UNSUPPORTED_FIELD,
                f"more than one address in {where}",
                f"{', '.join(map(str, distinct))}: a pod gets one IPv4 address",
            )
        if distinct:
            found[where] = distinct[0]
    if len(set(found.values())) > 1:
        detail = "; ".join(f"{where} {ip}" for where, ip in found.items())
        raise CniError(INVALID_CONFIG, "conflicting requested addresses", detail)
    return next(iter(found.values()), None)


def _address_list(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CniError(INVALID_CONFIG, f"invalid {where}", "expected a list of addresses")
    return list(value)


@attrs.frozen(kw_only=True)
class AddOutcome:
    """What ADD made, in the terms a result needs."""

    ifname: str
    netns: str
    pod_mac: str
    host_veth: str
    host_mac: str
    ip: IPv4Address
    mtu: int


def render_add_result(
    version: str, out: AddOutcome, dns: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Return the ADD result document in ``version`` (one of SUPPORTED_VERSIONS).

    The host veth is listed first and without a sandbox: chained plugins such as bandwidth look
    for it there.
    """
    host: dict[str, Any] = {"name": out.host_veth, "mac": out.host_mac}
    pod: dict[str, Any] = {"name": out.ifname, "mac": out.pod_mac, "sandbox": out.netns}
    ip: dict[str, Any] = {"address": f"{out.ip}/32", "gateway": str(GATEWAY), "interface": 1}
    if version == "0.4.0":
        ip = {"version": "4", **ip}
    if version == "1.1.0":
        host["mtu"] = out.mtu
        pod["mtu"] = out.mtu
    return {
        "cniVersion": version,
        "interfaces": [host, pod],
        "ips": [ip],
        "routes": [{"dst": "0.0.0.0/0", "gw": str(GATEWAY)}],
        "dns": dict(dns) if dns else {},
    }


def render_error(version: str, err: CniError) -> dict[str, Any]:
    """Return the CNI error document for ``err``."""
    doc: dict[str, Any] = {"cniVersion": version, "code": err.code, "msg": err.msg}
    if err.details:
        doc["details"] = err.details
    return doc


def prev_result_ip(prev: Mapping[str, Any] | None) -> IPv4Address | None:
    """Return the first IPv4 address of a prevResult, or None when it has none."""
    if not prev:
        return None
    for entry in prev.get("ips") or ():
        if isinstance(entry, Mapping):
            addr = str(entry.get("address", "")).split("/")[0]
            try:
                return IPv4Address(addr)
            except ValueError:
                continue
    return None
