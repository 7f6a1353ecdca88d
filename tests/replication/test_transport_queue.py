"""The per-peer send queue of the replication transport: batches keep each message's cluster, and the
overflow policy drops heartbeats first. Pure (no sockets): the queue is what decides what goes together."""

from __future__ import annotations

from node.core.ids import Endpoint
from node.core.replication import messages as msg
from node.replication import transport
from node.replication.transport import MAX_BATCH_MESSAGES, MAX_QUEUED_MESSAGES


def peer() -> transport._Peer:
    return transport._Peer(Endpoint.parse("10.0.0.2:3000"))


def test_a_batch_holds_the_messages_of_one_cluster_in_queue_order():
    """A message made before this node left a cluster must leave stamped with that cluster, not the new one
    (nor none): a batch never mixes clusters."""
    p, stats = peer(), {"dropped": 0}
    plan = [("", 1), ("", 2), ("a", 3), ("a", 4), ("b", 5), ("a", 6)]
    for cluster, seq in plan:
        p.put(cluster, msg.HeartbeatAck(1, seq), stats)
    taken = []
    while p.queue:
        cluster, batch = p.take()
        taken.append((cluster, [m.seq for m in batch]))
    assert taken == [("", [1, 2]), ("a", [3, 4]), ("b", [5]), ("a", [6])]
    assert p.take() == ("", [])


def test_a_batch_is_at_most_max_batch_messages():
    p, stats = peer(), {"dropped": 0}
    for seq in range(MAX_BATCH_MESSAGES + 3):
        p.put("a", msg.AppendAck(1, seq, seq), stats)
    first, second = p.take(), p.take()
    assert len(first[1]) == MAX_BATCH_MESSAGES and len(second[1]) == 3 and second[0] == "a"


def test_a_full_queue_drops_a_heartbeat_before_anything_else():
    p, stats = peer(), {"dropped": 0}
    p.put("a", msg.Heartbeat(1, 0, 0), stats)
    for seq in range(1, MAX_QUEUED_MESSAGES):
        p.put("a", msg.AppendAck(1, seq, seq), stats)
    p.put("a", msg.AppendAck(1, 99_999, 99_999), stats)
    assert stats["dropped"] == 1 and len(p.queue) == MAX_QUEUED_MESSAGES
    assert not any(isinstance(m, msg.Heartbeat) for _, m in p.queue)
    assert p.queue[-1][1].match == 99_999
