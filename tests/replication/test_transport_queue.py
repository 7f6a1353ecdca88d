"""The per-peer send queue of the replication transport: batches keep each message's cluster, and the
overflow policy drops heartbeats first. Pure (no sockets): the queue is what decides what goes together."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from node.core.ids import Endpoint
from node.core.replication import messages as msg
from node.http.replication import MAX_BATCH_BYTES
from node.replication import codec, transport
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


def append(seq: int, payload_bytes: int) -> msg.Append:
    entry = msg.Entry(1, seq, msg.Kind.COMMAND, b"x" * payload_bytes)
    return msg.Append(1, msg.LogId(1, seq - 1), (entry,), 0, seq)


def test_a_member_catching_up_on_large_entries_gets_batches_the_receiver_accepts():
    # Regression: 256 Appends of 1 MiB went as one batch of 80+ MiB, over the receiver's 64 MiB limit
    # (413 or a stream frame too big), resent and refused again: a newcomer that had installed a 1 GB
    # snapshot never caught up on the log after it, and the leader lost its lease over and over.
    p, stats = peer(), {"dropped": 0}
    for seq in range(1, 300):
        p.put("a", append(seq, 1 << 20), stats)
    _, batch = p.take()
    body = codec.encode_batch("me", "10.0.0.1:3000", batch, "a")
    assert len(body) <= MAX_BATCH_BYTES
    assert sum(transport.entry_payload_bytes(m) for m in batch) <= transport.MAX_BATCH_PAYLOAD_BYTES


def test_one_message_larger_than_the_payload_bound_still_goes_alone():
    p, stats = peer(), {"dropped": 0}
    p.put("a", append(1, transport.MAX_BATCH_PAYLOAD_BYTES + 1), stats)
    p.put("a", msg.AppendAck(1, 1, 1), stats)
    assert [type(m) for m in p.take()[1]] == [msg.Append]
    assert [type(m) for m in p.take()[1]] == [msg.AppendAck]


@settings(max_examples=200, deadline=None)
@given(
    items=st.lists(
        st.tuples(st.sampled_from(["a"] * 8 + ["", "b"]), st.integers(-1, 8 << 20)), min_size=1, max_size=400
    )
)
def test_batches_keep_every_message_in_order_within_the_bounds(items):
    """Any queue (clusters, acks and Appends of any payload size): the batches hand every message out once,
    in queue order, each of one cluster, non-empty, at most MAX_BATCH_MESSAGES, and over
    MAX_BATCH_PAYLOAD_BYTES of payload only when a single message is."""
    p, stats = peer(), {"dropped": 0}
    sent = []
    for seq, (cluster, size) in enumerate(items, 1):
        m = msg.AppendAck(1, seq, seq) if size < 0 else append(seq, size)
        p.put(cluster, m, stats)
        sent.append((cluster, m))
    taken = []
    for _ in range(len(items) + 1):
        cluster, batch = p.take()
        if not batch:
            break
        assert len(batch) <= MAX_BATCH_MESSAGES
        payload = sum(transport.entry_payload_bytes(m) for m in batch)
        assert payload <= transport.MAX_BATCH_PAYLOAD_BYTES or len(batch) == 1
        taken.extend((cluster, m) for m in batch)
    assert taken == sent and not p.queue
