"""Durable state: the node's SQLite database, driven from one dedicated thread."""
