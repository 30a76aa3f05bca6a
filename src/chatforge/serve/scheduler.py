"""Continuous batching: one background thread drives an engine session; async handlers get tokens by queue.

Requests wait in a queue and join the running batch between steps as slots free up (each of a request's
``n`` samples takes one slot); a finished sequence leaves at once; a cancelled request (the client went
away) is removed before the next step, so its slot goes to the next waiting request. Anything else that
must touch the model (a scoring forward pass) runs on the same thread between steps via :meth:`call`, so
the model is only ever used from one thread.

The model thread never waits on the event loop: after each step it hands *all* of that step's events to
the loop in one ``call_soon_threadsafe`` (not one per token), and a handler takes everything that has
arrived for its request at once (:meth:`Request.batches`), so a handler that falls behind under load
catches up with one write instead of one per token.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from chatforge.engine import Engine, SamplingParams, TokenEvent


class StepObserver(Protocol):
    def observe_step(self, active: int, waiting: int, seconds: float) -> None: ...


Item = tuple[int, TokenEvent]  # (sample index, event)


class Cancelled(Exception):
    """What a cancelled request's reader gets: its slots are freed and no more events will come."""


class Request:
    """One submitted prompt with ``n`` samples; its events are handed to the submitting event loop."""

    def __init__(
        self, rid: int, prompt: Sequence[int], params: SamplingParams, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.id = rid
        self.prompt = list(prompt)
        self.params = params
        self.submitted = time.perf_counter()
        self._loop = loop
        self._pending: list[Item] = []  # touched on the loop's thread only
        self._error: BaseException | None = None
        self._wake = asyncio.Event()
        self.unfinished = params.n  # the model thread's count
        self.cancelled = False

    def _deliver(self, items: list[Item], error: BaseException | None) -> None:
        """On the loop's thread: queue what the model thread sent and wake the handler."""
        self._pending.extend(items)
        if error is not None:
            self._error = error
        self._wake.set()

    async def batches(self) -> AsyncIterator[list[Item]]:
        """Every event that has arrived since the last batch (at least one per batch), until every sample
        has finished; raises what the model thread hit, after the events that came before it."""
        left = self.params.n
        while left:
            if not self._pending and self._error is None:
                self._wake.clear()
                await self._wake.wait()
            items, self._pending = self._pending, []
            if not items:
                raise self._error  # type: ignore[misc]
            left -= sum(ev.finished for _, ev in items)
            yield items

    async def events(self) -> AsyncIterator[Item]:
        """``(sample_index, event)`` one at a time (see :meth:`batches`)."""
        async for items in self.batches():
            for item in items:
                yield item


def _dispatch(batch: list[tuple[Request, list[Item], BaseException | None]]) -> None:
    for req, items, error in batch:
        req._deliver(items, error)


def _post(batch: list[tuple[Request, list[Item], BaseException | None]]) -> None:
    """From the model thread: one callback per event loop for everything in ``batch`` (never blocks)."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for entry in batch:
        by_loop.setdefault(entry[0]._loop, []).append(entry)
    for loop, entries in by_loop.items():
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is listening any more
            loop.call_soon_threadsafe(_dispatch, entries)


@dataclass
class SchedulerStats:
    steps: int = 0
    batched_steps: int = 0  # steps that decoded or prefilled more than one sequence
    max_active: int = 0
    tokens: int = 0
    requests: int = 0
    cancelled: int = 0


class Scheduler:
    """Continuous batching over ``engine.start(max_batch, max_len)``; start() launches the model thread."""

    def __init__(
        self,
        engine: Engine,
        max_batch: int = 8,
        max_len: int | None = None,
        observer: StepObserver | None = None,
        name: str = "model",
    ) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.max_len = max_len or engine.model.config.max_position_embeddings
        self.observer = observer
        self.name = name
        self.stats = SchedulerStats()
        self._session = engine.start(max_batch, self.max_len)
        lock = threading.RLock()
        self._cv = threading.Condition(lock)  # wakes the model thread: work arrived, or stop
        # Wakes retire(): a request left (finished, cancelled, failed) or the model thread ended. Its own
        # condition on the same lock, so a notify() meant for the model thread never lands on a retirer.
        self._settled = threading.Condition(lock)
        self._waiting: deque[tuple[Request, int]] = deque()  # (request, sample index) not yet in a slot
        self._live: dict[int, Request] = {}
        self._cancel: list[Request] = []
        self._calls: list[tuple[Callable[[], Any], concurrent.futures.Future]] = []
        self._ids = itertools.count()
        self._stop = False
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- public (any thread)

    def start(self) -> Scheduler:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"scheduler-{self.name}", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
            self._settled.notify_all()  # a retire() waiting on its requests has nothing left to wait for
        thread, self._thread = self._thread, None  # one local: retire() may stop concurrently with us
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def retire(self, timeout: float = 600.0) -> threading.Thread:
        """Stop once the requests already submitted have finished (at most ``timeout`` s from now), in a
        background thread: for a version replaced while it serves, whose new requests go elsewhere.
        Returns that thread (join it to wait for the retirement)."""

        def drained() -> bool:
            return self._stop or not (self._live or self._waiting or self._calls)

        def wait_then_stop() -> None:
            with self._cv:
                self._settled.wait_for(drained, timeout)
            self.stop()

        thread = threading.Thread(target=wait_then_stop, name=f"retire-{self.name}", daemon=True)
        thread.start()
        return thread

    def submit(self, prompt: Sequence[int], params: SamplingParams) -> Request:
        """Queue a prompt; call from the event loop that will read ``request.events()``."""
        req = Request(next(self._ids), prompt, params, asyncio.get_running_loop())
        with self._cv:
            if self._stop:  # no model thread will ever take it: fail it now rather than hang its handler
                _post([(req, [], RuntimeError("the server is shutting down"))])
                return req
            self._live[req.id] = req
            self._waiting.extend((req, j) for j in range(params.n))
            self.stats.requests += 1
            self._cv.notify()
        return req

    def cancel(self, req: Request) -> None:
        """Free the request's slots before the next step (idempotent; a finished request is a no-op)."""
        with self._cv:
            if req.id in self._live and not req.cancelled:
                req.cancelled = True
                self._cancel.append(req)
                self._cv.notify()

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn`` on the model thread between two steps; returns its future."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            self._calls.append((fn, fut))
            self._cv.notify()
        return fut

    @property
    def active(self) -> int:
        return self._session.active

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # ---------------------------------------------------------------- the model thread

    def _run(self) -> None:
        session = self._session
        while True:
            with self._cv:
                while not (self._stop or self._waiting or self._calls or self._cancel or session.active):
                    self._cv.wait()
                if self._stop:
                    break
                calls, self._calls = self._calls, []
                cancels, self._cancel = self._cancel, []
                if cancels:
                    gone = {r.id for r in cancels}
                    self._waiting = deque(x for x in self._waiting if x[0].id not in gone)
                admit = []
                while self._waiting and session.free_slots > len(admit):
                    admit.append(self._waiting.popleft())
            for fn, fut in calls:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as e:
                        fut.set_exception(e)
            if calls:  # retire() also waits for the calls queued before it
                self._settle()
            for req in cancels:
                for j in range(req.params.n):
                    session.remove((req.id, j))
                self._live.pop(req.id, None)
                self.stats.cancelled += 1
            if cancels:  # a handler still waiting on one (the client went away) must not wait forever
                _post([(req, [], Cancelled(f"request {req.id} was cancelled")) for req in cancels])
                self._settle()
            for req, j in admit:
                if req.cancelled or req.id not in self._live:
                    continue
                try:
                    session.add((req.id, j), req.prompt, req.params, sample_index=j)
                except (ValueError, RuntimeError) as e:  # a bad prompt or schema: fail the whole request
                    for k in range(req.params.n):
                        session.remove((req.id, k))
                    with self._cv:
                        self._waiting = deque(x for x in self._waiting if x[0].id != req.id)
                    self._live.pop(req.id, None)
                    _post([(req, [], e)])
                    self._settle()
            if not session.active:
                continue
            active = session.active
            t0 = time.perf_counter()
            try:
                events = session.step()
            except Exception as e:  # never leave handlers hanging: fail everyone in the batch
                self._fail_all(e)
                continue
            dt = time.perf_counter() - t0
            self.stats.steps += 1
            self.stats.batched_steps += active > 1
            self.stats.max_active = max(self.stats.max_active, active)
            if self.observer is not None:
                self.observer.observe_step(active, len(self._waiting), dt)
            out: dict[int, tuple[Request, list[Item], None]] = {}
            finished = False
            for ev in events:
                rid, j = ev.request_id
                req = self._live.get(rid)
                if req is None:
                    continue
                if ev.token_id is not None:
                    self.stats.tokens += 1
                out.setdefault(rid, (req, [], None))[1].append((j, ev))
                if ev.finished:
                    req.unfinished -= 1
                    if req.unfinished == 0:
                        self._live.pop(rid, None)
                        finished = True
            if out:
                _post(list(out.values()))
            if finished:  # after the post: a retirer woken here stops us only once the last events are out
                self._settle()
        self._fail_all(RuntimeError("the server is shutting down"))

    def _settle(self) -> None:
        """From the model thread, after requests left ``_live``: wake whoever waits in retire()."""
        with self._cv:
            self._settled.notify_all()

    def _fail_all(self, err: BaseException) -> None:
        for req in list(self._live.values()):
            for j in range(req.params.n):
                self._session.remove((req.id, j))
        _post([(req, [], err) for req in self._live.values()])
        self._live.clear()
        with self._cv:
            self._waiting.clear()
            self._settled.notify_all()
