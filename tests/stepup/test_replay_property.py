"""Property: whatever codes are submitted when, a TOTP time step is accepted at most once per
user, and accepted steps strictly increase (R34, invariant 5), with the real store's
`burn_step` (memory adapter; the Redis adapter passes the same contract suite)."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.adapters.memory_store import MemoryStore
from gateway.clock import FixedClock
from gateway.core import regulation, totp
from gateway.settings import StepUpPolicy

SEED = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
POLICY = StepUpPolicy(window=1)

submissions = st.lists(
    st.tuples(st.integers(0, 40), st.integers(-3, 3)),  # (seconds later, code's step offset)
    min_size=1,
    max_size=30,
)


async def _run(plan: list[tuple[int, int]]) -> list[int]:
    clock = FixedClock(1_800_000_000.0)
    store = MemoryStore(clock)
    accepted: list[int] = []
    for later, offset in plan:
        clock.advance(later)
        code = totp.code_at_step(SEED, totp.time_step(clock.now(), POLICY.period) + offset)
        step = totp.verify(
            SEED,
            code,
            clock.now(),
            digits=6,
            period=POLICY.period,
            window=POLICY.window,
            algorithm="SHA1",
        )
        if step is not None and await store.burn_step(
            "alice", step, regulation.replay_guard_ttl(POLICY)
        ):
            accepted.append(step)
    await store.close()
    return accepted


@settings(max_examples=150, deadline=None)
@given(plan=submissions)
def test_a_step_is_accepted_at_most_once(plan: list[tuple[int, int]]) -> None:
    """Accepted steps are unique and strictly increasing for any submission schedule."""
    accepted = asyncio.run(_run(plan))
    assert accepted == sorted(set(accepted))
