"""Talent Nest cluster node.

Layout (see README, "Design"):

* ``node.core``     pure decisions: node IDs, membership view, election. No I/O, no clock reads.
* ``node.actors``   asyncio shells around the core: Discoverer, HealthMonitor, Elector.
* ``node.http``     the aiohttp application (cluster endpoints, JSON errors).
* ``node.runtime``  mailbox, latest-value cell, clock, resolver, peer transport, logging, supervisor.
* ``node.config``   the validated, frozen configuration read from the environment.
"""

__version__ = "0.1.0"
