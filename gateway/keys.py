"""Token signing keys: loaded from PEM files named in config, published as a JWKS.

(Skeleton: the proxy work package fills this in; see docs/ARCHITECTURE.md.)
"""

from __future__ import annotations


class KeyRing:
    """The gateway's signing keys (one active `kid`) and the public JWKS of all of them."""
