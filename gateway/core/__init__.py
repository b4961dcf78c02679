"""The pure core: protocol rules with no I/O (no aiohttp, redis, structlog or wall clock)."""
