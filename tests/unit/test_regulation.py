"""`gateway.core.regulation`: lockout decisions and counter keys (R34)."""

from __future__ import annotations

import pytest

from gateway.core.regulation import after_failure, ip_bucket, keys_for, replay_guard_ttl
from gateway.settings import StepUpPolicy

POLICY = StepUpPolicy(max_failures_per_user=5, max_failures_per_ip=20)


@pytest.mark.parametrize(
    ("ip", "bucket"),
    [
        ("203.0.113.9", "203.0.113.9"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::ffff", "2001:db8:1:2::/64"),
        ("[2001:db8::1]", "2001:db8::/64"),
        ("::ffff:198.51.100.7", "198.51.100.7"),
        ("not-an-ip", "unknown"),
        (None, "unknown"),
        ("", "unknown"),
    ],
)
def test_ip_bucket(ip: str | None, bucket: str) -> None:
    """IPv4 per address, IPv6 per /64, v4-mapped as IPv4; garbage shares one bucket."""
    assert ip_bucket(ip) == bucket


def test_keys_for() -> None:
    """Counters and locks per user and per IP bucket, in their own namespaces."""
    keys = keys_for("alice", "2001:db8::5")
    assert keys.user_failures == "stepup:fail:user:alice"
    assert keys.ip_failures == "stepup:fail:ip:2001:db8::/64"
    assert keys.user_lock == "stepup:lock:user:alice"
    assert keys.ip_lock == "stepup:lock:ip:2001:db8::/64"


def test_below_the_limits_nothing_locks() -> None:
    """Fewer failures than the limits: no lock."""
    d = after_failure(4, 19, POLICY)
    assert (d.lock_user, d.lock_ip, d.scopes) == (False, False, ())


def test_reaching_the_user_limit_locks_once() -> None:
    """The failure whose count equals the limit locks and reports it; later ones keep the lock
    without reporting it again."""
    d = after_failure(5, 3, POLICY)
    assert (d.lock_user, d.lock_ip, d.scopes) == (True, False, ("user",))
    d = after_failure(6, 3, POLICY)
    assert (d.lock_user, d.scopes) == (True, ())


def test_reaching_the_ip_limit_locks_the_ip() -> None:
    """Per-IP limit (default 20) is independent of the user's."""
    d = after_failure(1, 20, POLICY)
    assert (d.lock_user, d.lock_ip, d.scopes) == (False, True, ("ip",))
    d = after_failure(5, 20, POLICY)
    assert d.scopes == ("user", "ip")


@pytest.mark.parametrize(("period", "window"), [(30, 0), (30, 1), (30, 2), (60, 1), (15, 2)])
def test_replay_guard_outlives_every_acceptable_code(period: int, window: int) -> None:
    """A burned step is remembered longer than a code stays acceptable ((2w+1) periods)."""
    policy = StepUpPolicy(period=period, window=window)
    assert replay_guard_ttl(policy) > (2 * window + 1) * period
