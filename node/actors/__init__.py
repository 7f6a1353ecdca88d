"""Actor shells: each owns one loop, reads its inputs from a mailbox or cell, calls the pure core, and
performs the effects (network, logging, publishing). Each is started and owned by the supervisor."""
