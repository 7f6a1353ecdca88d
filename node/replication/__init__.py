"""The replication shell: wires the pure core (``node.core.replication``) to disks, peers and clients.

``codec`` (peer batches and log-entry payloads on the wire and on disk), ``transport`` (signed, batched,
pipelined peer messages over kept-alive HTTP), ``service`` (the DataService clients reach), ``wiring`` (how
a Node gets them when REPLICATION=on). The Replicator actor is ``node.actors.replicator``.
"""
