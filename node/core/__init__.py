"""Pure decision code: no I/O, no clocks, no randomness, no asyncio.

Everything here is a function of its arguments; time arrives as a ``now`` value. That is what lets the tests
run three nodes and a partition in a millisecond, and what ``tests/core/test_purity.py`` enforces by parsing
these modules' imports.
"""
