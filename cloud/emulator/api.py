"""The Python API: ``Vpc.start()`` brings up the emulator, ``vpc.add_node()`` a simulated node.

    with Vpc.start("10.0.0.0/16") as vpc:
        subnet = vpc.add_subnet("10.0.1.0/24")
        node = vpc.add_node("m5.large", subnet)
        node.start_process(["podwire-agent", "run", "--config", path])

The EC2 API listens on 127.0.0.1 (``vpc.ec2_url``, control endpoint under ``/_emulator``) and,
with the fabric, inside the router at 169.254.169.254:8773 (``node.ec2_url``), next to IMDS on
169.254.169.254:80 (``node.imds_url``): both reachable from every node namespace through its
default route. Each node also gets an IMDS port on the machine's loopback (``imds_local_url``).
One ``Vpc`` per process at a time: moto's state is global.
"""

from __future__ import annotations

import contextlib
import itertools
import subprocess
from collections.abc import Callable, Sequence
from ipaddress import IPv4Network
from types import TracebackType
from typing import Any, Literal, TypeVar

from moto.moto_server.werkzeug_app import create_backend_app

from cloud.emulator import actions, info
from cloud.emulator.control import ControlApp
from cloud.emulator.echo import EchoServer
from cloud.emulator.fabric import INTERNET_IP, METADATA_IP, Fabric
from cloud.emulator.faults import FaultPlan
from cloud.emulator.firewall import Firewall
from cloud.emulator.gce_metadata import GceMetadataApp, GceMetadataServer, MetadataRouter
from cloud.emulator.imds import ImdsApp, by_source_address, fixed_instance
from cloud.emulator.netns import Namespace
from cloud.emulator.server import Ec2Frontend, HttpServer, serve
from cloud.emulator.state import CloudState
from cloud.emulator.wiring import NodeSpec, gateway_of

T = TypeVar("T")

IMAGE_ID = "ami-12c6146b"
EC2_PORT_IN_VPC = 8773
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


class Subnet:
    """A subnet of the emulated VPC."""

    def __init__(self, subnet_id: str, cidr: IPv4Network, az: str) -> None:
        self.id = subnet_id
        self.cidr = cidr
        self.az = az
        self.gateway = gateway_of(cidr)

    def info(self) -> info.SubnetInfo:
        return info.SubnetInfo(
            id=self.id, cidr=str(self.cidr), az=self.az, gateway=str(self.gateway)
        )

    def __repr__(self) -> str:
        return f"Subnet({self.id}, {self.cidr}, {self.az})"


class Instance:
    """A simulated EC2 instance; with the fabric, a namespace whose ``eth0`` is its primary ENI.

    ``Vpc.add_instance`` makes plain ones (a database or service VM: one ENI, its groups);
    ``Node`` adds what a node running the agent needs.
    """

    def __init__(
        self, state: CloudState, instance: Any, subnet: Subnet, netns: Namespace | None
    ) -> None:
        self._state = state
        self.instance_id: str = instance.id
        self.instance_type: str = instance.instance_type
        self.subnet = subnet
        self.eni_id: str = instance.nics[0].id
        self.primary_ip: str = instance.nics[0].private_ip_address
        self.mac: str = instance.nics[0].mac_address
        self.namespace = netns
        self._processes: list[subprocess.Popen[Any]] = []
        self._servers: list[EchoServer] = []

    @property
    def security_groups(self) -> tuple[str, ...]:
        """The primary ENI's group ids, as EC2 has them now."""
        with self._state.lock:
            eni = self._state.backend.enis.get(self.eni_id)
            return tuple(g.id for g in eni.group_set) if eni is not None else ()

    @property
    def netns(self) -> str:
        """The namespace name (for ``ip netns exec``)."""
        return self._ns().name

    @property
    def netns_path(self) -> str:
        return self._ns().path

    def run(
        self, *cmd: str, check: bool = True, timeout: float = 30, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside the namespace and return the finished process."""
        return self._ns().run(*cmd, check=check, timeout=timeout, input=input)

    def start_process(
        self, argv: Sequence[str], env: dict[str, str] | None = None, **popen: Any
    ) -> subprocess.Popen[Any]:
        """Start ``argv`` inside the namespace; it is ended when the instance goes away."""
        proc = self._ns().popen(argv, env=env, **popen)
        self._processes.append(proc)
        return proc

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in a thread inside the namespace (sockets it opens stay there)."""
        return self._ns().call(fn)

    def serve(self, port: int, protocol: Literal["tcp", "udp"] = "tcp") -> EchoServer:
        """Listen on ``port`` (0: a free one) inside the namespace and echo every TCP line or
        UDP datagram back with the caller's address; stopped when the instance goes away."""
        server = EchoServer.start(self.call, port, protocol)
        self._servers.append(server)
        return server

    def instance_info(self) -> info.InstanceInfo:
        ns = self.namespace
        return info.InstanceInfo(
            instance_id=self.instance_id,
            instance_type=self.instance_type,
            subnet_id=self.subnet.id,
            eni_id=self.eni_id,
            primary_ip=self.primary_ip,
            mac=self.mac,
            security_groups=list(self.security_groups),
            netns=ns.name if ns else None,
            netns_path=ns.path if ns else None,
        )

    def _ns(self) -> Namespace:
        if self.namespace is None:
            raise RuntimeError("this Vpc runs without the fabric: instances have no namespace")
        return self.namespace

    def _stop(self) -> None:
        for server in self._servers:
            with contextlib.suppress(Exception):
                server.stop()
        for proc in self._processes:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._processes:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.namespace is not None:
            self.namespace.delete()

    def __repr__(self) -> str:
        return f"Instance({self.instance_id}, {self.instance_type}, {self.primary_ip})"


class Node(Instance):
    """A simulated node: an instance with its own IMDS port on loopback and, for the static
    provider, a pod CIDR the router routes to it."""

    def __init__(
        self,
        state: CloudState,
        instance: Any,
        subnet: Subnet,
        netns: Namespace | None,
        imds_local: HttpServer,
        pod_cidr: IPv4Network | None,
    ) -> None:
        super().__init__(state, instance, subnet, netns)
        self.pod_cidr = pod_cidr
        self._imds_local = imds_local

    @property
    def imds_url(self) -> str:
        """IMDS as seen from inside the node's namespace."""
        return f"http://{METADATA_IP}"

    @property
    def ec2_url(self) -> str:
        """The EC2 API as seen from inside the node's namespace."""
        return f"http://{METADATA_IP}:{EC2_PORT_IN_VPC}"

    @property
    def gce_metadata_url(self) -> str:
        """The GCE metadata server's base URL as seen from inside the node's namespace."""
        return f"http://{METADATA_IP}/computeMetadata/v1"

    @property
    def imds_local_url(self) -> str:
        """This node's IMDS on the machine's loopback (for tests and tools outside the node)."""
        return self._imds_local.url

    def info(self) -> info.NodeInfo:
        ns = self.namespace
        return info.NodeInfo(
            instance_id=self.instance_id,
            instance_type=self.instance_type,
            subnet_id=self.subnet.id,
            primary_ip=self.primary_ip,
            mac=self.mac,
            pod_cidr=str(self.pod_cidr) if self.pod_cidr else None,
            netns=ns.name if ns else None,
            netns_path=ns.path if ns else None,
            ec2_url=self.ec2_url if ns else None,
            imds_url=self.imds_url if ns else None,
            imds_local_url=self.imds_local_url,
        )

    def _stop(self) -> None:
        super()._stop()
        self._imds_local.stop()

    def __repr__(self) -> str:
        return f"Node({self.instance_id}, {self.instance_type}, {self.primary_ip})"


class Vpc:
    """A running emulator: EC2 API, IMDS, faults and (unless ``fabric=False``) the VPC fabric."""

    def __init__(self, state: CloudState, cidr: IPv4Network) -> None:
        self._state = state
        self.cidr = cidr
        self.region = state.region
        self.subnets: list[Subnet] = []
        self.nodes: list[Node] = []
        self.instances: list[Instance] = []
        self._servers: list[HttpServer] = []
        self._node_seq = itertools.count(1)
        self._instance_seq = itertools.count(1)
        self._stopped = False
        self.ec2_url = ""
        self.gce_metadata = GceMetadataServer(state, self._initial_aliases)
        self._gce_local: dict[str, HttpServer] = {}

    @classmethod
    def start(
        cls,
        cidr: str = "10.0.0.0/16",
        *,
        region: str = "us-east-1",
        fabric: bool = True,
        security_groups: bool = True,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> Vpc:
        """Start the emulator with one VPC of ``cidr`` and return it (use it as a context
        manager, or call ``stop()``). ``port`` 0 picks a free port (see ``ec2_url``). With the
        fabric, the router enforces security groups unless ``security_groups=False``."""
        actions.apply()
        made = Fabric.create() if fabric else None
        try:
            firewall = (
                Firewall.open(made.router.name, made.router.path)
                if made is not None and security_groups
                else None
            )
        except BaseException:
            if made is not None:
                made.close()
            raise
        state = CloudState(region, made, firewall)
        vpc = cls(state, IPv4Network(cidr))
        try:
            state.reset()
            with state.lock:
                state.vpc_id = state.backend.create_vpc(cidr).id
            moto_app = create_backend_app("ec2")
            loopback = serve(Ec2Frontend(state, moto_app, ControlApp(_Control(vpc))), host, port)
            vpc._servers.append(loopback)
            vpc.ec2_url = loopback.url
            if state.fabric is not None:
                router = state.fabric.router.path
                vpc._servers.append(
                    serve(
                        Ec2Frontend(state, moto_app, None),
                        str(METADATA_IP),
                        EC2_PORT_IN_VPC,
                        router,
                    )
                )
                metadata = MetadataRouter(
                    ImdsApp(state, by_source_address(state)),
                    GceMetadataApp(vpc.gce_metadata, by_source_address(state)),
                )
                vpc._servers.append(serve(metadata, str(METADATA_IP), 80, router))
        except BaseException:
            vpc.stop()
            raise
        return vpc

    @property
    def vpc_id(self) -> str:
        return self._state.vpc_id

    @property
    def control_url(self) -> str:
        return f"{self.ec2_url}/_emulator"

    @property
    def faults(self) -> FaultPlan:
        return self._state.faults

    @property
    def state(self) -> CloudState:
        """The shared cloud state (moto backend under ``state.lock``), for tests that look in."""
        return self._state

    @property
    def router(self) -> Namespace:
        return self._fabric().router

    @property
    def internet(self) -> Namespace:
        return self._fabric().internet

    @property
    def internet_ip(self) -> str:
        return str(INTERNET_IP.ip)

    def client_kwargs(self) -> dict[str, str]:
        """Keyword arguments for ``session.create_client("ec2", **kwargs)`` from this machine."""
        return {"region_name": self.region, "endpoint_url": self.ec2_url, **CREDENTIALS}

    def add_subnet(self, cidr: str, az: str | None = None) -> Subnet:
        """Create a subnet (default AZ: the region's first) and return it."""
        zone = az or f"{self.region}a"
        moto_subnet = self._state.call(
            lambda: self._state.backend.create_subnet(self.vpc_id, cidr, availability_zone=zone)
        )
        subnet = Subnet(moto_subnet.id, IPv4Network(cidr), zone)
        self.subnets.append(subnet)
        return subnet

    def subnet(self, subnet_id: str) -> Subnet:
        for s in self.subnets:
            if s.id == subnet_id:
                return s
        raise KeyError(subnet_id)

    def add_node(
        self,
        instance_type: str = "m5.large",
        subnet: Subnet | None = None,
        *,
        pod_cidr: str | None = None,
        security_groups: Sequence[str] = (),
    ) -> Node:
        """Launch an instance (RunInstances in moto), give it a namespace whose ``eth0`` is its
        primary ENI, and return the node. With ``pod_cidr`` (static provider) the router routes
        that CIDR to the node's primary IP. ``security_groups``: the primary ENI's group ids
        (none: the VPC's default group)."""
        subnet = subnet or self._default_subnet()
        netns = Namespace.create(f"node{next(self._node_seq)}") if self._state.fabric else None
        cidrs = (IPv4Network(pod_cidr),) if pod_cidr else ()
        try:
            instance = self._launch(instance_type, subnet, netns, cidrs, security_groups)
            imds = serve(ImdsApp(self._state, fixed_instance(instance.id)), "127.0.0.1", 0)
        except BaseException:
            if netns is not None:
                netns.delete()
            raise
        node = Node(
            self._state, instance, subnet, netns, imds, IPv4Network(pod_cidr) if pod_cidr else None
        )
        self.nodes.append(node)
        return node

    def add_instance(
        self,
        subnet: Subnet | None = None,
        *,
        security_groups: Sequence[str] = (),
        instance_type: str = "t3.micro",
    ) -> Instance:
        """Launch a plain instance (a database or service VM for tests and the demo): one ENI
        with ``security_groups`` (none: the VPC's default group) and, with the fabric, its own
        namespace where ``instance.serve(port)`` runs a TCP or UDP listener."""
        subnet = subnet or self._default_subnet()
        netns = Namespace.create(f"vm{next(self._instance_seq)}") if self._state.fabric else None
        try:
            instance = self._launch(instance_type, subnet, netns, (), security_groups)
        except BaseException:
            if netns is not None:
                netns.delete()
            raise
        made = Instance(self._state, instance, subnet, netns)
        self.instances.append(made)
        return made

    def _default_subnet(self) -> Subnet:
        if self.subnets:
            return self.subnets[0]
        return self.add_subnet(str(next(self.cidr.subnets(new_prefix=24))))

    def _launch(
        self,
        instance_type: str,
        subnet: Subnet,
        netns: Namespace | None,
        pod_cidrs: tuple[IPv4Network, ...],
        security_groups: Sequence[str],
    ) -> Any:
        def launch() -> Any:
            reservation = self._state.backend.run_instances(
                IMAGE_ID,
                1,
                None,
                [],
                instance_type=instance_type,
                is_instance_type_default=False,
                subnet_id=subnet.id,
                region_name=self.region,
                placement=None,
                security_group_ids=list(security_groups),
            )
            instance = reservation.instances[0]
            if netns is not None:
                self._state.nodes[instance.id] = NodeSpec(
                    instance_id=instance.id, netns=netns.name, pod_cidrs=pod_cidrs
                )
            return instance

        return self._state.call(launch)

    def node(self, instance_id: str) -> Node:
        for n in self.nodes:
            if n.instance_id == instance_id:
                return n
        raise KeyError(instance_id)

    def remove_node(self, node: Node) -> None:
        """Terminate the node's instance (its ENIs detach), stop its processes, delete its
        namespace."""
        self.nodes.remove(node)
        self._terminate(node)

    def instance(self, instance_id: str) -> Instance:
        for i in self.instances:
            if i.instance_id == instance_id:
                return i
        raise KeyError(instance_id)

    def remove_instance(self, instance: Instance) -> None:
        """Terminate a plain instance, stop its listeners and processes, delete its namespace."""
        self.instances.remove(instance)
        self._terminate(instance)

    def _terminate(self, instance: Instance) -> None:
        def terminate() -> None:
            self._state.nodes.pop(instance.instance_id, None)
            self._state.backend.terminate_instances([instance.instance_id])

        self._state.call(terminate)
        instance._stop()

    def set_alias_ranges(self, node: Node, cidrs: Sequence[str | IPv4Network]) -> None:
        """Replace the node's alias IP ranges (GCE metadata ``ip-aliases``); the router routes
        them to its primary ENI, as GCE does natively, before this returns."""
        nets = [IPv4Network(c) for c in cidrs]
        self.gce_metadata.set_alias_ranges(node.instance_id, nets)
        node.pod_cidr = nets[0] if nets else None

    def gce_metadata_local_url(self, node: Node) -> str:
        """This node's GCE metadata server on the machine's loopback (started on first use),
        base URL included (``.../computeMetadata/v1``)."""
        server = self._gce_local.get(node.instance_id)
        if server is None:
            app = GceMetadataApp(self.gce_metadata, fixed_instance(node.instance_id))
            server = self._gce_local[node.instance_id] = serve(app, "127.0.0.1", 0)
            self._servers.append(server)
        return f"{server.url}/computeMetadata/v1"

    def _initial_aliases(self, instance_id: str) -> list[str]:
        node = next((n for n in self.nodes if n.instance_id == instance_id), None)
        return [str(node.pod_cidr)] if node is not None and node.pod_cidr else []

    def drops(self, eni_id: str | None = None) -> info.Drops:
        """Packets the router has dropped so far for ``eni_id`` (denied by its inbound or
        outbound rules; for a trunk, refused frames on its cable); all zero for an ENI that is
        not on the wire. Raises RuntimeError when security groups are not enforced."""
        return self.all_drops().get(eni_id or "", info.Drops())

    def all_drops(self) -> dict[str, info.Drops]:
        """``drops`` of every ENI on the wire, by ENI id."""
        firewall = self._state.firewall
        if firewall is None:
            raise RuntimeError("this Vpc does not enforce security groups")
        with self._state.lock:
            return firewall.drops()

    def describe(self) -> info.VpcInfo:
        fabric = self._state.fabric
        return info.VpcInfo(
            vpc_id=self.vpc_id,
            cidr=str(self.cidr),
            region=self.region,
            ec2_url=self.ec2_url,
            control_url=self.control_url,
            router_netns=fabric.router.name if fabric else None,
            internet_netns=fabric.internet.name if fabric else None,
            internet_ip=self.internet_ip if fabric else None,
            subnets=[s.info() for s in self.subnets],
            nodes=[n.info() for n in self.nodes],
            instances=[i.instance_info() for i in self.instances],
        )

    def stop(self) -> None:
        """Stop the servers and processes and remove every namespace (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        self._state.close()
        self.gce_metadata.close()
        for machine in [*self.nodes, *self.instances]:
            with contextlib.suppress(Exception):
                machine._stop()
        for server in self._servers:
            with contextlib.suppress(Exception):
                server.stop()
        if self._state.fabric is not None:
            self._state.fabric.close()

    def _fabric(self) -> Fabric:
        if self._state.fabric is None:
            raise RuntimeError("this Vpc runs without the fabric")
        return self._state.fabric

    def __enter__(self) -> Vpc:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (
            f"Vpc({self.vpc_id}, {self.cidr}, subnets={len(self.subnets)}, "
            f"nodes={len(self.nodes)}, instances={len(self.instances)})"
        )


class _Control:
    """What the control endpoint may do to a ``Vpc`` (``control.VpcControl``), in its terms."""

    def __init__(self, vpc: Vpc) -> None:
        self._vpc = vpc

    @property
    def faults(self) -> FaultPlan:
        return self._vpc.faults

    def describe(self) -> info.VpcInfo:
        return self._vpc.describe()

    def add_subnet(self, req: info.AddSubnet) -> info.SubnetInfo:
        return self._vpc.add_subnet(req.cidr, req.az).info()

    def add_node(self, req: info.AddNode) -> info.NodeInfo:
        vpc = self._vpc
        subnet = vpc.subnet(req.subnet_id) if req.subnet_id else None
        node = vpc.add_node(
            req.instance_type, subnet, pod_cidr=req.pod_cidr, security_groups=req.security_groups
        )
        return node.info()

    def remove_node(self, instance_id: str) -> None:
        self._vpc.remove_node(self._vpc.node(instance_id))

    def add_instance(self, req: info.AddInstance) -> info.InstanceInfo:
        vpc = self._vpc
        subnet = vpc.subnet(req.subnet_id) if req.subnet_id else None
        made = vpc.add_instance(
            subnet, security_groups=req.security_groups, instance_type=req.instance_type
        )
        return made.instance_info()

    def remove_instance(self, instance_id: str) -> None:
        self._vpc.remove_instance(self._vpc.instance(instance_id))

    def serve(self, instance_id: str, req: info.Serve) -> None:
        self._vpc.instance(instance_id).serve(req.port, req.protocol)

    def set_alias_ranges(self, instance_id: str, req: info.SetAliasRanges) -> info.AliasRanges:
        nets = [IPv4Network(c) for c in req.cidrs]
        self._vpc.set_alias_ranges(self._vpc.node(instance_id), nets)
        return info.AliasRanges(instance_id=instance_id, alias_ranges=[str(n) for n in nets])

    def set_gce_metadata_down(self, req: info.GceMetadataFault) -> None:
        self._vpc.gce_metadata.set_down(req.down)

    def drops(self) -> dict[str, info.Drops]:
        return self._vpc.all_drops()
