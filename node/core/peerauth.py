"""Signatures on peer-to-peer cluster messages (probes that carry ``from``, hello, leave).

Without them anyone who can reach a node could send ``leave`` for a live peer and knock it out of the view
for NODE_TIMEOUT, or flood the view with made-up members. Every node already shares JWT_SECRET, so peer
messages carry an HMAC-SHA256 over (time, path, sender) under a key derived from it (a separate key, so a
peer signature can never be replayed as a data-API token or the other way round). A node with a different
secret is simply not part of the cluster: its messages are refused with 401 and it is logged.

Replay: a captured message is accepted for ``WINDOW_S`` around its timestamp. Replaying a leave within
that window can remove a node that restarted in the meantime for at most NODE_TIMEOUT; accepted as a
known limitation (an incarnation number per process start would close it).

Pure: the caller passes the current Unix time.
"""

from __future__ import annotations

import hashlib
import hmac

HEADER = "X-TalentNest-Peer"
WINDOW_S = 60
_KEY_LABEL = b"talentnest/peer-messages/v1"


def derive_key(secret: str) -> bytes:
    return hmac.new(secret.encode(), _KEY_LABEL, hashlib.sha256).digest()


def _mac(key: bytes, timestamp: int, path: str, sender: str) -> str:
    message = f"{timestamp}\n{path}\n{sender}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def sign(key: bytes, path: str, sender: str, now_s: float) -> str:
    timestamp = int(now_s)
    return f"t={timestamp},sig={_mac(key, timestamp, path, sender)}"


def verify(key: bytes, header: str | None, path: str, sender: str, now_s: float) -> bool:
    if not header or len(header) > 200:
        return False
    fields = dict(part.partition("=")[::2] for part in header.split(","))
    stamp, sig = fields.get("t", ""), fields.get("sig", "")
    if not stamp.isdigit() or abs(now_s - int(stamp)) > WINDOW_S:
        return False
    return hmac.compare_digest(sig, _mac(key, int(stamp), path, sender))
