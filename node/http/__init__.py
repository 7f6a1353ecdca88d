"""The HTTP face of the node (aiohttp): cluster endpoints, later the data API; JSON everywhere."""
