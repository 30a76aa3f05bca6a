"""The one training-loop core. Pretraining, SFT, reward modelling, DPO, PPO and GRPO differ only in the
batches they feed it and the loss they compute.

What it owns: device and dtype (CPU fp32, CUDA bf16 autocast), ``torch.compile``, ``torch.distributed``
(DDP under ``torchrun``; gloo on CPU, NCCL on GPUs), gradient accumulation and clipping, the learning-rate
schedule, atomic checkpoints with exact resume, a JSONL metrics log and a progress bar.

Exact resume rests on one rule: a batch is a pure function of ``(step, micro_step, rank, world_size)``
(``batch_fn``), so restoring weights, optimizer state, RNG state and the step number replays the same run.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from chatforge.checkpoint import sweep_unfinished
from chatforge.config import TrainConfig, to_dict
from chatforge.errors import ChatforgeError
from chatforge.train.optim import Optimizers, build_optimizer, lr_multiplier

Batch = dict[str, torch.Tensor]
# loss_fn(model, batch) -> (scalar loss to minimise, extra metrics to log, number of tokens it covered)
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, float], int]]
BatchFn = Callable[[int, int, int, int], Batch]
SaveFn = Callable[[nn.Module, Path, dict[str, Any]], None]
LoadFn = Callable[[nn.Module, Path], None]
EvalFn = Callable[[nn.Module, int], dict[str, float]]

# torchrun relays the terminal's Ctrl-C to the ranks; a launcher that leaves them in the terminal's process
# group relays it to ranks that got it already. A second SIGINT this soon after the first is that same
# keypress, not a second one.
_RELAY_WINDOW_S = 2.0


@dataclass
class StepHook:
    """Runs ``fn(model, step)`` every ``every`` optimizer steps and at the end (model in eval mode, no
    grad); its numbers are logged as a ``event`` record of the metrics JSONL (during-training evals)."""

    every: int
    fn: EvalFn
    event: str = "eval_suite"


# ---------------------------------------------------------------- runtime: device, dtype, processes


@dataclass
class Runtime:
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: plain fp32
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Pick the device and dtype, and join the process group when launched by ``torchrun``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device == "auto":
        dev = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(cfg.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ChatforgeError("device: cuda was asked for but no CUDA GPU is available (use device=cpu)")
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device(f"cuda:{local}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype_name = cfg.dtype if cfg.dtype != "auto" else ("bf16" if dev.type == "cuda" else "fp32")
    autocast_dtype = torch.bfloat16 if dtype_name == "bf16" else None
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if world > 1 and not dist.is_initialized():
        # Explicit, and the same for both backends (torch's default is 30 min for gloo, 10 for NCCL).
        timeout = timedelta(seconds=cfg.dist_timeout_s)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", timeout=timeout)
        atexit.register(_leave_process_group)
    return Runtime(device=dev, autocast_dtype=autocast_dtype, rank=rank, world_size=world, local_rank=local)


def is_main_process() -> bool:
    """Rank 0 of a ``torchrun`` launch, or a plain single process: the one that writes a stage's outputs
    (usable before ``setup_runtime``, e.g. by a stage's ``run`` after its Trainer is gone)."""
    return int(os.environ.get("RANK", "0")) == 0


# How long the other ranks wait for work only rank 0 does: no real limit (a week). If rank 0 dies instead,
# torchrun stops the others.
_MAIN_WAIT = timedelta(days=7)
_main_wait: dict[str, Any] = {}  # the process group it belongs to, and the wait group


def _main_wait_group() -> Any:
    """A gloo group of every rank, to wait for rank 0 alone on: its own timeout, and on CPU, so no NCCL
    watchdog runs out either. Created once per process group; a collective (every rank calls it)."""
    if _main_wait.get("world") is not dist.group.WORLD:
        _main_wait.update(world=dist.group.WORLD, group=dist.new_group(backend="gloo", timeout=_MAIN_WAIT))
    return _main_wait["group"]


# The last few tensors handed to an all-reduce, for the exit handler to wait on (see ``all_reduce``).
_reduced: deque[torch.Tensor] = deque(maxlen=8)


def all_reduce(t: torch.Tensor, op: Any = None) -> None:
    """``dist.all_reduce`` in place, noting ``t`` for the exit handler.

    Gloo's worker thread lets go of a finished collective's tensors a moment after the caller's wait
    returns, and letting go of a tensor that Python made needs the GIL. If that moment falls after the
    interpreter has begun to shut down, the thread cannot get the GIL, is unwound out of a C++ destructor
    and the rank aborts ("terminate called without an active exception") after a run that finished: under
    load, about one torchrun in twelve, with the final stop check as the run's last collective.
    """
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op)
    _reduced.append(t)


def _leave_process_group() -> None:
    # Wait (bounded) until no worker thread still holds a tensor we reduced: the count is ours alone then.
    deadline = time.monotonic() + 10.0
    while _reduced and time.monotonic() < deadline:
        if _reduced[0]._use_count() <= 1:
            _reduced.popleft()
        else:
            time.sleep(0.001)  # releases the GIL, which the worker needs to let go
    _reduced.clear()
    if dist.is_initialized():
        dist.destroy_process_group()
    _main_wait.clear()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    st: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# ---------------------------------------------------------------- metrics log


class MetricsLog:
    """Append-only JSONL of events; on resume, entries after the restored step are dropped."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int, redo_step: bool = False) -> None:
        """Drop the records after ``step``; with ``redo_step`` also that step's evaluations (the run was
        stopped during its final evaluation, which the resumed run does again)."""
        if not (self.enabled and self.path.exists()):
            return
        kept = []
        for ln in self.path.read_text().splitlines():
            rec = _parse_line(ln)
            # A line that does not parse is a record torn by the crash being resumed from: drop it.
            if rec is None or rec.get("step", 0) > step:
                continue
            if redo_step and rec.get("step", 0) == step and rec.get("event") != "train":
                continue
            kept.append(ln)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(ln + "\n" for ln in kept))
        os.replace(tmp, self.path)

    def reset(self) -> None:
        if self.enabled and self.path.exists():
            self.path.unlink()

    def log(self, event: str, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        rec = {"event": event, "step": step, "time": round(time.time(), 3), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def _parse_line(ln: str) -> dict[str, Any] | None:
    if not ln.strip():
        return None
    try:
        rec = json.loads(ln)
    except json.JSONDecodeError:
        return None
    return rec if isinstance(rec, dict) else None


def read_metrics(path: str | Path, event: str | None = None) -> list[dict[str, Any]]:
    """The records of a metrics JSONL. A torn last line (a run killed mid-write) is skipped; a corrupt line
    anywhere else is a one-line error naming it."""
    p = Path(path)
    if not p.exists():
        return []
    lines = p.read_text().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    recs = []
    for i, ln in enumerate(lines, 1):
        rec = _parse_line(ln)
        if rec is None and ln.strip():
            if i == len(lines):
                break
            raise ChatforgeError(f"{p}:{i}: not a JSON record (corrupt metrics log?)")
        if rec is not None:
            recs.append(rec)
    return [r for r in recs if event is None or r.get("event") == event]


# ---------------------------------------------------------------- what a run learns from

_SAMPLE = 1 << 20  # bytes read from each end of a large file


def fingerprint(*parts: Any) -> str:
    """A short hash of what a run learns from: arrays, strings, numbers, files (a large file by its size
    and its first and last MiB, so a multi-GB shard costs milliseconds), and lists of these. The Trainer
    keeps it in every checkpoint and refuses to resume one that was trained on other inputs."""
    h = hashlib.sha256()

    def add(x: Any) -> None:
        if isinstance(x, np.ndarray):
            h.update(f"a{x.dtype}{x.shape}".encode())
            h.update(np.ascontiguousarray(x).tobytes())
        elif isinstance(x, torch.Tensor):
            x = x.detach().cpu()
            add((x.float() if x.dtype == torch.bfloat16 else x).numpy())
        elif isinstance(x, Path):
            size = x.stat().st_size if x.is_file() else -1
            h.update(f"f{size}".encode())
            if size > 0:
                with x.open("rb") as f:
                    h.update(f.read(_SAMPLE))
                    if size > 2 * _SAMPLE:
                        f.seek(size - _SAMPLE)
                        h.update(f.read(_SAMPLE))
        elif isinstance(x, list | tuple) and all(type(y) in (int, float, str, bool) for y in x):
            h.update(f"v{x!r}".encode())  # token ids and the like: one update, not one per item
        elif isinstance(x, list | tuple):
            h.update(f"l{len(x)}".encode())
            for y in x:
                add(y)
        elif isinstance(x, dict):
            add(sorted(x.items(), key=lambda kv: str(kv[0])))
        else:
            h.update(f"s{x!r}".encode())

    for p in parts:
        add(p)
    return h.hexdigest()[:16]


def model_fingerprint(model_dir: str | Path) -> str:
    """``fingerprint`` of a saved model's weights file (a reward model an RL run scores with)."""
    return fingerprint(Path(model_dir) / "model.safetensors")


def weights_fingerprint(model: nn.Module) -> str:
    """``fingerprint`` of a model's start weights, before training: each tensor's name, shape and first
    4096 values (training moves every tensor, so that tells two checkpoints apart at any size)."""
    return fingerprint(
        [
            (k, tuple(v.shape), v.detach().reshape(-1)[:4096].float().cpu())
            for k, v in model.state_dict().items()
        ]
    )


# ---------------------------------------------------------------- the trainer


class Trainer:
    """Runs ``cfg.steps`` optimizer steps of ``loss_fn`` over ``batch_fn``'s batches in ``work_dir``.

    ``work_dir`` receives ``metrics.jsonl`` and ``checkpoints/step_XXXXXXX`` (written by ``save_fn``, with
    ``train_state.pt`` inside); ``checkpoints/latest`` names the newest complete one, so a run killed at any
    moment resumes from it.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        work_dir: str | Path,
        *,
        loss_fn: LossFn,
        batch_fn: BatchFn,
        save_fn: SaveFn,
        load_fn: LoadFn,
        evaluate: EvalFn | None = None,
        hooks: Sequence[StepHook] = (),
        runtime: Runtime | None = None,
        desc: str = "train",
        flops_per_token: float = 0.0,
        resume_every: int = 1,
        inputs: dict[str, str] | None = None,
        find_unused_parameters: bool = False,
    ) -> None:
        self.cfg = cfg
        # What this run learns from ({"data": fingerprint(...), "init": model_fingerprint(...)}): a
        # checkpoint saved with other inputs is not resumed (its weights belong to another run).
        self.inputs = dict(inputs or {})
        # Only a step that is a multiple of this replays exactly from a checkpoint (RL: an iteration's
        # boundary; mid-iteration the rollouts it learns from would be redrawn from changed weights).
        self.resume_every = max(1, resume_every)
        self.rt = runtime or setup_runtime(cfg)
        self.work_dir = Path(work_dir)
        self.loss_fn, self.batch_fn, self.evaluate = loss_fn, batch_fn, evaluate
        self.hooks = list(hooks)
        self.save_fn, self.load_fn = save_fn, load_fn
        self.desc = desc
        self.flops_per_token = flops_per_token
        self.model = model.to(self.rt.device)
        self.optimizer: Optimizers = build_optimizer(self.model, cfg)
        self.metrics = MetricsLog(self.work_dir / "metrics.jsonl", enabled=self.rt.is_main)
        self.step = 0
        self.tokens = 0
        self.elapsed = 0.0
        self._updating = False
        # A deferred stop (SIGTERM; Ctrl-C under torchrun) only notes the time here; the run stops at the
        # next step boundary (under torchrun the ranks agree on it there).
        self._stop_asked_at: float | None = None
        self._stop_agreed = False
        self._wait_group: Any = None
        wrapped: nn.Module = self.model
        if self.rt.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.rt.device.index] if self.rt.device.type == "cuda" else None
            # A model that leaves some weights out of its loss (a classifier on a backbone whose LM head it
            # never calls) must say so, or DDP's gradient all-reduce waits for them and fails on step 2.
            wrapped = DDP(self.model, device_ids=ids, find_unused_parameters=find_unused_parameters)
            self._wait_group = _main_wait_group()
        if cfg.compile:
            wrapped = torch.compile(wrapped)  # type: ignore[assignment]
        self.train_model = wrapped

    def _wait_for_main(self) -> None:
        """Hold every rank here until rank 0 arrives, however long its own work (hooks, a checkpoint write)
        takes: waiting in the next training collective instead fails after ``dist_timeout_s``."""
        if self.rt.distributed:
            dist.barrier(group=self._wait_group)

    # ---- checkpoints

    @property
    def ckpt_dir(self) -> Path:
        return self.work_dir / "checkpoints"

    def latest_checkpoint(self) -> Path | None:
        pointer = self.ckpt_dir / "latest"
        if not pointer.is_file():
            return None
        path = self.ckpt_dir / pointer.read_text().strip()
        return path if (path / "train_state.pt").is_file() else None

    def train_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "elapsed": self.elapsed,
            "optimizer": self.optimizer.state_dict(),
            "rng": _rng_state(),
            "world_size": self.rt.world_size,
            "config": to_dict(self.cfg),
            "inputs": self.inputs,
        }

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoints/step_N`` atomically, then move the ``latest`` pointer (also atomically)."""
        path = self.ckpt_dir / f"step_{self.step:07d}"
        if self.rt.is_main:
            try:
                self.save_fn(self.model, path, self.train_state())
                tmp = self.ckpt_dir / "latest.tmp"
                tmp.write_text(path.name)
                os.replace(tmp, self.ckpt_dir / "latest")
            except OSError as e:  # a full disk, a read-only folder: the write was atomic, nothing is torn
                last = self.latest_checkpoint()
                kept = f"the last good one, {last.name}, is intact" if last else "there is no earlier one"
                raise ChatforgeError(
                    f"{self.desc}: cannot write the checkpoint at step {self.step} in {self.ckpt_dir}"
                    f" ({e.strerror or e}); {kept}: free the space and run again to resume"
                ) from None
            old = sorted(p for p in self.ckpt_dir.glob("step_*") if p.is_dir() and p != path)
            for p in old[: max(0, len(old) - (self.cfg.keep_checkpoints - 1))]:
                shutil.rmtree(p, ignore_errors=True)
        self._wait_for_main()
        return path

    def resume(self) -> bool:
        """Restore the newest checkpoint in ``work_dir``, if any. Returns whether it did."""
        path = self.latest_checkpoint()
        if path is None:
            return False
        state = torch.load(path / "train_state.pt", map_location="cpu", weights_only=False)
        saved_world = state.get("world_size", 1)
        if saved_world != self.rt.world_size:
            # Say how: a run saved by torchrun is resumed by torchrun, a single-process one by plain python.
            how = (
                f"under torchrun --nproc_per_node={saved_world}"
                if saved_world > 1
                else "in one process (without torchrun)"
            )
            raise ChatforgeError(
                f"{path}: saved with {saved_world} process(es), resuming with {self.rt.world_size}; resume"
                f" {how} for an exact replay (each process's batches depend on the count), or start over"
                " with --fresh"
            )
        before = state.get("inputs") or {}  # absent in checkpoints older than this check
        moved = [k for k in self.inputs if k in before and before[k] != self.inputs[k]]
        if moved:
            what = {"data": "training data", "init": "start model", "reward": "reward model"}
            raise ChatforgeError(
                f"{path}: this {self.desc} checkpoint was trained on other inputs"
                f" ({', '.join(what.get(k, k) for k in moved)} changed since it was saved);"
                " run with --fresh to start over, or restore them to resume"
            )
        saved = state.get("config", {})
        changed = [
            k for k, v in to_dict(self.cfg).items() if k in saved and saved[k] != v and k != "progress"
        ]
        if changed and self.rt.is_main:
            print(
                f"{self.desc}: resuming {path.name} with changed settings: {', '.join(changed)}",
                file=sys.stderr,
            )
        if state["step"] > self.cfg.steps:  # it would "finish" at once with more steps than asked for
            raise ChatforgeError(
                f"{path}: a checkpoint at step {state['step']}, past {self.desc}'s steps={self.cfg.steps};"
                " run with --fresh to train the shorter run from the start"
            )
        self.load_fn(self.model, path)
        self.optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
        self.step, self.tokens, self.elapsed = state["step"], state["tokens"], state["elapsed"]
        # At the last step only the final evaluation is left to do, and it is done again.
        self.metrics.truncate_after(self.step, redo_step=self.step == self.cfg.steps)
        return True

    # ---- one optimizer step

    def _to_device(self, batch: Batch) -> Batch:
        nb = self.rt.device.type == "cuda"
        return {
            k: v.to(self.rt.device, non_blocking=nb) if torch.is_tensor(v) else v for k, v in batch.items()
        }

    def train_step(self) -> dict[str, float]:
        """Accumulate ``grad_accum`` micro-batches, clip, and step the optimizer once."""
        cfg, rt = self.cfg, self.rt
        self.model.train()
        lr_mult = lr_multiplier(self.step, cfg)
        self.optimizer.set_lr_multiplier(lr_mult)
        totals: dict[str, float] = {}
        n_tokens = 0
        loss_sum = torch.zeros((), device=rt.device)
        for micro in range(cfg.grad_accum):
            batch = self._to_device(self.batch_fn(self.step, micro, rt.rank, rt.world_size))
            last = micro == cfg.grad_accum - 1
            # Skip DDP's gradient all-reduce on all but the last micro-batch.
            sync = contextlib.nullcontext() if (last or not rt.distributed) else self.train_model.no_sync()  # type: ignore[operator]
            with sync, rt.autocast():
                loss, extra, ntok = self.loss_fn(self.train_model, batch)
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach()
            n_tokens += ntok
            for k, v in extra.items():
                totals[k] = totals.get(k, 0.0) + float(v) / cfg.grad_accum
        grad_norm = 0.0
        if cfg.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip))
        # From here until the step counter moves, weights and optimizer state are part-way between two
        # steps: an interrupt that lands here must not be saved as a checkpoint of either.
        self._updating = True
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_val = loss_sum / cfg.grad_accum
        if rt.distributed:
            # The step's one all-reduce also carries whether any rank saw Ctrl-C: all of them then stop
            # after this step, together, at no extra cost.
            stop = float(self._stop_asked_at is not None)
            # So do the loss function's extras (every rank's loss function returns the same keys): the
            # log then shows the mean over all processes' rows, not rank 0's alone.
            keys = sorted(totals)
            vals = [loss_val.item(), float(n_tokens), stop, *(totals[k] for k in keys)]
            stats = torch.tensor(vals, dtype=torch.float64, device=rt.device)
            all_reduce(stats)
            summed = stats.tolist()  # one copy to the host, not one sync per value
            loss_f, n_tokens = summed[0] / rt.world_size, int(summed[1])
            self._stop_agreed = summed[2] > 0
            totals = {k: summed[3 + i] / rt.world_size for i, k in enumerate(keys)}
        else:
            loss_f = loss_val.item()
            self._stop_agreed = self._stop_asked_at is not None
        if not math.isfinite(loss_f):
            self._updating = False
            raise ChatforgeError(
                f"{self.desc}: loss became {loss_f} at step {self.step}; lower the learning rate"
                " or check the data (the last good checkpoint is kept)"
            )
        self.step += 1
        self.tokens += n_tokens
        self._updating = False
        return {
            "loss": loss_f,
            "grad_norm": grad_norm,
            "lr_mult": lr_mult,
            "tokens": n_tokens,
            **totals,
        }

    # ---- the loop

    def run_eval(self) -> dict[str, float]:
        if self.evaluate is None:
            return {}
        self.model.eval()
        with torch.no_grad(), self.rt.autocast():
            res = self.evaluate(self.model, self.step)
        self.model.train()
        self.metrics.log("eval", self.step, tokens_seen=self.tokens, elapsed_s=round(self.elapsed, 3), **res)
        return res

    def run_hooks(self, final: bool = False) -> bool:
        """Run the hooks due at this step (on rank 0; the other ranks wait for it); whether any were due."""
        due = [h for h in self.hooks if final or self.step % h.every == 0]
        for h in due if self.rt.is_main else []:
            self.model.eval()
            with torch.no_grad(), self.rt.autocast():
                res = h.fn(self.model, self.step)
            self.model.train()
            self.metrics.log(h.event, self.step, tokens_seen=self.tokens, **res)
        if due:
            self._wait_for_main()
        return bool(due)

    def fit(self, resume: bool = True) -> dict[str, Any]:
        with self._stops_deferred():
            return self._fit(resume)

    @contextlib.contextmanager
    def _stops_deferred(self) -> Iterator[None]:
        """SIGTERM (``kill``, a scheduler's time limit, ``docker stop``, torchrun passing one on) and, under
        torchrun, Ctrl-C only ask to stop: the run stops at the next step boundary where a checkpoint
        replays exactly, saves it, and exits as if interrupted; under torchrun all ranks stop at the same
        step and save one checkpoint together. A second signal of the same kind stops at once."""
        self._stop_asked_at, self._stop_agreed = None, False
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def ask_to_stop(signum: int, frame: Any) -> None:
            now = time.monotonic()
            if self._stop_asked_at is None:
                self._stop_asked_at = now
                if self.rt.is_main:
                    why = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
                    again = "Ctrl-C again" if signum == signal.SIGINT else f"a second {why}"
                    who = "every process" if self.rt.distributed else "the run"
                    # os.write, not print: this can run in the middle of another write to stderr.
                    note = f"\n{self.desc}: {why}: stopping {who} after this step ({again} stops at once)\n"
                    os.write(2, note.encode())
            elif now - self._stop_asked_at > _RELAY_WINDOW_S:
                raise KeyboardInterrupt

        wanted = [signal.SIGTERM]
        if self.rt.distributed:  # on one process Ctrl-C stops at once, as a user at a terminal expects
            wanted.append(signal.SIGINT)
        # A signal that is ignored (SIGINT in a background job) or has a caller's handler is left as it is.
        expected = {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.default_int_handler}
        previous = {
            sig: signal.signal(sig, ask_to_stop) for sig in wanted if signal.getsignal(sig) is expected[sig]
        }
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _agree_stop(self) -> bool:
        """Whether any rank saw Ctrl-C (a collective: every rank calls it at the same point)."""
        flag = torch.tensor([float(self._stop_asked_at is not None)], device=self.rt.device)
        all_reduce(flag, op=dist.ReduceOp.MAX)
        self._stop_agreed = flag.item() > 0
        return self._stop_agreed

    def _interrupted(self) -> None:
        """On Ctrl-C: save a checkpoint where one replays exactly and say where the next run starts. Under
        torchrun every rank calls this at the same step (the save is collective), unless a second Ctrl-C
        stopped this rank at once: then it saves nothing, as the others may be anywhere."""
        together = not self.rt.distributed or self._stop_agreed
        # A checkpoint here must replay exactly: not half-way through an optimizer update, nor inside an RL
        # iteration (its rollouts would be redrawn from changed weights).
        where = ""
        if self._updating:
            where = "during an optimizer update"
        elif self.step % self.resume_every:
            where = f"inside an iteration of {self.resume_every} steps"
        elif not together:
            where = "stopped at once by a second Ctrl-C"
        msg = ""
        if self.step > 0 and not where:
            self.save_checkpoint()
            msg = f"\ninterrupted: checkpoint saved at step {self.step}; run again to resume"
        elif where:
            last = self.latest_checkpoint()
            then = f"resumes from {last.name}" if last else "starts over"
            exact = " (a checkpoint there would not replay exactly)" if together else ""
            msg = f"\ninterrupted at step {self.step}, {where}{exact}; the next run {then}"
        if msg and self.rt.is_main:
            print(msg, file=sys.stderr)
        if together:
            self._wait_for_main()  # rank 0 has said it before any rank exits (torchrun then stops the rest)

    def _fit(self, resume: bool) -> dict[str, Any]:
        cfg = self.cfg
        if self.rt.is_main and self.ckpt_dir.is_dir():
            sweep_unfinished(self.ckpt_dir)  # half-written folders of a save that was killed
        resumed = self.resume() if resume else False
        if not resumed:
            self.metrics.reset()
            self.metrics.log("start", 0, config=to_dict(cfg), world_size=self.rt.world_size)
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            desc=self.desc,
            disable=not (self.rt.is_main and cfg.progress),
            dynamic_ncols=True,
            file=sys.stderr,
            mininterval=0.5 if sys.stderr.isatty() else 10.0,
        )
        last_eval: dict[str, float] = {}
        window_t, window_tok = time.perf_counter(), 0
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                out = self.train_step()
                self.elapsed += time.perf_counter() - t0
                window_tok += int(out["tokens"])
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    dt = max(time.perf_counter() - window_t, 1e-9)
                    tps = window_tok / dt
                    rec = {
                        **out,
                        "tokens_per_s": round(tps, 1),
                        "tokens_seen": self.tokens,
                        "elapsed_s": round(self.elapsed, 3),
                    }
                    if self.flops_per_token:
                        rec["flops_per_s"] = tps * self.flops_per_token
                    self.metrics.log("train", self.step, **rec)
                    bar.set_postfix(loss=f"{out['loss']:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
                    window_t, window_tok = time.perf_counter(), 0
                # A stop was asked for (under torchrun: on some rank; all of them agree after the same
                # step). An RL iteration is finished first: a checkpoint inside one would not replay.
                if self._stop_agreed and self.step % self.resume_every == 0:
                    raise KeyboardInterrupt
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    last_eval = self.run_eval()
                    window_t = time.perf_counter()  # evaluation is not training time
                if self.hooks and self.step < cfg.steps and self.run_hooks():
                    window_t = time.perf_counter()
                if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.step < cfg.steps:
                    self.save_checkpoint()
                    window_t = time.perf_counter()
        except KeyboardInterrupt:
            bar.close()
            self._interrupted()
            raise
        bar.close()
        last_eval = self.run_eval() or last_eval
        self.run_hooks(final=True)
        # A stop asked for during the final evaluation: save the finished steps' checkpoint and stop there.
        if self._agree_stop() if self.rt.distributed else self._stop_asked_at is not None:
            self._interrupted()
            raise KeyboardInterrupt
        self.metrics.log(
            "end", self.step, tokens_seen=self.tokens, elapsed_s=round(self.elapsed, 3), **last_eval
        )
        return {
            "steps": self.step,
            "tokens": self.tokens,
            "elapsed_s": self.elapsed,
            "resumed": resumed,
            **last_eval,
        }

    def cleanup_checkpoints(self) -> None:
        """Drop intermediate checkpoints once the final model is saved elsewhere."""
        if self.rt.is_main and self.ckpt_dir.exists():
            shutil.rmtree(self.ckpt_dir, ignore_errors=True)
