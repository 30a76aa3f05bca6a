"""``chatforge scaling``: predict a big run's loss from a ladder of small ones, then check it.

1. **Ladder** (IsoFLOP profiles): for each compute budget C and model shape with N non-embedding
   parameters (the output head counts: it is a real matmul per token), train on D = C/(6N) tokens with the
   same schedule shape, decayed to the end of each run, and evaluate on the same fixed held-out tokens.
   Each rung trains on the shared loop core (``train.loop.Trainer`` with pretraining's batches and loss)
   in ``<run>/scaling/<rung>/`` (``metrics.jsonl``, checkpoints) and ends with ``result.json``: finished
   rungs are skipped on a rerun, an interrupted one resumes from its checkpoint. ``scaling.workers``
   rungs train at once, in separate processes; ``scaling.seeds`` > 1 trains each rung again with other
   seeds, which measures the ladder's own noise.
2. **Predict**: fit L(N, D) and L(C) (``scaling_fit``), bootstrap the rungs for intervals, and write the
   target's predicted loss (and downstream metric) to ``<run>/scaling/prediction.json`` with a timestamp —
   before the target trains. An existing prediction for the same ladder and target is never rewritten.
3. **Check**: train the target (``<run>/scaling/target/``, its model in ``target/model``) and compare.
   Plots and ``scaling.json`` / ``scaling.md`` go to ``<run>/scaling/``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import torch
from torch import nn

from chatforge import scaling_fit as sf
from chatforge.checkpoint import load_weights, save_model
from chatforge.config import ModelConfig, RunConfig, ScalingConfig, parse_model_shape, to_dict
from chatforge.data.corpus import TokenShards
from chatforge.data.world import text_version
from chatforge.errors import ChatforgeError
from chatforge.model import GPT, lm_loss
from chatforge.tokenizer import Tokenizer
from chatforge.train.loop import Trainer, read_metrics, seed_everything, setup_runtime
from chatforge.train.pretrain import lm_batch_fn, lm_loss_fn, model_config_for

UNTIL = ("ladder", "predict", "check")


# ---------------------------------------------------------------- planning


@dataclass(frozen=True)
class Rung:
    """One training run of the ladder (or the target)."""

    name: str
    budget: float  # the FLOPs asked for; ``compute`` is what the whole steps actually give
    shape: str  # "LAYERSxWIDTH"
    n_params: int  # non-embedding parameters (output head included)
    steps: int
    tokens: int
    replicate: int = 0  # > 0: the same run again with training seed train.seed + replicate

    @property
    def compute(self) -> float:
        return 6.0 * self.n_params * self.tokens


def shape_config(sc: ScalingConfig, shape: str, vocab_size: int) -> ModelConfig:
    """The one model family of the ladder: depth × width, heads of ``head_dim``, SwiGLU ``ffn_mult``."""
    layers, width = parse_model_shape("scaling.sizes", shape)
    heads = width // sc.head_dim
    return model_config_for(
        ModelConfig(
            hidden_size=width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            intermediate_size=max(8, round(sc.ffn_mult * width / 8) * 8),
            max_position_embeddings=sc.train.seq_len,
        ),
        vocab_size,
    )


def count_params(mc: ModelConfig) -> int:
    with torch.device("meta"):  # shapes only, no memory or init time
        return GPT(mc).num_params(non_embedding=True)


def _budget_tag(c: float) -> str:
    mant, exp = f"{c:.2e}".split("e")
    return f"{float(mant):g}e{int(exp)}"


def plan_ladder(sc: ScalingConfig, vocab_size: int) -> list[Rung]:
    """Every (budget, size) rung with at least ``min_steps`` steps and ``min_tokens_per_param`` tokens per
    parameter, smallest budget first, each followed by its ``seeds`` − 1 replicates (``<name>-seed<k>``)."""
    per_step = sc.train.batch_size * sc.train.grad_accum * sc.train.seq_len
    sizes = {s: count_params(shape_config(sc, s, vocab_size)) for s in sc.sizes}
    rungs = []
    for c in sorted(sc.budgets):
        row = []
        for shape, n in sorted(sizes.items(), key=lambda kv: kv[1]):
            steps = round(c / (6 * n) / per_step)
            if steps >= sc.min_steps and steps * per_step >= sc.min_tokens_per_param * n:
                row.append(Rung(f"{_budget_tag(c)}-{shape}", c, shape, n, steps, steps * per_step))
        if len(row) < 2:
            raise ChatforgeError(
                f"scaling.budgets[{sc.budgets.index(c)}]: {c:.3g} FLOPs gives only {len(row)} of scaling.sizes"
                f" at least scaling.min_steps ({sc.min_steps}) steps of {per_step} tokens and"
                f" scaling.min_tokens_per_param ({sc.min_tokens_per_param:g}); raise the budget or add smaller"
                " sizes"
            )
        for r in row:
            rungs.append(r)
            rungs += [
                dataclasses.replace(r, name=f"{r.name}-seed{k}", replicate=k) for k in range(1, sc.seeds)
            ]
    return rungs


def plan_target(sc: ScalingConfig, vocab_size: int) -> Rung:
    per_step = sc.train.batch_size * sc.train.grad_accum * sc.train.seq_len
    n = count_params(shape_config(sc, sc.target_size, vocab_size))
    # Relative to the largest rung's actual compute (whole steps can round it above its budget).
    c = sc.target_mult * max(r.compute for r in plan_ladder(sc, vocab_size))
    steps = max(1, math.ceil(c / (6 * n) / per_step))  # at least the asked-for compute
    return Rung("target", c, sc.target_size, n, steps, steps * per_step)


# ---------------------------------------------------------------- data and evaluation


class _Data:
    """What every rung shares: tokenizer, train shards, the fixed validation tokens, downstream items."""

    def __init__(self, cfg: RunConfig) -> None:
        run_dir = cfg.run_dir
        if (
            not (run_dir / "data" / "index.json").is_file()
            or not (run_dir / "tokenizer" / "tokenizer.json").is_file()
        ):
            _prepare_data(cfg)
        _check_data_stamp(cfg)
        sc = cfg.scaling
        self.tok = Tokenizer.load(run_dir / "tokenizer")
        if self.tok.vocab_size > cfg.tokenizer.vocab_size:
            raise ChatforgeError(
                f"{run_dir}/tokenizer has {self.tok.vocab_size} tokens, tokenizer.vocab_size is"
                f" {cfg.tokenizer.vocab_size}: remove {run_dir}/data and {run_dir}/tokenizer to rebuild them"
            )
        self.train = TokenShards(run_dir / "data", "train")
        val = TokenShards(run_dir / "data", "val")
        n_win = max(1, sc.val_tokens // sc.train.seq_len)
        wins = list(val.iter_windows(sc.train.seq_len + 1, max_windows=n_win))
        if len(wins) < n_win:
            raise ChatforgeError(
                f"{run_dir}/data: the validation split has {val.n_tokens} tokens, scaling.val_tokens asks for"
                f" {sc.val_tokens}; lower scaling.val_tokens or raise data.val_fraction"
            )
        self.val = torch.from_numpy(np.stack(wins).astype(np.int64))
        self.kind = _downstream_kind(cfg)
        self.cloze: list[dict[str, Any]] = []
        if self.kind == "world_cloze":
            from chatforge.data.corpus import source_world
            from chatforge.evals.world_cloze import cloze_items

            src = next(s for s in cfg.data.sources if s.kind == "world")
            self.cloze = cloze_items(source_world(src), "eval", sc.cloze_choices, top=sc.cloze_entities)
            if not self.cloze:
                raise ChatforgeError("scaling.downstream: the world has no facts to build cloze items from")
        # Chance level of the downstream metric: the floor of its sigmoid in the loss.
        self.chance = 1.0 / sc.cloze_choices if self.kind == "world_cloze" else 0.0

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch_size: int) -> dict[str, float]:
        """Validation loss (and next-token accuracy) on the fixed windows, plus the downstream metric."""
        device = next(model.parameters()).device
        total, correct, count = 0.0, 0, 0
        for i in range(0, len(self.val), batch_size):
            w = self.val[i : i + batch_size].to(device)
            logits = model(w[:, :-1])
            total += float(lm_loss(logits, w[:, 1:])) * w.shape[0]
            correct += int((logits.argmax(-1) == w[:, 1:]).sum())
            count += w.shape[0]
        out = {
            "val_loss": round(total / count, 5),
            "token_accuracy": round(correct / (count * (self.val.shape[1] - 1)), 5),
        }
        if self.kind == "world_cloze":
            from chatforge.evals.world_cloze import cloze_accuracy

            out["world_cloze"] = round(cloze_accuracy(model, self.tok, self.cloze), 5)
        return out


def _downstream_kind(cfg: RunConfig) -> str:
    kind = cfg.scaling.downstream
    has_world = any(s.kind == "world" for s in cfg.data.sources)
    if kind == "auto":
        return "world_cloze" if has_world else "token_accuracy"
    if kind == "world_cloze" and not has_world:
        raise ChatforgeError("scaling.downstream: world_cloze needs a world source in data.sources")
    return kind


def _check_data_stamp(cfg: RunConfig) -> None:
    """Refuse shards built for another ``data``/``tokenizer`` config (or world text version): the rungs
    would silently train on the old corpus (``_prepare_data`` only runs when there are no shards)."""
    stamp = cfg.run_dir / "scaling" / "data_config.json"
    want = {"data": to_dict(cfg.data), "tokenizer": to_dict(cfg.tokenizer), **text_version(cfg.data.sources)}
    if stamp.is_file():
        if _read_json(stamp) != json.loads(json.dumps(want)):
            raise ChatforgeError(
                f"{cfg.run_dir}/data was built for another data or tokenizer config or world text version"
                f" ({stamp}): remove"
                f" {cfg.run_dir}/data, {cfg.run_dir}/tokenizer and {stamp} to rebuild them"
            )
        return
    # No stamp yet: shards a speedrun made record their config's hash in stages.json (a run directory of
    # another recipe, or the same recipe with other data settings).
    book = cfg.run_dir / "stages.json"
    if book.is_file():
        from chatforge.speedrun import STAGES, _hash, _read_book

        made = (_read_book(book, lambda _msg: None).get("tokenizer") or {}).get("hash")
        if made is not None and made != _hash(cfg, STAGES["tokenizer"][0]):
            raise ChatforgeError(
                f"{cfg.run_dir}/data was built by a speedrun with another data or tokenizer config ({book});"
                f" use another --name, or remove {cfg.run_dir}/data and {cfg.run_dir}/tokenizer to rebuild them"
            )
    stamp.parent.mkdir(parents=True, exist_ok=True)
    _write_json(stamp, want)


def _prepare_data(cfg: RunConfig) -> None:
    """The data and tokenizer stages, when the run has no shards yet (``chatforge scaling`` on its own)."""
    from chatforge import tokenizer
    from chatforge.data import corpus

    print(f"scaling: preparing data and tokenizer in {cfg.run_dir}", file=sys.stderr)
    corpus.prepare(cfg)
    tokenizer.run(cfg)


# ---------------------------------------------------------------- training one rung


def _rung_hash(cfg: RunConfig, rung: Rung) -> str:
    sc = cfg.scaling
    spec = dataclasses.asdict(rung)
    if not rung.replicate:  # the hash of a ladder planned before replicates existed stays valid
        del spec["replicate"]
    blob = {
        "rung": spec,
        "train": to_dict(sc.train),
        "model": [sc.head_dim, sc.ffn_mult],
        "warmup_frac": sc.warmup_frac,
        "val_tokens": sc.val_tokens,
        # cloze_entities joins the hash only when set, so ladders run before it existed keep theirs
        "downstream": [sc.downstream, sc.cloze_choices] + ([sc.cloze_entities] if sc.cloze_entities else []),
        "data": to_dict(cfg.data),
        "tokenizer": to_dict(cfg.tokenizer),
        **text_version(cfg.data.sources),
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def _read_json(path: Path) -> dict:
    """One of the ladder's own JSON files (written atomically, so a bad one was edited or damaged)."""
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ChatforgeError(f"{path}: not valid JSON ({e}); fix or remove it") from None
    if not isinstance(obj, dict):
        raise ChatforgeError(f"{path}: expected a JSON object, got {type(obj).__name__}; fix or remove it")
    return obj


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float) + "\n")
    os.replace(tmp, path)


def train_rung(
    cfg: RunConfig,
    rung: Rung,
    data: _Data,
    work_dir: Path,
    save_dir: Path | None = None,
    progress: bool = True,
) -> dict:
    """Train one rung on the loop core (resuming its checkpoint if any) and write ``result.json``;
    ``progress=False`` hides the progress bar whatever ``train.progress`` says (not part of the rung's
    hash: it does not change the result)."""
    sc = cfg.scaling
    tc = dataclasses.replace(
        sc.train,
        seed=sc.train.seed + rung.replicate,
        progress=sc.train.progress and progress,
        steps=rung.steps,
        warmup_steps=round(sc.warmup_frac * rung.steps),
        eval_every=0,
        ckpt_every=min(sc.train.ckpt_every, rung.steps) if sc.train.ckpt_every else 0,
    )
    mc = shape_config(sc, rung.shape, data.tok.vocab_size)
    rt = setup_runtime(tc)
    seed_everything(tc.seed)
    model = GPT(mc)
    trainer = Trainer(
        model,
        tc,
        work_dir,
        loss_fn=lm_loss_fn,
        batch_fn=lm_batch_fn(data.train, tc),
        save_fn=lambda m, p, st: save_model(m, p, tokenizer=data.tok, train_state=st),
        load_fn=load_weights,
        evaluate=lambda m, step: data.evaluate(m, tc.batch_size),
        runtime=rt,
        desc=f"scaling {rung.name}",
        flops_per_token=model.flops_per_token(tc.seq_len),
    )
    t0, cpu0 = time.perf_counter(), time.process_time()
    summary = trainer.fit(resume=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    epochs = rung.tokens / data.train.n_tokens
    if epochs > 1.0:
        print(
            f"scaling: {rung.name} sees the training data {epochs:.1f} times (repeats data)", file=sys.stderr
        )
    if save_dir is not None:
        save_model(
            model, save_dir, tokenizer=data.tok, extra_files={"training_summary.json": json.dumps(summary)}
        )
    trainer.cleanup_checkpoints()
    result = {
        **dataclasses.asdict(rung),
        "compute": rung.compute,
        "hash": _rung_hash(cfg, rung),
        "val_loss": summary["val_loss"],
        "token_accuracy": summary.get("token_accuracy"),
        "world_cloze": summary.get("world_cloze"),
        "epochs": round(epochs, 4),
        "train_seconds": round(summary["elapsed_s"], 2),
        "wall_seconds": round(wall, 2),
        # CPU time of this process: on a shared machine wall time is inflated by other jobs, CPU time less so.
        "cpu_seconds": round(cpu, 2),
        "resumed": summary["resumed"],
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    _write_json(work_dir / "result.json", result)
    return result


def _done(cfg: RunConfig, rung: Rung, work_dir: Path) -> dict | None:
    p = work_dir / "result.json"
    if p.is_file():
        res = _read_json(p)
        if res.get("hash") == _rung_hash(cfg, rung):
            # The fits take val_loss as it is: a NaN, a string or a missing one crashed them (a ValueError
            # or KeyError traceback) on every rerun.
            loss = res.get("val_loss")
            if isinstance(loss, bool) or not isinstance(loss, int | float) or not 0 < loss < math.inf:
                raise ChatforgeError(
                    f"{p}: val_loss is {loss!r}, not a positive finite number; remove the file to train"
                    f" rung {rung.name} again"
                )
            return res
    return None


def _prepare_rung_dir(cfg: RunConfig, rung: Rung, work_dir: Path) -> None:
    """A rung dir left by a different config (another budget, schedule or data) starts afresh."""
    marker = work_dir / "rung.json"
    h = _rung_hash(cfg, rung)
    if marker.is_file() and _read_json(marker).get("hash") != h:
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    _write_json(marker, {**dataclasses.asdict(rung), "hash": h})


def run_ladder(
    cfg: RunConfig, data: _Data | None = None, after_rung: Callable[[dict], None] | None = None
) -> list[dict]:
    """Train every rung not finished yet (``scaling.workers`` at once); returns all rungs' results in plan
    order (each with ``"ran"``: whether it trained now)."""
    data = data or _Data(cfg)
    out_dir = cfg.run_dir / "scaling"
    rungs = plan_ladder(cfg.scaling, data.tok.vocab_size)
    results: dict[str, dict] = {}
    todo = []
    for rung in rungs:
        res = _done(cfg, rung, out_dir / rung.name)
        if res is not None:
            results[rung.name] = {**res, "ran": False}
        else:
            todo.append(rung)
    if cfg.scaling.workers > 1 and len(todo) > 1:
        _run_parallel(cfg, todo, len(rungs), results, after_rung)
    else:
        for rung in todo:
            print(
                f"scaling: rung {rungs.index(rung) + 1}/{len(rungs)} {rung.name}: N={rung.n_params:,}"
                f" D={rung.tokens:,} ({rung.steps} steps, C={rung.compute:.3g})",
                file=sys.stderr,
            )
            results[rung.name] = _train_in_dir(cfg, rung, data)
            if after_rung is not None:
                after_rung(results[rung.name])
    return [results[r.name] for r in rungs]


def _train_in_dir(cfg: RunConfig, rung: Rung, data: _Data, progress: bool = True) -> dict:
    work = cfg.run_dir / "scaling" / rung.name
    _prepare_rung_dir(cfg, rung, work)
    return {**train_rung(cfg, rung, data, work, progress=progress), "ran": True}


_WORKER: dict[str, Any] = {}


def _worker_init(cfg: RunConfig) -> None:
    # One process per worker, spawned (no forked torch state); the data is loaded once per process.
    _WORKER.update(cfg=cfg, data=_Data(cfg))


def _worker_rung(rung: Rung) -> dict:
    # Progress bars of several processes would garble one terminal: the parent prints a line per rung.
    return _train_in_dir(_WORKER["cfg"], rung, _WORKER["data"], progress=False)


def _run_parallel(
    cfg: RunConfig,
    todo: list[Rung],
    n_rungs: int,
    results: dict[str, dict],
    after_rung: Callable[[dict], None] | None,
) -> None:
    """Train ``todo`` in ``scaling.workers`` processes. Every rung seeds itself, so its result does not
    depend on which process trains it or when. Interrupted, the running rungs keep their checkpoints."""
    workers = min(cfg.scaling.workers, len(todo))
    print(f"scaling: {len(todo)} rungs in {workers} processes", file=sys.stderr)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(cfg,)) as pool:
        futures = {pool.submit(_worker_rung, rung): rung for rung in todo}
        try:
            for fut in as_completed(futures):
                res = fut.result()
                results[res["name"]] = res
                print(
                    f"scaling: rung {len(results)}/{n_rungs} {res['name']} done: val loss"
                    f" {res['val_loss']:.4f} ({res['train_seconds']:.0f} s)",
                    file=sys.stderr,
                )
                if after_rung is not None:
                    after_rung(res)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


# ---------------------------------------------------------------- fits and the prediction


def _frontier(rows: list[dict]) -> list[sf.IsoflopMinimum]:
    by_budget: dict[float, list[dict]] = {}
    for r in rows:
        by_budget.setdefault(r["budget"], []).append(r)
    return [
        sf.isoflop_minimum(c, [r["n_params"] for r in rs], [r["val_loss"] for r in rs])
        for c, rs in sorted(by_budget.items())
    ]


def backtest(rows: list[dict], form: str = "chinchilla") -> dict | None:
    """The ladder checks itself: fit L(N, D) (of ``form``) on every budget but the largest and predict the
    largest budget's rungs (2x the compute, not the target's 30x, so only a lower bound on the target's
    error). None when the smaller budgets are too few runs for a fit."""
    top = max(r["budget"] for r in rows)
    fit_rows = [r for r in rows if r["budget"] < top]
    try:
        law = sf.fit_loss_law(
            [r["n_params"] for r in fit_rows],
            [r["tokens"] for r in fit_rows],
            [r["val_loss"] for r in fit_rows],
            form=form,
        )
    except sf.FitError:
        return None
    out = []
    for r in (r for r in rows if r["budget"] == top):
        p = float(law(r["n_params"], r["tokens"]))
        out.append({"name": r["name"], "predicted": round(p, 5), "actual": r["val_loss"],
                    "relative_error": round(abs(p - r["val_loss"]) / r["val_loss"], 5)})  # fmt: skip
    errs = [o["relative_error"] for o in out]
    return {"budget": top, "fit_rungs": len(fit_rows), "rungs": out, "max_relative_error": max(errs),
            "mean_relative_error": round(float(np.mean(errs)), 5)}  # fmt: skip


def seed_noise(rows: list[dict]) -> dict | None:
    """The seed-to-seed spread of the rungs trained more than once (``scaling.seeds`` > 1): the pooled
    standard deviation of log val loss within each (budget, shape), i.e. a relative spread. None without
    replicates."""
    groups: dict[tuple[float, str], list[float]] = {}
    for r in rows:
        groups.setdefault((r["budget"], r["shape"]), []).append(math.log(r["val_loss"]))
    variances = [float(np.var(v, ddof=1)) for v in groups.values() if len(v) > 1]
    if not variances:
        return None
    return {"rungs": len(variances), "relative_sd": round(math.sqrt(float(np.mean(variances))), 5)}


def _envelope(
    sc: ScalingConfig, point: float, boot: list[float] | None, other_forms: list[float], noise: dict | None
) -> list[float]:
    """The prediction's error bar with what the bootstrap leaves out: it resamples a few rungs per budget,
    so it misses much of the seed noise and all of the choice of form. The widest of the bootstrap
    interval, the other forms' predictions and ±z·(the seed noise's spread of the prediction)."""
    vals = [point, *(boot or []), *other_forms]
    spread = (noise or {}).get("prediction_relative_sd")
    if spread is not None and math.isfinite(spread):
        z = NormalDist().inv_cdf(0.5 + sc.interval / 2)
        vals += [point * math.exp(-z * spread), point * math.exp(z * spread)]
    return [round(min(vals), 5), round(max(vals), 5)]


def repeated_data(
    sc: ScalingConfig, rows: list[dict], target: Rung, unique_tokens: int | None
) -> dict | None:
    """How much the ladder and target repeat their training data, and what that is worth in fresh tokens
    (``scaling_fit.effective_tokens``); None when no run sees a token twice, the correction is off or the
    training split's size is not given."""
    if (
        not unique_tokens
        or sc.repeat_rstar <= 0
        or max(target.tokens, *(r["tokens"] for r in rows)) <= unique_tokens
    ):
        return None
    eff = float(sf.effective_tokens(target.tokens, unique_tokens, sc.repeat_rstar))
    return {
        "unique_tokens": unique_tokens,
        "rstar": sc.repeat_rstar,
        "max_rung_epochs": round(max(r["tokens"] for r in rows) / unique_tokens, 3),
        "target_epochs": round(target.tokens / unique_tokens, 3),
        "target_effective_tokens": round(eff),
    }


@contextmanager
def _fitting(name: str) -> Iterator[None]:
    """Name the fit in a FitError raised inside, for the report of a ladder whose fit failed."""
    try:
        yield
    except sf.FitError as e:
        if e.fit is None:
            e.fit = name
        raise


def fit_ladder(
    sc: ScalingConfig,
    rows: list[dict],
    target: Rung,
    chance: float,
    metric: str | None,
    unique_tokens: int | None = None,
) -> dict:
    """Fits, the target's prediction and bootstrap intervals, as plain JSON-able values. With
    ``unique_tokens`` (the training split's size) runs that repeat it count effective tokens as D."""
    repeats = repeated_data(sc, rows, target, unique_tokens)
    if repeats is not None:
        rows = [
            {**r, "tokens": float(sf.effective_tokens(r["tokens"], unique_tokens, sc.repeat_rstar))}
            for r in rows
        ]
    d_target = repeats["target_effective_tokens"] if repeats else target.tokens
    n = np.array([r["n_params"] for r in rows], dtype=float)
    d = np.array([r["tokens"] for r in rows], dtype=float)
    loss = np.array([r["val_loss"] for r in rows], dtype=float)
    m = np.array([r.get(metric) if metric else np.nan for r in rows], dtype=float)
    has_metric = metric is not None and bool(np.all(np.isfinite(m)))
    # Which form of L(N, D) extrapolates this ladder better is decided by the ladder alone, before the
    # target exists: the form whose fit on the smaller budgets predicts the largest budget's rungs best.
    backtests = {f: backtest(rows, f) for f in sf.FORMS}
    scored = {f: b["mean_relative_error"] for f, b in backtests.items() if b is not None}
    form = (
        min(scored, key=lambda f: (scored[f], f != "chinchilla"))
        if len(scored) == len(sf.FORMS)
        else "chinchilla"
    )
    with _fitting(f"L(N, D) ({form} form)"):
        law = sf.fit_loss_law(n, d, loss, form=form)
    others = {}
    for f in sf.FORMS:
        if f != form:
            with _fitting(f"L(N, D) ({f} form)"):
                others[f] = sf.fit_loss_law(n, d, loss, form=f)
    other_preds = {f: float(o(target.n_params, d_target)) for f, o in others.items()}
    with _fitting("isoFLOP minima"):
        minima = _frontier(rows)
    with _fitting("L(C)"):
        claw = sf.fit_compute_law([x.budget for x in minima], [x.loss for x in minima])
    with _fitting(f"{metric} vs loss"):
        mlaw = sf.fit_metric_vs_loss(loss, m, chance) if has_metric else None
    n_opt_t, d_opt_t = law.compute_optimal(target.compute)
    try:  # approach 2; None when fewer than two budgets have their minimum inside the sampled sizes
        front: sf.Frontier | None = sf.fit_frontier(minima)
    except sf.FitError as e:
        print(f"scaling: {e}", file=sys.stderr)
        front = None
    c_grid = np.geomspace(min(sc.budgets) / 2, target.compute * 2, 40)

    def quantities(
        law_: sf.LossLaw,
        claw_: sf.ComputeLaw | None,
        mlaw_: sf.MetricLaw | None,
        front_: sf.Frontier | None,
    ) -> dict[str, float]:
        pred = float(law_(target.n_params, d_target))
        no, do = law_.compute_optimal(target.compute)
        q = {
            "loss": pred,
            "alpha": law_.alpha,
            "beta": law_.beta,
            "E": law_.E,
            "tokens_per_param": do / no,
            "n_opt": no,
        }
        if front_ is not None:
            q["frontier_tokens_per_param"] = float(front_.tokens_per_param(target.compute))
            q["frontier_exponent"] = front_.a
        if claw_ is not None:
            q["loss_compute_law"] = float(claw_(target.compute))
            q.update({f"lc_{i}": float(v) for i, v in enumerate(claw_(c_grid))})
        if mlaw_ is not None:
            q["metric"] = float(mlaw_(pred))
        return q

    point = quantities(law, claw, mlaw, front)
    init = sf.law_init(law)

    def refit(idx: np.ndarray) -> dict[str, float]:
        # The full grid of starts on every resample, not only the point fit's optimum: a resample whose
        # best fit lies in another basin must be allowed to find it, or the interval is too narrow.
        law_b = sf.fit_loss_law(n[idx], d[idx], loss[idx], inits=[init], form=form)
        mins = _frontier([rows[i] for i in idx])
        claw_b = None
        if len(mins) >= 3:
            claw_b = sf.fit_compute_law([x.budget for x in mins], [x.loss for x in mins])
        try:
            front_b = sf.fit_frontier(mins) if front is not None else None
        except sf.FitError:
            front_b = None
        mlaw_b = sf.fit_metric_vs_loss(loss[idx], m[idx], chance) if mlaw is not None else None
        return quantities(law_b, claw_b, mlaw_b, front_b)

    noise = seed_noise(rows)
    if noise is not None:
        # The floor on the prediction's accuracy that this ladder's own noise sets (the law as the truth).
        spread = sf.prediction_noise(
            law, n, d, noise["relative_sd"], (target.n_params, d_target), seed=sc.seed
        )
        noise["prediction_relative_sd"] = round(spread, 5)
    budgets = [r["budget"] for r in rows]
    boot = sf.bootstrap(len(rows), refit, sc.bootstrap, sc.seed, groups=budgets) if sc.bootstrap else {}

    def ci(key: str) -> list[float] | None:
        if key not in boot or len(boot[key]) < 10:
            return None
        return [round(v, 5) for v in sf.interval(boot[key], sc.interval)]

    return {
        "n_definition": "non-embedding parameters (output head included); C = 6·N·D",
        # Set: D in the laws is effective (fresh-equivalent) tokens, not the tokens trained on.
        "repeated_data": repeats,
        "loss_law": {**law.to_dict(), "intervals": {k: ci(k) for k in ("alpha", "beta", "E")}},
        "other_loss_laws": {
            f: {
                **o.to_dict(),
                "val_loss": round(other_preds[f], 5),
                "tokens_per_param": (lambda nd: nd[1] / nd[0])(o.compute_optimal(target.compute)),
            }
            for f, o in others.items()
        },
        "compute_law": claw.to_dict(),
        "metric_law": mlaw.to_dict() if mlaw else None,
        "isoflop_minima": [dataclasses.asdict(x) for x in minima],
        "frontier": front.to_dict() if front else None,
        "compute_optimal_at_target": {
            "compute": target.compute,
            "n_params": n_opt_t,
            "tokens": d_opt_t,
            "tokens_per_param": d_opt_t / n_opt_t,
            "tokens_per_param_interval": ci("tokens_per_param"),
            # Approach 2: the isoFLOP minima's N_opt(C) power law, extrapolated to the target's compute.
            "isoflop_n_params": float(front.n_opt(target.compute)) if front else None,
            "isoflop_tokens_per_param": point.get("frontier_tokens_per_param"),
            "isoflop_tokens_per_param_interval": ci("frontier_tokens_per_param"),
        },
        "backtest": {"selected": form, **backtests},
        "seed_noise": noise,
        "bootstrap_samples": len(boot.get("loss", [])),
        "interval_level": sc.interval,
        "predicted": {
            "val_loss": round(point["loss"], 5),
            "val_loss_interval": ci("loss"),
            "val_loss_envelope": _envelope(sc, point["loss"], ci("loss"), list(other_preds.values()), noise),
            "compute_law_val_loss": round(point["loss_compute_law"], 5),
            "compute_law_interval": ci("loss_compute_law"),
            "metric": metric if has_metric else None,
            "metric_value": round(point["metric"], 5) if mlaw else None,
            "metric_interval": ci("metric") if mlaw else None,
        },
        "compute_law_band": {
            "compute": c_grid.tolist(),
            "mid": [point[f"lc_{i}"] for i in range(len(c_grid))],
            "lo": [v[0] for v in (ci(f"lc_{i}") for i in range(len(c_grid)))] if ci("lc_0") else None,
            "hi": [v[1] for v in (ci(f"lc_{i}") for i in range(len(c_grid)))] if ci("lc_0") else None,
        },
    }


def _prediction_hash(cfg: RunConfig, rungs: list[dict], target: Rung, unique_tokens: int) -> str:
    sc = cfg.scaling
    blob: dict[str, Any] = {
        "rungs": sorted(r["hash"] for r in rungs),
        "target": _rung_hash(cfg, target),
        "fit": [sc.bootstrap, sc.interval, sc.seed],
    }
    if repeated_data(sc, rungs, target, unique_tokens):  # only then does R* change the fit
        blob["rstar"] = sc.repeat_rstar
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def predict(cfg: RunConfig, rows: list[dict], data: _Data, fit: bool = True) -> dict | None:
    """Fit the ladder and write ``prediction.json`` — unless one exists for this very ladder and target,
    which is kept as it is (it must predate the target's training). ``fit=False``: only the existing one."""
    out = cfg.run_dir / "scaling" / "prediction.json"
    target = plan_target(cfg.scaling, data.tok.vocab_size)
    h = _prediction_hash(cfg, rows, target, data.train.n_tokens)
    if out.is_file():
        old = _read_json(out)
        if old.get("hash") == h:
            return old
        if not fit:
            return None
    elif not fit:
        return None
    metric = None if data.kind == "none" else data.kind
    t0 = time.perf_counter()
    # Fit first: a fit that fails must not cost the target trained after the old prediction.
    fits = fit_ladder(cfg.scaling, rows, target, data.chance, metric, data.train.n_tokens)
    if (cfg.run_dir / "scaling" / "target").is_dir():
        # A new prediction would postdate the trained target: retrain it after predicting again.
        print(
            f"scaling: {out} was made for another ladder or target (or its hash was edited): predicting"
            " again, and the target trained after the old prediction is removed to be trained again",
            file=sys.stderr,
        )
        shutil.rmtree(cfg.run_dir / "scaling" / "target")
    now = time.time()
    pred = {
        "created": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
        "created_unix": now,
        "hash": h,
        "target": {**dataclasses.asdict(target), "compute": target.compute},
        "target_compute_over_largest_rung": target.compute / max(r["compute"] for r in rows),
        "ladder_rungs": len(rows),
        "fit_seconds": round(time.perf_counter() - t0, 2),
        **fits,
    }
    pred["sha256"] = _content_sha(pred)  # the check recomputes it: the prediction was not edited after
    _write_json(out, pred)
    return pred


def _content_sha(pred: dict) -> str:
    body = {k: v for k, v in pred.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=float).encode()).hexdigest()


def check(cfg: RunConfig, pred: dict, data: _Data, train: bool = True) -> dict:
    """Train the target (resuming if interrupted) and compare it with the prediction; ``train=False``:
    compare only if the target has already been trained."""
    target = plan_target(cfg.scaling, data.tok.vocab_size)
    work = cfg.run_dir / "scaling" / "target"
    res = _done(cfg, target, work)
    if res is None and not train:
        return {}
    if res is None:
        print(
            f"scaling: target {target.shape}: N={target.n_params:,} D={target.tokens:,} ({target.steps} steps,"
            f" C={target.compute:.3g}); predicted val loss {pred['predicted']['val_loss']:.4f}",
            file=sys.stderr,
        )
        _prepare_rung_dir(cfg, target, work)
        res = train_rung(cfg, target, data, work, save_dir=work / "model")
    start = [r["time"] for r in read_metrics(work / "metrics.jsonl", "start")]
    p = pred["predicted"]
    actual = res["val_loss"]
    ci = p["val_loss_interval"]
    out = {
        "predicted_val_loss": p["val_loss"],
        "actual_val_loss": actual,
        "relative_error": abs(p["val_loss"] - actual) / actual,
        "interval": ci,
        "inside_interval": bool(ci and ci[0] <= actual <= ci[1]),
        "envelope": p.get("val_loss_envelope"),
        "inside_envelope": bool(p.get("val_loss_envelope"))
        and p["val_loss_envelope"][0] <= actual <= p["val_loss_envelope"][1],
        "compute_law_val_loss": p["compute_law_val_loss"],
        "compute_law_relative_error": abs(p["compute_law_val_loss"] - actual) / actual,
        "predicted_before_training": bool(start) and pred["created_unix"] < min(start),
        "prediction_sha256": pred.get("sha256"),
        "prediction_unchanged": pred.get("sha256") == _content_sha(pred),
        "target_train_seconds": res["train_seconds"],
        "target_epochs": res["epochs"],
    }
    if p.get("metric"):
        m_actual = res.get(p["metric"])
        out.update(
            metric=p["metric"],
            predicted_metric=p["metric_value"],
            actual_metric=m_actual,
            metric_interval=p["metric_interval"],
            metric_abs_error=abs(p["metric_value"] - m_actual) if m_actual is not None else None,
        )
    return {"target": res, "check": out}


# ---------------------------------------------------------------- the stage


def run(cfg: RunConfig, until: str = "check", after_rung: Callable[[dict], None] | None = None) -> dict:
    """The ``chatforge scaling`` stage: ladder, then (``until`` ≥ predict) the prediction, then (``check``)
    the target run and the comparison; writes ``scaling.json``, ``scaling.md`` and plots each time."""
    if until not in UNTIL:
        raise ChatforgeError(f"scaling: until must be one of {', '.join(UNTIL)}, got {until!r}")
    from chatforge import scaling_report

    plan_target(cfg.scaling, cfg.tokenizer.vocab_size)  # an unworkable ladder fails before data preparation
    out_dir = cfg.run_dir / "scaling"
    out_dir.mkdir(parents=True, exist_ok=True)
    data = _Data(cfg)
    t0 = time.perf_counter()
    rows = run_ladder(cfg, data, after_rung)
    summary: dict[str, Any] = {
        "name": cfg.name,
        "corpus": [s.path or f"world:seed={s.seed}" for s in cfg.data.sources],
        "vocab_size": data.tok.vocab_size,
        "train_tokens_available": data.train.n_tokens,
        "val_tokens": int(data.val.shape[0] * (data.val.shape[1] - 1)),
        "downstream": data.kind,
        "downstream_items": len(data.cloze) if data.kind == "world_cloze" else None,
        "ladder": rows,
        "ladder_train_seconds": round(sum(r["train_seconds"] for r in rows), 1),
        "ladder_wall_seconds": round(sum(r["wall_seconds"] for r in rows), 1),
        "ladder_cpu_seconds": round(sum(r.get("cpu_seconds", 0.0) for r in rows), 1),
        "ladder_ran_seconds": round(time.perf_counter() - t0, 1),
    }
    # A partial run (--ladder-only, --predict) still reports what earlier runs found for this ladder.
    try:
        pred = predict(cfg, rows, data, fit=until != "ladder")
    except sf.FitError as e:
        # The rungs cost minutes: write them, their plots and which fit failed, then fail the command.
        pred = None
        summary["fit_error"] = {"fit": e.fit or "the ladder", "error": str(e)}
    if pred is not None:
        summary["prediction"] = pred
        summary.update(check(cfg, pred, data, train=until == "check"))
    summary["files"] = scaling_report.write(summary, out_dir)
    _write_json(out_dir / "scaling.json", summary)
    if "fit_error" in summary:
        fe = summary["fit_error"]
        raise ChatforgeError(
            f"the {fe['fit']} fit failed ({fe['error']}); no prediction was made — the ladder's"
            f" {len(rows)} rungs are in {out_dir / 'scaling.json'} and {out_dir / 'scaling.md'}"
        )
    return {k: summary[k] for k in ("ladder_wall_seconds", "check", "files") if k in summary} | {
        "rungs": len(rows),
        "rungs_ran": sum(r["ran"] for r in rows),
    }
