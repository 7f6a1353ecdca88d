"""Plumbing shared by the actors: mailbox, latest-value cell, clock, resolver, peer transport, logging."""
