"""The continuous-batching scheduler's hand-off: the model thread never waits on the event loop."""

from __future__ import annotations

import asyncio
import sys
import threading
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


def _parked_on_condition(thread: threading.Thread, within: float = 5.0) -> bool:
    """Whether ``thread`` sits in ``Condition.wait`` (woken by a notify), not in a sleep-and-check loop."""
    deadline = time.time() + within
    while time.time() < deadline:
        frame = sys._current_frames().get(thread.ident)  # type: ignore[arg-type]
        while frame is not None:
            code = frame.f_code
            if code.co_name == "wait" and code.co_filename == threading.__file__:
                return True
            frame = frame.f_back
        time.sleep(0.01)
    return False


def test_retire_waits_on_the_condition_while_requests_stream_then_stops(engine: Engine) -> None:
    sched = Scheduler(engine, max_batch=4).start()
    params = SamplingParams(max_new_tokens=30, temperature=0.0, stop_token_ids=[], n=2)
    prompt = engine.tokenizer.encode_plain("Ada builds clocks")
    gate = threading.Event()

    async def main() -> tuple[list, bool, threading.Thread]:
        req = sched.submit(prompt, params)
        sched.call(lambda: gate.wait(30))  # hold the model thread so the request is surely in flight
        retirer = sched.retire(timeout=60)
        parked = _parked_on_condition(retirer)
        assert retirer.is_alive() and sched._thread is not None  # still serving what it was given
        gate.set()
        events = [item for items in [b async for b in req.batches()] for item in items]
        return events, parked, retirer

    try:
        events, parked, retirer = asyncio.run(main())
        retirer.join(10)
    finally:
        gate.set()
        sched.stop()
    assert parked, "retire() should wait on the scheduler's condition, not poll"
    assert not retirer.is_alive() and sched._thread is None
    for j in (0, 1):  # both samples streamed to the end before the scheduler stopped
        mine = [ev for k, ev in events if k == j]
        assert len(mine) == 30 and mine[-1].finished


def test_retire_with_nothing_in_flight_stops_at_once(engine: Engine) -> None:
    sched = Scheduler(engine, max_batch=2).start()
    model_thread = sched._thread
    assert model_thread is not None
    t0 = time.monotonic()
    sched.retire(timeout=60).join(10)
    assert time.monotonic() - t0 < 5 and not model_thread.is_alive()

    async def late() -> None:  # a request after retirement fails at once instead of hanging
        req = sched.submit([5, 6, 7], SamplingParams(max_new_tokens=3, temperature=0.0))
        async for _ in req.batches():
            pass

    with pytest.raises(RuntimeError, match="shutting down"):
        asyncio.run(late())


def test_retire_waits_for_a_queued_call_and_is_woken_when_it_ran(engine: Engine) -> None:
    sched = Scheduler(engine, max_batch=2).start()
    gate = threading.Event()
    sched.call(lambda: gate.wait(30))  # the model thread is busy with it: the call stays in flight
    time.sleep(0.05)
    done = sched.call(lambda: "ran")  # queued behind it, so retire() has something to wait for
    try:
        retirer = sched.retire(timeout=600)
        assert _parked_on_condition(retirer)
        gate.set()
        retirer.join(10)  # woken once the queued call ran, not after 600 s
        assert not retirer.is_alive() and done.result(0) == "ran"
    finally:
        gate.set()
        sched.stop()


def test_stop_during_retire_ends_both_and_fails_the_open_request(engine: Engine) -> None:
    sched = Scheduler(engine, max_batch=2).start()
    gate = threading.Event()

    async def main() -> threading.Thread:
        req = sched.submit([5, 6, 7], SamplingParams(max_new_tokens=50, temperature=0.0, stop_token_ids=[]))
        sched.call(lambda: gate.wait(30))
        retirer = sched.retire(timeout=600)
        assert _parked_on_condition(retirer)
        stopper = threading.Thread(target=sched.stop)
        stopper.start()
        gate.set()  # the model thread finishes its call, sees the stop and fails what is left
        with pytest.raises(RuntimeError, match="shutting down"):
            async for _ in req.batches():
                pass
        stopper.join(10)
        return retirer

    try:
        retirer = asyncio.run(main())
        retirer.join(10)  # woken by stop(), not left waiting out its 600 s
    finally:
        gate.set()
        sched.stop()
    assert not retirer.is_alive()


def test_retire_gives_up_waiting_after_its_timeout(engine: Engine) -> None:
    sched = Scheduler(engine, max_batch=2).start()
    gate = threading.Event()
    release = threading.Timer(1.0, gate.set)  # the model thread's call ends a while after the timeout

    async def main() -> float:
        req = sched.submit([5, 6, 7], SamplingParams(max_new_tokens=50, temperature=0.0, stop_token_ids=[]))
        sched.call(lambda: gate.wait(30))
        t0 = time.monotonic()
        retirer = sched.retire(timeout=0.3)
        release.start()
        retirer.join(10)  # gave up on the still-open request and stopped the scheduler
        assert not retirer.is_alive()
        with pytest.raises(RuntimeError, match="shutting down"):
            async for _ in req.batches():
                pass
        return time.monotonic() - t0

    try:
        took = asyncio.run(main())
    finally:
        release.cancel()
        gate.set()
        sched.stop()
    assert took < 5
