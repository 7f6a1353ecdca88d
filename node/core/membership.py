"""The membership view: who is in the cluster and whether they are alive. A pure state machine.

``step(state, event, now) -> (state, facts)``: the HealthMonitor actor feeds it every input (DNS answers,
probe results, peers' hello and leave notices, clock ticks) and logs/publishes what comes back. Nothing here
reads a clock or touches the network.

Rules (the README's "How failure detection works" is the prose version):

* **DNS only adds.** An answer adds the addresses it names that we do not know; it never removes anyone. So
  a failed, empty or partial lookup (a DNS hiccup, a resolver that lost its upstream) can never make a node
  conclude that it is alone. Peers leave the view only by saying goodbye or by staying silent.
* **A discovered peer is pending** until its first successful probe, however we learnt of it (DNS, its
  hello, its probe of us): a stale DNS record for a dead container, or a forged hello, must not be able to
  win an election. The HealthMonitor probes a new peer at once, so this costs one round trip.
* **Probes decide health.** ``failure_threshold`` consecutive misses make a peer unhealthy (it can no longer
  lead); any success makes it healthy again.
* **Silence removes.** A peer with no sign of life for ``node_timeout_s`` is dropped from the view.
* **Goodbye removes at once** and leaves a tombstone so that a DNS answer racing the departure does not bring
  the peer straight back. The tombstone lasts ``node_timeout_s``, or until the peer says hello again
  (a restarted node announces itself at start).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from node.core.ids import Endpoint

# --- inputs ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DnsAnswered:
    """A lookup of SERVICE_NAME succeeded with these IPv4 addresses (possibly none)."""

    hosts: frozenset[str]


@dataclass(frozen=True, slots=True)
class DnsFailed:
    reason: str


@dataclass(frozen=True, slots=True)
class ProbeSucceeded:
    endpoint: Endpoint


@dataclass(frozen=True, slots=True)
class ProbeFailed:
    endpoint: Endpoint
    reason: str


@dataclass(frozen=True, slots=True)
class PeerAnnounced:
    """A peer told us it is up (sent by every node at start and on discovering a new peer)."""

    endpoint: Endpoint


@dataclass(frozen=True, slots=True)
class ProbedBy:
    """A peer probed us. Makes a peer we do not know (e.g. one we dropped while it was paused) known again
    at once; a peer we know is judged by our own probes only, and a departed one stays departed."""

    endpoint: Endpoint


@dataclass(frozen=True, slots=True)
class PeerDeparted:
    """A peer told us it is shutting down."""

    endpoint: Endpoint


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed; expire silent peers and old tombstones."""


Input = (
    DnsAnswered | DnsFailed | ProbeSucceeded | ProbeFailed | PeerAnnounced | ProbedBy | PeerDeparted | Tick
)

# --- facts (outputs): each is logged once by the actor under a fixed event name ----------------------------


@dataclass(frozen=True, slots=True)
class PeerDiscovered:
    endpoint: Endpoint
    node_id: int
    via: str  # "dns" | "hello" | "probe"


@dataclass(frozen=True, slots=True)
class PeerHealthy:
    """A pending peer answered its first probe."""

    endpoint: Endpoint
    node_id: int


@dataclass(frozen=True, slots=True)
class PeerUnhealthy:
    endpoint: Endpoint
    node_id: int
    misses: int
    reason: str


@dataclass(frozen=True, slots=True)
class PeerRecovered:
    endpoint: Endpoint
    node_id: int


@dataclass(frozen=True, slots=True)
class PeerRemoved:
    endpoint: Endpoint
    node_id: int
    reason: str  # "timeout" | "left"


@dataclass(frozen=True, slots=True)
class ProbeRequested:
    """A peer we hold as pending or unhealthy says it is up (a restarted node's hello): probe it now rather
    than at the next probe tick, so it can rejoin (and lead) within a round trip."""

    endpoint: Endpoint


@dataclass(frozen=True, slots=True)
class LookupFailedKeptView:
    reason: str
    peers_kept: int


Fact = (
    PeerDiscovered
    | PeerHealthy
    | PeerUnhealthy
    | PeerRecovered
    | PeerRemoved
    | ProbeRequested
    | LookupFailedKeptView
)

# --- state -------------------------------------------------------------------------------------------------


class Health(enum.Enum):
    PENDING = "pending"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


@dataclass(frozen=True, slots=True)
class Peer:
    endpoint: Endpoint
    health: Health
    last_seen: float  # last sign of life; for a pending peer, when it was discovered
    misses: int = 0  # consecutive failed probes

    @property
    def node_id(self) -> int:
        return self.endpoint.node_id


@dataclass(frozen=True, slots=True)
class Params:
    failure_threshold: int
    node_timeout_s: float


@dataclass(frozen=True, slots=True)
class Member:
    """One row of the published view."""

    node_id: int
    endpoint: Endpoint
    healthy: bool
    is_self: bool = False
    # Room for the replication work: a node that must catch up on data before it may lead is not eligible.
    eligible: bool = True


@dataclass(frozen=True, slots=True)
class View:
    """An immutable snapshot of membership, what the Elector decides on. Members sorted by (id, endpoint)."""

    version: int
    self_id: int
    members: tuple[Member, ...]

    @property
    def healthy(self) -> tuple[Member, ...]:
        return tuple(m for m in self.members if m.healthy)


@dataclass(frozen=True, slots=True)
class Membership:
    me: Endpoint
    params: Params
    peers: Mapping[Endpoint, Peer] = field(default_factory=lambda: MappingProxyType({}))
    departed: Mapping[Endpoint, float] = field(
        default_factory=lambda: MappingProxyType({})
    )  # tombstones: endpoint -> when it left
    version: int = 0  # bumped whenever the view (members or health) changes

    def view(self) -> View:
        members = [Member(self.me.node_id, self.me, healthy=True, is_self=True)]
        members += [
            Member(p.node_id, p.endpoint, healthy=p.health is Health.HEALTHY) for p in self.peers.values()
        ]
        members.sort(key=lambda m: (m.node_id, m.endpoint))
        return View(self.version, self.me.node_id, tuple(members))


def initial(me: Endpoint, params: Params) -> Membership:
    return Membership(me=me, params=params)


def step(state: Membership, event: Input, now: float) -> tuple[Membership, list[Fact]]:
    """Apply one input. Returns the new state and the facts to log; the state's version moves iff the view did."""
    match event:
        case DnsAnswered(hosts):
            return _on_dns(state, hosts, now)
        case DnsFailed(reason):
            return state, [LookupFailedKeptView(reason, len(state.peers))]
        case ProbeSucceeded(endpoint):
            return _on_probe_ok(state, endpoint, now)
        case PeerAnnounced(endpoint):
            return _on_announced(state, endpoint, now, "hello")
        case ProbedBy(endpoint):
            if _tombstoned(state, endpoint, now):
                return state, []  # a departed peer's last probe, still in flight when it said goodbye
            return _on_announced(state, endpoint, now, "probe")
        case ProbeFailed(endpoint, reason):
            return _on_miss(state, endpoint, reason)
        case PeerDeparted(endpoint):
            return _on_departed(state, endpoint, now)
        case Tick():
            return _on_tick(state, now)
    raise TypeError(f"not a membership input: {event!r}")


def _with(state: Membership, peers: dict[Endpoint, Peer], departed: Mapping[Endpoint, float] | None = None):
    return replace(
        state,
        peers=MappingProxyType(peers),
        departed=state.departed if departed is None else MappingProxyType(dict(departed)),
        version=state.version + 1,
    )


def _tombstoned(state: Membership, endpoint: Endpoint, now: float) -> bool:
    left_at = state.departed.get(endpoint)
    return left_at is not None and now - left_at < state.params.node_timeout_s


def _on_dns(state: Membership, hosts: frozenset[str], now: float) -> tuple[Membership, list[Fact]]:
    new = []
    for host in sorted(hosts):
        endpoint = Endpoint(host, state.me.port)
        if endpoint == state.me or endpoint in state.peers or _tombstoned(state, endpoint, now):
            continue
        new.append(endpoint)
    if not new:
        return state, []
    peers = dict(state.peers)
    for endpoint in new:
        peers[endpoint] = Peer(endpoint, Health.PENDING, last_seen=now)
    return _with(state, peers), [PeerDiscovered(e, e.node_id, "dns") for e in new]


def _on_announced(
    state: Membership, endpoint: Endpoint, now: float, via: str
) -> tuple[Membership, list[Fact]]:
    """A peer said it exists (hello, or it probed us). That is a claim, not proof: an unknown peer enters as
    pending and becomes healthy only when our own probe gets an answer (the HealthMonitor probes it at once).
    So nobody can make itself leader just by saying hello."""
    if endpoint == state.me:
        return state, []
    departed = state.departed
    if endpoint in departed:
        departed = MappingProxyType({k: v for k, v in departed.items() if k != endpoint})
    known = state.peers.get(endpoint)
    if known is not None:
        return state, [] if known.health is Health.HEALTHY else [ProbeRequested(endpoint)]
    peers = dict(state.peers)
    peers[endpoint] = Peer(endpoint, Health.PENDING, last_seen=now)
    return _with(state, peers, departed), [PeerDiscovered(endpoint, endpoint.node_id, via)]


def _on_probe_ok(state: Membership, endpoint: Endpoint, now: float) -> tuple[Membership, list[Fact]]:
    old = state.peers.get(endpoint)
    if old is None:
        # A late answer for a peer already removed, or a probe in flight when the peer said goodbye.
        return state, []
    peers = dict(state.peers)
    peers[endpoint] = Peer(endpoint, Health.HEALTHY, last_seen=now)
    if old.health is Health.HEALTHY:
        # Only last_seen moved: keep the version so a steady cluster publishes no new views.
        return replace(state, peers=MappingProxyType(peers)), []
    fact: Fact = (
        PeerHealthy(endpoint, endpoint.node_id)
        if old.health is Health.PENDING
        else PeerRecovered(endpoint, endpoint.node_id)
    )
    return _with(state, peers), [fact]


def _on_miss(state: Membership, endpoint: Endpoint, reason: str) -> tuple[Membership, list[Fact]]:
    old = state.peers.get(endpoint)
    if old is None:
        return state, []
    misses = old.misses + 1
    peers = dict(state.peers)
    if misses >= state.params.failure_threshold and old.health is not Health.UNHEALTHY:
        peers[endpoint] = replace(old, health=Health.UNHEALTHY, misses=misses)
        return _with(state, peers), [PeerUnhealthy(endpoint, endpoint.node_id, misses, reason)]
    peers[endpoint] = replace(old, misses=misses)
    return replace(state, peers=MappingProxyType(peers)), []


def _on_departed(state: Membership, endpoint: Endpoint, now: float) -> tuple[Membership, list[Fact]]:
    if endpoint == state.me:
        return state, []
    departed = dict(state.departed)
    departed[endpoint] = now
    if endpoint not in state.peers:
        return replace(state, departed=MappingProxyType(departed)), []
    peers = {k: v for k, v in state.peers.items() if k != endpoint}
    return _with(state, peers, departed), [PeerRemoved(endpoint, endpoint.node_id, "left")]


def _on_tick(state: Membership, now: float) -> tuple[Membership, list[Fact]]:
    timeout = state.params.node_timeout_s
    expired = [p for p in state.peers.values() if now - p.last_seen >= timeout]
    stale_tombstones = [e for e, t in state.departed.items() if now - t >= timeout]
    if not expired and not stale_tombstones:
        return state, []
    departed = {e: t for e, t in state.departed.items() if now - t < timeout}
    if not expired:
        return replace(state, departed=MappingProxyType(departed)), []
    gone = {p.endpoint for p in expired}
    peers = {k: v for k, v in state.peers.items() if k not in gone}
    facts: list[Fact] = [
        PeerRemoved(p.endpoint, p.node_id, "timeout") for p in sorted(expired, key=lambda p: p.endpoint)
    ]
    return _with(state, peers, departed), facts
