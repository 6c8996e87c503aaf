"""Warm-pool math for ENI secondary IPs and /28 prefixes: pure integer decisions, no I/O.

Theory of operation
-------------------
The node holds a pool of addresses on its ENIs. An address is *assigned* (a pod has it),
*cooling* (a pod released it less than IP_COOLDOWN_PERIOD ago, so it may not be handed out
again yet) or *available*. Cooling addresses count as neither available nor releasable: the
pool grows to cover them and never gives them back while they cool. ENIs tagged no-manage are
outside the pool (their addresses are not ours) but still occupy an ENI slot on the instance.
The primary ENI is always managed and never freed.

One policy governs the pool, chosen from the targets as Amazon VPC CNI's ipamd does:

* ``WARM_IP`` -- WARM_IP_TARGET or MINIMUM_IP_TARGET set (either overrides WARM_ENI_TARGET and
  WARM_PREFIX_TARGET). Short by ``max(warm_ip - available, minimum_ip - total, 0)`` addresses,
  rounded up to whole /28s in prefix mode. Surplus: the whole units that can go while
  ``available >= warm_ip`` and ``total >= minimum_ip`` still hold.
* ``WARM_PREFIX`` -- prefix delegation without IP targets. Short while ``available < 16 *
  warm_prefix``; it then adds ``max(1, warm_prefix - free_prefixes)`` prefixes. Surplus: free
  prefixes (no assigned, no cooling address) beyond ``warm_prefix``.
* ``WARM_ENI`` -- the default. Short while ``available < warm_eni * (ipv4_per_eni - 1)`` (or, with
  warm_eni 0, while nothing is available); growth fills whole ENIs. It never releases single
  addresses: only whole ENIs go.

``plan`` turns one snapshot into one decision. If the pool is short it only grows: it first
assigns addresses (or prefixes) on existing ENIs with room, lowest device index first (one
AssignPrivateIpAddresses call with a count per ENI), and asks for new ENIs only for what the
existing ones cannot hold, each created with its addresses in the same call, up to
``min(instance ENI limit, MAX_ENI)`` ENIs and never past ``pod_limit`` (max pods, rounded up to
a whole unit). Otherwise it may shrink: it frees at most one ENI -- not primary, not no-manage, no
assigned and no cooling address, at least ``min_eni_age`` old -- when the pool without it is
still not short, then releases the surplus of what remains (never assigned or cooling
addresses), highest device index first so secondary ENIs drain and become freeable. Releases
happen at most once per ``release_interval``; ENI frees are gated by age only.

Every shrink is checked with the same shortfall function that triggers growth, so a shrink
never leaves a pool that the next decision wants to grow again (no flapping), and a pool
exactly at target plans nothing.

Sets of security groups (eni mode)
----------------------------------
With security groups for pods in eni mode, pods asking for the same set of groups share
secondary ENIs created with exactly that set; each set is a pool of its own, planned by the
same ``plan`` under the WARM_IP policy: a set in use keeps ``warm_ips`` free addresses plus one
for every ADD waiting for it (so the next pod of the set starts with no EC2 call); a set no
longer in use has targets of 0, so its ENIs are freed once they hold no cooling address and are
``min_eni_age`` old (their addresses go with them, never released one by one first).
``plan_node`` plans the shared pool and every set together over the instance's ENI slots: the
shared pool first (the set ENIs take slots it cannot use), then the sets, which may take a free
slot only while the shared pool keeps its primary ENI plus ``reserve_enis`` slots (used or
not), so ordinary pods never starve.
A set whose ADDs wait while it can get no address is *refused*, with the limit in words.
"""

from __future__ import annotations

import enum
import re
import sys
from collections.abc import Iterable, Mapping, Sequence

import attrs

IPS_PER_PREFIX = 16
"""Addresses in one delegated /28 prefix."""

DEFAULT_MIN_ENI_AGE = 60.0
"""Seconds an ENI must have existed before it may be freed (ipamd's minENILifeTime)."""

DEFAULT_RELEASE_INTERVAL = 30.0
"""Seconds between two decisions that release addresses (ipamd's decreaseIPPoolInterval)."""

MAX_PODS_CEILING_SMALL = 110
MAX_PODS_CEILING_LARGE = 250
_LARGE_INSTANCE_MIN_VCPUS = 31  # max-pods-calculator.sh: "CPU_COUNT -gt 30" -> 250

_ENV_WARM_ENI = "WARM_ENI_TARGET"
_ENV_WARM_IP = "WARM_IP_TARGET"
_ENV_MINIMUM_IP = "MINIMUM_IP_TARGET"
_ENV_WARM_PREFIX = "WARM_PREFIX_TARGET"
_ENV_MAX_ENI = "MAX_ENI"
_ENV_PREFIX_DELEGATION = "ENABLE_PREFIX_DELEGATION"

_INTEGER = re.compile(r"[+-]?[0-9]+")
# The spellings Go's strconv.ParseBool accepts, as VPC CNI reads its boolean settings.
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


class PoolMathError(Exception):
    """Base of this module's errors."""


class PoolConfigError(PoolMathError):
    """A pool setting is malformed or out of range: the operator's configuration is wrong."""

    def __init__(self, setting: str, value: object, problem: str) -> None:
        super().__init__(setting, value, problem)
        self.setting = setting
        self.value = value
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.setting}={self.value!r}: {self.problem}"


class PoolStateError(PoolMathError):
    """A pool snapshot is inconsistent: the caller built it wrong."""

    def __init__(self, eni_id: str | None, problem: str) -> None:
        super().__init__(eni_id, problem)
        self.eni_id = eni_id
        self.problem = problem

    def __str__(self) -> str:
        return self.problem if self.eni_id is None else f"{self.eni_id}: {self.problem}"


class Policy(enum.Enum):
    """Which target governs the pool; see the module's theory of operation."""

    WARM_ENI = "warm-eni"
    WARM_IP = "warm-ip"
    WARM_PREFIX = "warm-prefix"


@attrs.frozen(kw_only=True)
class PoolTargets:
    """The pool knobs, as Amazon VPC CNI names them (0 means unset for the IP targets).

    Raises PoolConfigError, naming the environment variable, when a value is out of range.
    """

    warm_eni: int = 1
    warm_ip: int = 0
    minimum_ip: int = 0
    warm_prefix: int = 1
    max_eni: int | None = None
    prefix_mode: bool = False
    # The WARM_IP policy even with both IP targets at 0 (a set of eni mode: 0 drains it).
    warm_ip_policy: bool = False

    def __attrs_post_init__(self) -> None:
        for setting, value in (
            (_ENV_WARM_ENI, self.warm_eni),
            (_ENV_WARM_IP, self.warm_ip),
            (_ENV_MINIMUM_IP, self.minimum_ip),
            (_ENV_WARM_PREFIX, self.warm_prefix),
        ):
            if value < 0:
                raise PoolConfigError(setting, value, "must be >= 0")
        if self.max_eni is not None and self.max_eni < 1:
            raise PoolConfigError(_ENV_MAX_ENI, self.max_eni, "must be >= 1 (unset means no cap)")
        if self.policy is Policy.WARM_PREFIX and self.warm_prefix == 0:
            # Documented as unsupported upstream; in ipamd it also makes the pool release its
            # last free prefix and fetch it again on the next tick.
            raise PoolConfigError(
                _ENV_WARM_PREFIX,
                self.warm_prefix,
                "must be >= 1 with prefix delegation unless an IP target is set",
            )

    @property
    def policy(self) -> Policy:
        """The target that governs the pool."""
        if self.warm_ip_policy or self.warm_ip > 0 or self.minimum_ip > 0:
            return Policy.WARM_IP
        if self.prefix_mode:
            return Policy.WARM_PREFIX
        return Policy.WARM_ENI

    @property
    def unit_size(self) -> int:
        """Addresses one allocation unit brings: a secondary IP, or a /28 prefix."""
        return IPS_PER_PREFIX if self.prefix_mode else 1

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> PoolTargets:
        """Build targets from VPC CNI environment values; empty values count as unset.

        Raises PoolConfigError naming the bad variable. Unlike ipamd, which silently falls back
        to defaults, a malformed value is an error. MINIMUM_IP_TARGET without WARM_IP_TARGET is
        rejected (upstream issue 2650: the pool then never grows past the minimum); set
        WARM_IP_TARGET=0 to ask for exactly that.
        """
        warm_ip_set = bool(env.get(_ENV_WARM_IP, ""))
        minimum_ip = _env_int(env, _ENV_MINIMUM_IP, 0)
        if minimum_ip > 0 and not warm_ip_set:
            raise PoolConfigError(
                _ENV_WARM_IP,
                None,
                "must be set when MINIMUM_IP_TARGET is set (0 caps the pool at the minimum)",
            )
        max_eni_text = env.get(_ENV_MAX_ENI, "")
        return cls(
            warm_eni=_env_int(env, _ENV_WARM_ENI, 1),
            warm_ip=_env_int(env, _ENV_WARM_IP, 0),
            minimum_ip=minimum_ip,
            # The code default upstream is 0, which it documents as unsupported; its shipped
            # manifest sets 1.
            warm_prefix=_env_int(env, _ENV_WARM_PREFIX, 1),
            max_eni=_env_int(env, _ENV_MAX_ENI, 0) if max_eni_text else None,
            prefix_mode=_env_bool(env, _ENV_PREFIX_DELEGATION, False),
        )


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name, "")
    if not text:
        return default
    if not _INTEGER.fullmatch(text):
        raise PoolConfigError(name, text, "not an integer")
    return int(text)


def _env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    text = env.get(name, "")
    if not text:
        return default
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise PoolConfigError(name, text, "not a boolean (true/false)")


@attrs.frozen(kw_only=True)
class InstanceLimits:
    """The instance type's networking limits (DescribeInstanceTypes NetworkInfo)."""

    max_enis: int
    ipv4_per_eni: int

    def __attrs_post_init__(self) -> None:
        if self.max_enis < 1:
            raise PoolConfigError("max_enis", self.max_enis, "must be >= 1")
        if self.ipv4_per_eni < 2:
            raise PoolConfigError("ipv4_per_eni", self.ipv4_per_eni, "must be >= 2")

    @property
    def slots_per_eni(self) -> int:
        """Secondary IPs, or /28 prefixes, one ENI can hold: its own primary IP takes a slot."""
        return self.ipv4_per_eni - 1


@attrs.frozen(kw_only=True)
class EniState:
    """One attached ENI as the pool sees it.

    ``total_ips`` counts the addresses pods may use: secondary IPs, or in prefix mode every
    address of its prefixes (16 each); never the ENI's own primary IP. ``free_prefixes`` counts
    prefixes with no assigned and no cooling address. ``created_at`` is on the caller's clock,
    the one ``plan``'s ``now`` comes from.

    Raises PoolStateError when the counts contradict each other.
    """

    eni_id: str
    device_index: int
    primary: bool = False
    total_ips: int = 0
    assigned_ips: int = 0
    cooling_ips: int = 0
    prefixes: int = 0
    free_prefixes: int = 0
    created_at: float = 0.0
    no_manage: bool = False

    def __attrs_post_init__(self) -> None:
        counts = (
            self.device_index,
            self.total_ips,
            self.assigned_ips,
            self.cooling_ips,
            self.prefixes,
            self.free_prefixes,
        )
        if min(counts) < 0:
            raise PoolStateError(self.eni_id, "negative count")
        if self.assigned_ips + self.cooling_ips > self.total_ips:
            raise PoolStateError(self.eni_id, "more assigned and cooling addresses than held")
        if self.free_prefixes > self.prefixes:
            raise PoolStateError(self.eni_id, "more free prefixes than prefixes")
        if self.free_prefixes * IPS_PER_PREFIX > self.free_ips:
            raise PoolStateError(self.eni_id, "free prefixes hold more than the free addresses")
        if self.prefixes - self.free_prefixes > self.assigned_ips + self.cooling_ips:
            raise PoolStateError(self.eni_id, "a busy prefix needs an assigned or cooling address")

    @property
    def free_ips(self) -> int:
        """Addresses neither assigned nor cooling: available to pods, and releasable."""
        return self.total_ips - self.assigned_ips - self.cooling_ips

    @property
    def managed(self) -> bool:
        """Whether the pool may use and change this ENI (the primary ENI always is)."""
        return self.primary or not self.no_manage


@attrs.frozen(kw_only=True)
class PoolStats:
    """Totals over the managed ENIs, in addresses."""

    enis: int = 0
    total: int = 0
    assigned: int = 0
    cooling: int = 0
    free_prefixes: int = 0

    @property
    def available(self) -> int:
        """Addresses a pod could get now: neither assigned nor cooling."""
        return self.total - self.assigned - self.cooling


def pool_stats(enis: Iterable[EniState]) -> PoolStats:
    """Return the totals over the managed ENIs of ``enis``."""
    managed = [e for e in enis if e.managed]
    return PoolStats(
        enis=len(managed),
        total=sum(e.total_ips for e in managed),
        assigned=sum(e.assigned_ips for e in managed),
        cooling=sum(e.cooling_ips for e in managed),
        free_prefixes=sum(e.free_prefixes for e in managed),
    )


def shortfall(
    stats: PoolStats,
    targets: PoolTargets,
    limits: InstanceLimits,
    *,
    pod_limit: int | None = None,
) -> int:
    """Return how many units (IPs, or prefixes in prefix mode) the pool is short; 0 if none.

    A pool that already holds ``pod_limit`` addresses (the node's max pods) is never short.
    Instance limits do not lower the answer: they only bound what ``plan`` can do about it.
    """
    if pod_limit is not None and stats.total >= pod_limit:
        return 0
    available = stats.available
    policy = targets.policy
    if policy is Policy.WARM_IP:
        short = max(targets.warm_ip - available, targets.minimum_ip - stats.total, 0)
        return _div_ceil(short, targets.unit_size)
    if policy is Policy.WARM_PREFIX:
        if available >= IPS_PER_PREFIX * targets.warm_prefix:
            return 0
        return max(1, targets.warm_prefix - stats.free_prefixes)
    if targets.warm_eni == 0:
        return 1 if available == 0 else 0
    return max(targets.warm_eni * limits.slots_per_eni - available, 0)


def surplus(stats: PoolStats, targets: PoolTargets) -> int:
    """Return how many free units could be released with the pool still not short.

    Only the WARM_IP and WARM_PREFIX policies ever release; WARM_ENI returns 0.
    """
    policy = targets.policy
    if policy is Policy.WARM_IP:
        unit = targets.unit_size
        free_units = stats.free_prefixes if targets.prefix_mode else stats.available
        over = min(
            free_units,
            (stats.available - targets.warm_ip) // unit,
            (stats.total - targets.minimum_ip) // unit,
        )
        return max(over, 0)
    if policy is Policy.WARM_PREFIX:
        return max(stats.free_prefixes - targets.warm_prefix, 0)
    return 0


def max_pods(
    limits: InstanceLimits, *, prefix_mode: bool = False, max_eni: int | None = None
) -> int:
    """Return the pods the instance can address, as VPC CNI's max-pods calculator does.

    ENIs x (IPv4 per ENI - 1) + 2, or with prefixes ENIs x ((IPv4 per ENI - 1) x 16) + 2; the
    + 2 covers host-network pods (aws-node, kube-proxy), which use no pool address. MAX_ENI
    lowers the ENI count. Uncapped: see ``max_pods_ceiling``.
    """
    enis = limits.max_enis if max_eni is None else min(limits.max_enis, max_eni)
    per_eni = limits.slots_per_eni * (IPS_PER_PREFIX if prefix_mode else 1)
    return enis * per_eni + 2


def max_pods_ceiling(pods: int, vcpus: int) -> int:
    """Return ``pods`` capped as the calculator recommends: 110, or 250 above 30 vCPUs."""
    ceiling = (
        MAX_PODS_CEILING_LARGE if vcpus >= _LARGE_INSTANCE_MIN_VCPUS else MAX_PODS_CEILING_SMALL
    )
    return min(pods, ceiling)


@attrs.frozen(kw_only=True)
class PoolPlan:
    """One decision. Additions and releases are counts per ENI id; the caller picks addresses.

    In secondary-IP mode only the ``ips`` fields are used, in prefix mode only the ``prefixes``
    fields. ``new_eni_ips``/``new_eni_prefixes`` hold one entry per ENI to create: what it is
    created with. A plan either grows or shrinks, never both.
    """

    ips_to_add: Mapping[str, int] = attrs.field(factory=dict)
    prefixes_to_add: Mapping[str, int] = attrs.field(factory=dict)
    new_eni_ips: tuple[int, ...] = ()
    new_eni_prefixes: tuple[int, ...] = ()
    ips_to_release: Mapping[str, int] = attrs.field(factory=dict)
    prefixes_to_release: Mapping[str, int] = attrs.field(factory=dict)
    eni_to_free: str | None = None
    reason: str = ""

    @property
    def grows(self) -> bool:
        """Whether the plan adds addresses, prefixes or ENIs."""
        return bool(
            self.ips_to_add or self.prefixes_to_add or self.new_eni_ips or self.new_eni_prefixes
        )

    @property
    def shrinks(self) -> bool:
        """Whether the plan releases addresses or prefixes, or frees an ENI."""
        return bool(self.ips_to_release or self.prefixes_to_release or self.eni_to_free)

    @property
    def is_noop(self) -> bool:
        """Whether there is nothing to do."""
        return not (self.grows or self.shrinks)


def plan(
    enis: Sequence[EniState],
    targets: PoolTargets,
    limits: InstanceLimits,
    now: float,
    *,
    min_eni_age: float = DEFAULT_MIN_ENI_AGE,
    last_release: float | None = None,
    release_interval: float = DEFAULT_RELEASE_INTERVAL,
    pod_limit: int | None = None,
) -> PoolPlan:
    """Return what to do with the pool in ``enis`` now; see the module's theory of operation.

    ``enis`` is every ENI attached to the instance, no-manage ones included (they take ENI
    slots). ``last_release`` is when addresses were last released (None: never); ``pod_limit``
    (the node's max pods) stops growth once the pool holds that many addresses.

    Raises PoolStateError when the snapshot is inconsistent (duplicate ids, two primaries, or
    counts in the wrong unit for the mode).
    """
    _check_snapshot(enis, targets)
    managed = sorted((e for e in enis if e.managed), key=lambda e: (e.device_index, e.eni_id))
    stats = pool_stats(managed)
    short = shortfall(stats, targets, limits, pod_limit=pod_limit)
    if short > 0:
        return _grow(enis, managed, stats, short, targets, limits, pod_limit)
    return _shrink(
        managed, stats, targets, limits, now, min_eni_age, last_release, release_interval, pod_limit
    )


def _check_ids(enis: Sequence[EniState]) -> None:
    seen: set[str] = set()
    for e in enis:
        if e.eni_id in seen:
            raise PoolStateError(e.eni_id, "listed twice")
        seen.add(e.eni_id)
    if sum(e.primary for e in enis) > 1:
        raise PoolStateError(None, "more than one primary ENI")


def _check_snapshot(enis: Sequence[EniState], targets: PoolTargets) -> None:
    _check_ids(enis)
    for e in enis:
        if not e.managed:
            continue
        if targets.prefix_mode and e.total_ips != e.prefixes * IPS_PER_PREFIX:
            raise PoolStateError(e.eni_id, "prefix mode: total_ips must be 16 x prefixes")
        if not targets.prefix_mode and e.prefixes:
            raise PoolStateError(e.eni_id, "secondary-IP mode: prefixes must be released first")


def _grow(
    enis: Sequence[EniState],
    managed: Sequence[EniState],
    stats: PoolStats,
    short: int,
    targets: PoolTargets,
    limits: InstanceLimits,
    pod_limit: int | None,
) -> PoolPlan:
    unit = targets.unit_size
    slots = limits.slots_per_eni
    # WARM_ENI keeps whole ENIs warm: like ipamd it fills an ENI completely, not just the gap.
    whole = targets.policy is Policy.WARM_ENI
    budget = sys.maxsize if pod_limit is None else _div_ceil(pod_limit - stats.total, unit)
    need = short
    adds: dict[str, int] = {}
    for e in managed:
        if need <= 0 or budget <= 0:
            break
        used = e.prefixes if targets.prefix_mode else e.total_ips
        room = max(slots - used, 0)
        give = min(room if whole else min(room, need), budget)
        if give > 0:
            adds[e.eni_id] = give
            need -= give
            budget -= give
    new: list[int] = []
    eni_cap = limits.max_enis if targets.max_eni is None else min(limits.max_enis, targets.max_eni)
    free_eni_slots = max(eni_cap - len(enis), 0)
    while need > 0 and budget > 0 and len(new) < free_eni_slots:
        give = min(slots if whole else min(slots, need), budget)
        new.append(give)
        need -= give
        budget -= give

    noun = "prefixes" if targets.prefix_mode else "IPs"
    reason = f"pool short by {short} {noun} ({_describe(stats, targets)})"
    if not adds and not new:
        return PoolPlan(
            reason=f"{reason}; nothing can be added: {len(enis)}/{eni_cap} ENIs, all full"
        )
    steps = []
    if adds:
        steps.append(f"add {sum(adds.values())} {noun} on {len(adds)} existing ENI(s)")
    if new:
        steps.append(f"create {len(new)} ENI(s) with {', '.join(map(str, new))} {noun}")
    if need > 0:
        limit = "max pods" if budget <= 0 else "instance limits"
        steps.append(f"still {need} short: at {limit}")
    reason = f"{reason}: {'; '.join(steps)}"
    if targets.prefix_mode:
        return PoolPlan(prefixes_to_add=adds, new_eni_prefixes=tuple(new), reason=reason)
    return PoolPlan(ips_to_add=adds, new_eni_ips=tuple(new), reason=reason)


def _shrink(
    managed: Sequence[EniState],
    stats: PoolStats,
    targets: PoolTargets,
    limits: InstanceLimits,
    now: float,
    min_eni_age: float,
    last_release: float | None,
    release_interval: float,
    pod_limit: int | None,
) -> PoolPlan:
    summary = _describe(stats, targets)
    steps: list[str] = []
    to_free: EniState | None = None
    for e in reversed(managed):
        if e.primary or e.assigned_ips or e.cooling_ips or now - e.created_at < min_eni_age:
            continue
        rest = _without(stats, e)
        if shortfall(rest, targets, limits, pod_limit=pod_limit) == 0:
            to_free = e
            stats = rest
            steps.append(f"free {e.eni_id}: the pool stays at target without it")
            break
    remaining = [e for e in managed if e is not to_free]

    released: dict[str, int] = {}
    over = surplus(stats, targets)
    noun = "prefixes" if targets.prefix_mode else "IPs"
    if over > 0 and last_release is not None and now - last_release <= release_interval:
        steps.append(f"{over} {noun} over target, but released less than {release_interval:g}s ago")
    elif over > 0:
        left = over
        for e in reversed(remaining):
            give = min(e.free_prefixes if targets.prefix_mode else e.free_ips, left)
            if give > 0:
                released[e.eni_id] = give
                left -= give
            if left == 0:
                break
        steps.append(f"release {over} {noun} over target")

    if steps:
        reason = f"pool above target ({summary}): {'; '.join(steps)}"
    else:
        reason = f"pool at target ({summary})"
    eni_id = None if to_free is None else to_free.eni_id
    if targets.prefix_mode:
        return PoolPlan(prefixes_to_release=released, eni_to_free=eni_id, reason=reason)
    return PoolPlan(ips_to_release=released, eni_to_free=eni_id, reason=reason)


# --- sets of security groups (eni mode) ------------------------------------------------------

SHARED = ""
"""The shared pool's key among a ``NodePlan``'s steps (and the IpPool group of its addresses)."""

_SETTING_RESERVE = "security_groups.shared_reserve"
_SETTING_WARM = "security_groups.set_warm_ips"


@attrs.frozen(kw_only=True)
class SetTargets:
    """eni mode's knobs: the free addresses each set in use keeps, and the ENI slots besides the
    primary that sets never take from the shared pool (used by it or not).

    Raises PoolConfigError, naming the setting, when a value is negative.
    """

    warm_ips: int = 1
    reserve_enis: int = 1

    def __attrs_post_init__(self) -> None:
        if self.warm_ips < 0:
            raise PoolConfigError(_SETTING_WARM, self.warm_ips, "must be >= 0")
        if self.reserve_enis < 0:
            raise PoolConfigError(_SETTING_RESERVE, self.reserve_enis, "must be >= 0")


@attrs.frozen(kw_only=True)
class SetState:
    """One set of security groups as the planner sees it: its ENIs (secondary-IP mode), the
    ADDs waiting for one of its addresses now, whether it is in use (it has pods or waiting
    ADDs, or its last pod left less than the set cooldown ago) and when it last released
    addresses (None: never)."""

    key: str
    enis: tuple[EniState, ...] = ()
    waiting: int = 0
    in_use: bool = True
    last_release: float | None = None

    def targets(self, set_targets: SetTargets) -> PoolTargets:
        """The set's pool targets: its margin plus its waiting ADDs while in use, else 0."""
        warm = set_targets.warm_ips + self.waiting if self.in_use else 0
        return PoolTargets(warm_ip=warm, warm_ip_policy=True)


@attrs.frozen(kw_only=True)
class NodePlan:
    """One decision for the whole node. ``steps`` are (key, plan) in the order to carry them
    out: sets with waiting ADDs first, then the shared pool (key ``SHARED``), then the other
    sets. ``refused`` maps each set whose waiting ADDs cannot all get an address, even once
    this plan is done, to the limit that stops it, in words."""

    steps: tuple[tuple[str, PoolPlan], ...]
    refused: Mapping[str, str] = attrs.field(factory=dict)

    @property
    def shared(self) -> PoolPlan:
        return next(p for k, p in self.steps if k == SHARED)

    def for_set(self, key: str) -> PoolPlan | None:
        return next((p for k, p in self.steps if k == key and k != SHARED), None)

    @property
    def reason(self) -> str:
        """The shared pool's reason, then each set's that plans something or is refused."""
        parts = [self.shared.reason]
        for key, p in self.steps:
            if key == SHARED:
                continue
            if key in self.refused:
                parts.append(f"set {key}: refused: {self.refused[key]}")
            elif not p.is_noop:
                parts.append(f"set {key}: {p.reason}")
        return "; ".join(parts)


def plan_node(
    shared: Sequence[EniState],
    sets: Sequence[SetState],
    targets: PoolTargets,
    limits: InstanceLimits,
    now: float,
    *,
    set_targets: SetTargets = SetTargets(),
    min_eni_age: float = DEFAULT_MIN_ENI_AGE,
    last_release: float | None = None,
    release_interval: float = DEFAULT_RELEASE_INTERVAL,
    pod_limit: int | None = None,
    shared_plan: PoolPlan | None = None,
) -> NodePlan:
    """Plan the shared pool (``shared``: every ENI not of a set, no-manage ones included) and
    every set together over the instance's ENI slots; see the module's theory of operation.
    ``shared_plan`` is the shared pool's decision when the caller made it another way (a
    mixed prefix-mode pool); it must count the sets' ENIs as taken slots.

    Raises PoolStateError for an inconsistent snapshot (an ENI listed twice, a set's ENI
    marked primary or no-manage, a set key empty or repeated).
    """
    keys = [s.key for s in sets]
    if SHARED in keys or len(set(keys)) != len(keys):
        raise PoolStateError(None, "set keys must be distinct and not empty")
    set_enis = [e for s in sets for e in s.enis]
    for e in set_enis:
        if not e.managed or e.primary or e.no_manage:
            raise PoolStateError(e.eni_id, "a set's ENI is never the primary or a no-manage ENI")
    # The sets' ENIs take slots the shared pool cannot use: to it they are no-manage ENIs.
    taken = [
        EniState(eni_id=e.eni_id, device_index=e.device_index, no_manage=True) for e in set_enis
    ]
    if shared_plan is None:
        shared_plan = plan(
            [*shared, *taken],
            targets,
            limits,
            now,
            min_eni_age=min_eni_age,
            last_release=last_release,
            release_interval=release_interval,
            pod_limit=pod_limit,
        )
    else:  # a mixed pool's plan: ids must still be unique (its units are checked by its planner)
        _check_ids([*shared, *taken])
    cap = limits.max_enis if targets.max_eni is None else min(limits.max_enis, targets.max_eni)
    no_manage = sum(1 for e in shared if not e.managed)
    held = sum(1 for e in shared if e.managed) + len(shared_plan.new_eni_ips)
    held += len(shared_plan.new_eni_prefixes)
    kept = max(held, 1 + set_targets.reserve_enis)
    free = max(cap - no_manage - kept - len(set_enis), 0)

    first: list[tuple[str, PoolPlan]] = []
    after: list[tuple[str, PoolPlan]] = []
    refused: dict[str, str] = {}
    for s in sorted(sets, key=lambda s: (s.waiting == 0, s.key)):
        set_pool = s.targets(set_targets)
        if s.enis or free > 0:
            p = plan(
                s.enis,
                set_pool,
                InstanceLimits(max_enis=len(s.enis) + free, ipv4_per_eni=limits.ipv4_per_eni),
                now,
                min_eni_age=min_eni_age,
                last_release=s.last_release,
                release_interval=release_interval,
            )
            free -= len(p.new_eni_ips)
            if not s.in_use and p.ips_to_release:
                # Nothing is assigned: every ENI of the set goes once cooled and old enough,
                # and its addresses with it; releasing them one by one first is wasted calls.
                p = attrs.evolve(
                    p,
                    ips_to_release={},
                    reason=f"{p.reason}; not in use: kept until its ENIs can be freed",
                )
        else:
            p = PoolPlan(reason="no ENI yet, and no ENI slot for one")
        stats = pool_stats(s.enis)
        added = sum(p.ips_to_add.values()) + sum(p.new_eni_ips)
        if s.waiting and stats.available + added < s.waiting:
            slots = (
                f"{cap} ENI slots: the shared pool holds {held} "
                f"({_SETTING_RESERVE} = {set_targets.reserve_enis} keeps "
                f"{1 + set_targets.reserve_enis} for it), sets hold {len(set_enis)}"
                + (f", {no_manage} no-manage" if no_manage else "")
            )
            if s.enis:
                refused[s.key] = (
                    f"the set's {len(s.enis)} ENI(s) are full "
                    f"({stats.total} addresses, {stats.assigned} assigned, "
                    f"{stats.cooling} cooling) and no ENI slot is left: {slots}"
                )
            else:
                refused[s.key] = f"no ENI slot left for a new set of security groups: {slots}"
        (first if s.waiting else after).append((s.key, p))
    return NodePlan(steps=(*first, (SHARED, shared_plan), *after), refused=refused)


def _without(stats: PoolStats, eni: EniState) -> PoolStats:
    return PoolStats(
        enis=stats.enis - 1,
        total=stats.total - eni.total_ips,
        assigned=stats.assigned - eni.assigned_ips,
        cooling=stats.cooling - eni.cooling_ips,
        free_prefixes=stats.free_prefixes - eni.free_prefixes,
    )


def _describe(stats: PoolStats, targets: PoolTargets) -> str:
    policy = targets.policy
    if policy is Policy.WARM_IP:
        target = f"WARM_IP_TARGET={targets.warm_ip} MINIMUM_IP_TARGET={targets.minimum_ip}"
    elif policy is Policy.WARM_PREFIX:
        target = f"WARM_PREFIX_TARGET={targets.warm_prefix}, {stats.free_prefixes} free prefixes"
    else:
        target = f"WARM_ENI_TARGET={targets.warm_eni}"
    return (
        f"{target}; {stats.total} total, {stats.assigned} assigned, {stats.cooling} cooling, "
        f"{stats.available} available on {stats.enis} ENI(s)"
    )


def _div_ceil(x: int, y: int) -> int:
    return -(-x // y)
