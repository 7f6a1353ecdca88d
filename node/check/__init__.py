"""Checking a cluster's promises from the outside: record what clients saw, then judge the history.

``history`` holds the record (one JSON line per completed operation); ``checkers`` judges it with pure
functions (no I/O, no clock) so that every verdict can be tested on histories whose answer is known. The
workload that produces histories against real nodes and the operator command build on these two.
"""
