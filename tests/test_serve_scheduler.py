"""The continuous-batching scheduler's hand-off: the model thread never waits on the event loop."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from chatforge.engine import Engine, SamplingParams
from chatforge.sample import load_engine
from chatforge.serve.scheduler import Scheduler
from serve_util import make_checkpoints


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread: None) -> None:
    """Tiny models: one thread (see conftest)."""


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    ck = make_checkpoints(tmp_path_factory.mktemp("ckpt"), ("base",))
    return load_engine(Path(ck["base"]))


def test_model_thread_runs_on_while_the_event_loop_is_blocked(engine: Engine) -> None:
    sched = Scheduler(engine, max_batch=4).start()
    params = SamplingParams(max_new_tokens=24, temperature=0.0, stop_token_ids=[], n=2)
    prompt = engine.tokenizer.encode_plain("Ada builds clocks")

    async def main() -> list[list]:
        req = sched.submit(prompt, params)
        # Block this loop on purpose (as a slow handler would): every step must still run meanwhile.
        deadline = time.time() + 30
        while sched.stats.tokens < 48 and time.time() < deadline:
            time.sleep(0.01)
        assert sched.stats.tokens == 48 and sched.active == 0
        return [items async for items in req.batches()]

    try:
        batches = asyncio.run(main())
    finally:
        sched.stop()
    # Everything that arrived while the handler was stuck is taken in one go (one write, not 48)...
    assert len(batches) == 1
    events = batches[0]
    # ...in order, both samples, each ending once with its full completion.
    for j in (0, 1):
        mine = [ev for k, ev in events if k == j]
        assert len(mine) == 24 and [ev.finished for ev in mine] == [False] * 23 + [True]
        assert [ev.token_id for ev in mine] == mine[-1].completion.token_ids
    assert sched.stats.batched_steps >= 23  # the two samples shared every decode step


def test_a_bad_request_fails_alone_and_errors_reach_the_handler(engine: Engine) -> None:
    sched = Scheduler(engine, max_batch=2).start()
    good = SamplingParams(max_new_tokens=5, temperature=0.0, stop_token_ids=[])
    too_long = SamplingParams(max_new_tokens=10_000, temperature=0.0)

    async def main() -> tuple[int, str]:
        ok = sched.submit([5, 6, 7], good)
        bad = sched.submit([5, 6, 7], too_long)
        with pytest.raises(ValueError) as e:
            async for _ in bad.batches():
                pass
        n = sum([len(items) async for items in ok.batches()])
        return n, str(e.value)

    try:
        n, msg = asyncio.run(main())
    finally:
        sched.stop()
    assert n == 5 and "exceeds" in msg
