"""Brute-force regulation of the TOTP step-up, as pure decisions (R34, DESIGN §2.8).

Failures are counted per user and per client IP in the shared store (atomic `INCR` across
replicas); this module only names the counters and decides, from the counts and the policy,
what to lock. IPv6 clients are counted per /64 (one subscriber usually holds a whole /64, so
counting single addresses would give an attacker 2^64 fresh budgets). Lock keys and counter
keys never contain anything but the user name, a bucket of the address and fixed words.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from gateway.settings import StepUpPolicy


def ip_bucket(ip: str | None) -> str:
    """The unit the per-IP counter uses: the address for IPv4, its /64 for IPv6."""
    if not ip:
        return "unknown"
    try:
        addr = ipaddress.ip_address(ip.strip("[]"))
    except ValueError:
        return "unknown"
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


@dataclass(frozen=True)
class RegulationKeys:
    """Store keys of one attempt: failure counters and locks for the user and the IP bucket."""

    user_failures: str
    ip_failures: str
    user_lock: str
    ip_lock: str


def keys_for(user: str, ip: str | None) -> RegulationKeys:
    """Counter and lock keys for `user` and the bucket of `ip`."""
    bucket = ip_bucket(ip)
    return RegulationKeys(
        user_failures=f"stepup:fail:user:{user}",
        ip_failures=f"stepup:fail:ip:{bucket}",
        user_lock=f"stepup:lock:user:{user}",
        ip_lock=f"stepup:lock:ip:{bucket}",
    )


@dataclass(frozen=True)
class LockDecision:
    """What to do after one counted failure.

    `lock_*` is True whenever the count reached the limit (set or refresh the lock);
    `newly_locked_*` is True for exactly one failure (the one whose atomic increment returned
    the limit itself), so the lockout is logged and counted once even under concurrency.
    """

    lock_user: bool
    lock_ip: bool
    newly_locked_user: bool
    newly_locked_ip: bool

    @property
    def scopes(self) -> tuple[str, ...]:
        """The scopes that became locked with this failure ("user", "ip")."""
        out: list[str] = []
        if self.newly_locked_user:
            out.append("user")
        if self.newly_locked_ip:
            out.append("ip")
        return tuple(out)


def after_failure(user_failures: int, ip_failures: int, policy: StepUpPolicy) -> LockDecision:
    """Decide the locks from the counts returned by the atomic increments of one failure."""
    return LockDecision(
        lock_user=user_failures >= policy.max_failures_per_user,
        lock_ip=ip_failures >= policy.max_failures_per_ip,
        newly_locked_user=user_failures == policy.max_failures_per_user,
        newly_locked_ip=ip_failures == policy.max_failures_per_ip,
    )


def replay_guard_ttl(policy: StepUpPolicy) -> float:
    """How long a burned step must be remembered: longer than any code stays acceptable."""
    return float(policy.period * (2 * policy.window + 2) * 2)
