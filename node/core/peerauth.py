"""Signed, replay-proof peer-to-peer cluster messages (probes that carry ``from``, hello, leave).

Why: anyone who can reach a node could otherwise send ``leave`` for a live peer and knock it out of the
view, or flood the view with made-up members. Every node shares JWT_SECRET, so peer messages carry an
HMAC-SHA256 under a key derived from it (:func:`derive_key`: a separate key, so a peer signature can never
be reused as a data-API token or the other way round). A node with a different secret is not part of the
cluster: its messages are refused with 401.

A signature alone does not stop replay: a captured ``leave`` stays valid. So each message also carries

* the sender's **incarnation**: a number that is new at every process start and strictly greater than the
  one before it for the same node (the node persists it in DATA_DIR, fsynced, before it sends anything; a
  lost DATA_DIR falls back to the sender's own wall-clock milliseconds at start, see
  ``node.runtime.incarnation``). Only the sender's own history matters, never a comparison of clocks
  across hosts;
* a **sequence number**, one per message, counting up from 1 in each incarnation;
* the **receiver's incarnation** as the sender last learnt it (every /cluster/health and hello answer
  reports it), or 0 for "unknown".

The header is ``X-TalentNest-Peer: v=2,inc=<n>,seq=<n>,rinc=<n>,sig=<64 hex>``; the MAC covers the version
tag, the request path, the sender's address, ``inc``, ``seq`` and ``rinc``.

The receiver keeps, per sender address whose MAC verified, an anti-replay window like IPsec/DTLS
(:class:`Window`): the sender's newest incarnation, the highest sequence number seen in it and a 64-bit
bitmap of the 64 numbers below. A message is accepted once: a number seen before, one more than 63 below the
highest, or one from an older incarnation is refused; a newer incarnation (the sender restarted) starts a
fresh window. Messages may arrive out of order within the window (concurrent probes and notices).

A restarted receiver has lost its windows, so a message captured before its restart would be new to it.
State-changing messages close that hole: a ``leave`` must carry the receiver's *current* incarnation and is
refused otherwise, so a leave captured before the receiver restarted is worthless after it. Probes and
hellos may carry 0: they only claim liveness, and a claimed peer stays pending until the receiver's own
probe gets an answer.

Limits (accepted, stated):

* Windows are bounded (:data:`MAX_SENDERS` senders, least recently used evicted). Only messages with a
  valid MAC create state, so only a key holder can cause eviction; an evicted sender's latest messages
  could then be replayed once each.
* After a receiver restart, probes and hellos captured before it can be replayed once each until the
  sender's next fresh message moves the window past them: at worst a dead peer is listed as pending.
* A sender has one sequence counter for all its receivers, so a receiver sees gaps (messages to other
  peers), which the window skips. Reordering is tolerated up to 63 of the sender's messages; a probe
  overtaken by more than that is refused and counts as one missed probe.
* Answers (/cluster/health, hello) are not signed: an on-path attacker can report a wrong incarnation, and
  the sender's leave is then refused. It could drop the leave anyway; the peer then notices by probing.
* A replayed message is refused, but a dropped or delayed one is not detected; that is the job of probing.
* Bodies of probes and notices are not covered: the receiver uses only the sender address (which the MAC
  covers) from them. Messages whose body matters (replication batches, ``POST /cluster/replication``) pass
  ``body=`` to :meth:`Signer.next_header` and :func:`verify`: the MAC then covers the body's SHA-256 too, so
  a batch is authenticated with its content, and the replay window makes a replayed batch change nothing.

API for other protocols (replication reuses it with its own paths): the sender keeps one :class:`Signer`
and calls ``next_header(path, receiver_incarnation)`` per message; the receiver calls :func:`verify`, then
:func:`addressed_to`, then ``ReplayGuard.accept(sender, claims)``, and acts only if all three agree.

Pure: no clock, no I/O, no randomness. Callers pass incarnations; :class:`Signer` only counts.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum

HEADER = "X-TalentNest-Peer"
VERSION = "2"
MAX_HEADER_CHARS = 200  # the longest valid header is about 150 characters
WINDOW_BITS = 64
MAX_SENDERS = 4096
MAX_NUMBER = 2**63 - 1  # incarnations and sequence numbers fit a signed 64-bit integer (JSON-safe in Python)
_MAX_DIGITS = 19
_FIELDS = ("v", "inc", "seq", "rinc", "sig")
_HEX = frozenset("0123456789abcdef")
_DIGITS = frozenset("0123456789")
_KEY_LABEL = b"talentnest/peer-messages/v1"


def derive_key(secret: str) -> bytes:
    return hmac.new(secret.encode(), _KEY_LABEL, hashlib.sha256).digest()


@dataclass(frozen=True, slots=True)
class Claims:
    """What a verified header says: who the sender is in time (incarnation, seq) and whom it addressed."""

    incarnation: int
    seq: int
    receiver_incarnation: int


def body_digest(body: bytes) -> str:
    """SHA-256 of a message body, hex: what a signature over a body covers (see :func:`_mac`)."""
    return hashlib.sha256(body).hexdigest()


def _mac(key: bytes, path: str, sender: str, claims: Claims, body: bytes | None = None) -> str:
    fields = [
        f"v{VERSION}",
        path,
        sender,
        str(claims.incarnation),
        str(claims.seq),
        str(claims.receiver_incarnation),
    ]
    if body is not None:
        # Messages with a body (replication batches) sign its digest too. A separate line tagged "body=",
        # so a signature made without a body never verifies as one with a body, nor the other way round.
        fields.append("body=" + body_digest(body))
    message = "\n".join(fields)
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


def sign(key: bytes, path: str, sender: str, claims: Claims, body: bytes | None = None) -> str:
    """The header value for one message. Prefer :class:`Signer`, which never reuses a sequence number."""
    for value in (claims.incarnation, claims.seq, claims.receiver_incarnation):
        if not 0 <= value <= MAX_NUMBER:
            raise ValueError(f"peer message numbers must be in 0..{MAX_NUMBER}")
    return (
        f"v={VERSION},inc={claims.incarnation},seq={claims.seq},rinc={claims.receiver_incarnation},"
        f"sig={_mac(key, path, sender, claims, body)}"
    )


def _number(text: str) -> int | None:
    # ASCII digits only: str.isdigit() and int() also take '²', '١' and the like.
    if not 0 < len(text) <= _MAX_DIGITS or not set(text) <= _DIGITS or (text[0] == "0" and text != "0"):
        return None  # one spelling per number: the MAC covers the canonical form
    value = int(text)
    return value if value <= MAX_NUMBER else None


def parse(header: str | None) -> tuple[Claims, str] | None:
    """Split a header into its claims and signature; None if it is not exactly the documented form."""
    if not header or len(header) > MAX_HEADER_CHARS:
        return None
    fields: dict[str, str] = {}
    for part in header.split(","):
        name, sep, value = part.partition("=")
        if not sep or name not in _FIELDS or name in fields:
            return None  # unknown or duplicated fields are a different message, not a lenient reading
        fields[name] = value
    if len(fields) != len(_FIELDS) or fields["v"] != VERSION:
        return None
    sig = fields["sig"]
    if len(sig) != 64 or not set(sig) <= _HEX:
        return None
    inc, seq, rinc = _number(fields["inc"]), _number(fields["seq"]), _number(fields["rinc"])
    if inc is None or seq is None or rinc is None or inc == 0 or seq == 0:
        return None
    return Claims(inc, seq, rinc), sig


def verify(
    key: bytes, header: str | None, path: str, sender: str, body: bytes | None = None
) -> Claims | None:
    """The claims of a header whose MAC is right for (path, sender[, body]); None for anything else. Never
    raises. A receiver whose messages carry a body always passes it: then only a signature over exactly
    these bytes verifies."""
    parsed = parse(header)
    if parsed is None:
        return None
    claims, sig = parsed
    return claims if hmac.compare_digest(sig, _mac(key, path, sender, claims, body)) else None


def addressed_to(claims: Claims, incarnation: int, *, state_changing: bool) -> bool:
    """Whether a message was meant for this incarnation of the receiver.

    A state-changing message (leave) must name the receiver's current incarnation, so one captured before
    the receiver restarted (when its windows were lost) is refused. Probes and hellos may say 0 (unknown).
    """
    if claims.receiver_incarnation == incarnation:
        return True
    return not state_changing and claims.receiver_incarnation == 0


class Signer:
    """Signs one process's outgoing peer messages: fixed sender and incarnation, a fresh seq per message."""

    def __init__(self, key: bytes, sender: str, incarnation: int) -> None:
        if not 1 <= incarnation <= MAX_NUMBER:
            raise ValueError(f"incarnation must be in 1..{MAX_NUMBER}")
        self._key = key
        self.sender = sender
        self.incarnation = incarnation
        self._seq = 0

    def next_header(self, path: str, receiver_incarnation: int = 0, body: bytes | None = None) -> str:
        self._seq += 1
        claims = Claims(self.incarnation, self._seq, receiver_incarnation)
        return sign(self._key, path, self.sender, claims, body)


@dataclass(frozen=True, slots=True)
class Window:
    """Anti-replay state for one sender: its newest incarnation, highest seq, and which of the 64 below
    (bit i = highest - i, bit 0 = highest itself) have been seen."""

    incarnation: int
    highest: int
    seen: int


class Verdict(Enum):
    ACCEPTED = "accepted"
    REPLAYED = "replayed"  # this (incarnation, seq) was accepted before
    TOO_OLD = "too old"  # more than WINDOW_BITS - 1 below the highest seq seen
    OLD_INCARNATION = "old incarnation"  # the sender has restarted since

    @property
    def accepted(self) -> bool:
        return self is Verdict.ACCEPTED


_MASK = (1 << WINDOW_BITS) - 1


def advance(window: Window | None, incarnation: int, seq: int) -> tuple[Verdict, Window | None]:
    """Check (incarnation, seq) against a sender's window; return the verdict and the window after it."""
    if window is None or incarnation > window.incarnation:
        return Verdict.ACCEPTED, Window(incarnation, seq, 1)
    if incarnation < window.incarnation:
        return Verdict.OLD_INCARNATION, window
    if seq > window.highest:
        shift = seq - window.highest
        seen = ((window.seen << shift) | 1) & _MASK if shift < WINDOW_BITS else 1
        return Verdict.ACCEPTED, Window(incarnation, seq, seen)
    behind = window.highest - seq
    if behind >= WINDOW_BITS:
        return Verdict.TOO_OLD, window
    if window.seen >> behind & 1:
        return Verdict.REPLAYED, window
    return Verdict.ACCEPTED, Window(incarnation, window.highest, window.seen | 1 << behind)


class ReplayGuard:
    """The receiver's windows, per sender, bounded: at most ``max_senders``, least recently used evicted.

    Call :meth:`accept` only for messages whose MAC verified, so that nobody without the key creates state.
    """

    def __init__(self, max_senders: int = MAX_SENDERS) -> None:
        if max_senders < 1:
            raise ValueError("max_senders must be positive")
        self._max = max_senders
        self._windows: OrderedDict[str, Window] = OrderedDict()

    def __len__(self) -> int:
        return len(self._windows)

    def accept(self, sender: str, claims: Claims) -> Verdict:
        verdict, window = advance(self._windows.get(sender), claims.incarnation, claims.seq)
        if window is not None:
            self._windows[sender] = window
            self._windows.move_to_end(sender)
            while len(self._windows) > self._max:
                self._windows.popitem(last=False)
        return verdict
