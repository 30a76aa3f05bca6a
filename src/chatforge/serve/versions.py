"""Named model versions served side by side, with a promotion history for switch / promote / rollback.

Each version is a checkpoint directory (e.g. ``runs/x/base``, ``runs/x/sft``) with its own engine and
continuous-batching scheduler, so two versions can answer one compare-mode prompt at the same time. The
*active* version (what ``model: "default"`` and the UI get) is the newest promotion in the database that
has not been rolled back; ``rollback`` undoes the newest one, restoring the version before it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from chatforge.engine import Engine
from chatforge.errors import ChatforgeError
from chatforge.serve.db import Database
from chatforge.serve.scheduler import Scheduler, StepObserver

DEFAULT_ALIASES = ("default", "chatforge")  # model names that mean "the active version"


@dataclass
class Version:
    name: str
    path: str
    engine: Engine
    scheduler: Scheduler

    @property
    def context(self) -> int:
        return self.scheduler.max_len


class Versions:
    def __init__(
        self,
        db: Database,
        max_batch: int = 8,
        max_len: int = 0,
        device: str = "auto",
        observer: StepObserver | None = None,
        compile: bool = False,
    ) -> None:
        self.db = db
        self.max_batch, self.max_len, self.device = max_batch, max_len, device
        self.compile = compile
        self.observer = observer
        self._loaded: dict[str, Version] = {}
        self._lock = threading.Lock()

    def add(self, name: str, path: str | Path, promote: bool = False) -> Version:
        """Load ``path`` as version ``name`` (replacing one of that name) and start its scheduler."""
        from chatforge.sample import load_engine

        if not name or name in DEFAULT_ALIASES or "/" in name:
            raise ChatforgeError(f"version name {name!r}: must be non-empty, without '/', not 'default'")
        if len(name) > 100:  # what the database's version columns (and a vote's model_a / model_b) hold
            raise ChatforgeError(f"version name {name[:20]!r}...: at most 100 characters, got {len(name)}")
        engine = load_engine(path, device=self.device, compile=self.compile)
        ctx = engine.model.config.max_position_embeddings
        max_len = min(self.max_len, ctx) if self.max_len else ctx
        if self.compile:  # build the decode graph now, not on the first request (sizes are dynamic)
            engine.start(self.max_batch, 8).warmup()
        sched = Scheduler(engine, self.max_batch, max_len, observer=self.observer, name=name).start()
        version = Version(name, str(path), engine, sched)
        with self._lock:
            old = self._loaded.get(name)
            self._loaded[name] = version
        if old is not None:  # requests it is serving finish there; new ones already get the new one
            old.scheduler.retire()
        self.db.register_version(name, str(path))
        if promote or self.active_name() is None:
            self.db.promote(name, by="startup" if not promote else "admin")
        return version

    def names(self) -> list[str]:
        return list(self._loaded)

    def active_name(self) -> str | None:
        """The newest promotion not rolled back whose version is loaded here."""
        for p in reversed(self.db.promotion_stack()):
            if p.version in self._loaded:
                return p.version
        return None

    def get(self, name: str | None) -> Version:
        """A version by name; None or "default" is the active one. KeyError when there is no such one."""
        if name is None or name in DEFAULT_ALIASES:
            name = self.active_name()
            if name is None:
                raise KeyError("default")
        v = self._loaded.get(name)
        if v is None:
            raise KeyError(name)
        return v

    def promote(self, name: str, by: str = "admin") -> str:
        if name not in self._loaded:
            raise KeyError(name)
        self.db.promote(name, by=by)
        return name

    def rollback(self) -> str:
        return self.db.rollback(loaded=set(self._loaded))

    def close(self) -> None:
        for v in self._loaded.values():
            v.scheduler.stop()
