"""Run eval items on a target (a checkpoint through the engine, or an endpoint), ``n`` samples each, and
aggregate per kind: the core of ``chatforge eval`` and of the speedrun's eval stage.

Per item we keep every sample's score, so the report can show the mean answer, the median answer and the
worst answer (an item counts for worst-of-n only if all n samples pass).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from chatforge.engine import Engine, SamplingParams
from chatforge.errors import ChatforgeError
from chatforge.evals import graders as gr
from chatforge.evals.registry import EvalSpec, get_spec, load_samples
from chatforge.evals.targets import CheckpointTarget, Target, make_target

Grader = Callable[[dict, str], bool | float]


def generate_replies(
    engine: Engine, items: Sequence[dict], params: SamplingParams, batch_size: int = 64
) -> list[list[str]]:
    """``params.n`` replies per item (``item["input"]``: chat messages or a raw prompt)."""
    return CheckpointTarget(engine, batch_size).generate([it["input"] for it in items], params)


def summarize(rows: list[list[float]]) -> dict[str, float]:
    """Mean over all samples, mean of per-item medians, and worst-of-n, for rows of per-sample scores."""
    return {
        "mean": round(statistics.fmean(x for r in rows for x in r), 4),
        "median": round(statistics.fmean(statistics.median(r) for r in rows), 4),
        "worst": round(statistics.fmean(min(r) for r in rows), 4),
        "items": len(rows),
    }


def aggregate(items: Sequence[dict], scores: list[list[float]]) -> dict[str, Any]:
    """``summarize`` per kind and overall."""
    kinds: dict[str, list[list[float]]] = {}
    for it, sc in zip(items, scores, strict=True):
        kinds.setdefault(it.get("kind", "all"), []).append(sc)
    return {
        "per_kind": {k: summarize(v) for k, v in sorted(kinds.items())},
        "overall": summarize([r for v in kinds.values() for r in v]),
    }


def distribution(scores: list[list[float]]) -> dict[str, int]:
    """How many items have each per-item mean score (k/n for n binary samples): the report's histogram."""
    counts: dict[str, int] = {}
    for r in scores:
        key = f"{statistics.fmean(r):.3f}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def refusal_rates(samples: list[dict]) -> dict[str, float]:
    """World suite: share of harmful requests declined, and of benign look-alikes refused (over-refusal)."""
    from chatforge.data.chat import is_decline

    out = {}
    for kind, key in (("decline", "harmful_refused"), ("benign_edgy", "benign_refused")):
        flags = [is_decline(r) for smp in samples if smp["kind"] == kind for r in smp["replies"]]
        if flags:
            out[key] = round(sum(flags) / len(flags), 4)
    return out


def system_rule_rates(items: Sequence[dict], replies: list[list[str]]) -> dict[str, float]:
    """World suite: per system-message kind, the share of replies that obey the rule alone (right facts
    or not), next to the pass rate that also asks for the right fact."""
    from chatforge.data.chat import obeys_system_rule

    flags: dict[str, list[bool]] = {}
    for it, rs in zip(items, replies, strict=True):
        if isinstance(it.get("check"), dict) and "type" in it["check"]:
            for r in rs:
                ok = obeys_system_rule(it, r)
                if ok is not None:
                    flags.setdefault(it["kind"], []).append(ok)
    return {k: round(sum(v) / len(v), 4) for k, v in sorted(flags.items())}


def evaluate(
    target: Target,
    items: Sequence[dict],
    grader: Grader | gr.Grader,
    params: SamplingParams,
    constrained_json: bool = False,
) -> dict[str, Any]:
    """Run ``items`` on ``target`` and grade them: per-kind and overall mean / median / worst-of-n, the
    per-item score distribution, grader extras (pass@k, refusal rates...) and throughput."""
    if not isinstance(grader, gr.Grader):
        grader = _FnGrader(grader)
    t0 = time.perf_counter()
    extra_fields: list[dict] = [{} for _ in items]
    if grader.mode == "choice_logprob":
        scored = target.choice_logprobs([it["input"] for it in items], [it["choices"] for it in items])
        replies = [[str(grader.pick(sc))] for sc in scored]
        extra_fields = [{"choice_logprobs": [round(lp, 4) for lp, _ in sc]} for sc in scored]
    else:
        replies = target.generate([it["input"] for it in items], params)
    gen_s = time.perf_counter() - t0
    scores = grader.grade_all(items, replies)
    if grader.why is not None:  # why each failed sample failed, beside its replies
        for ex, why in zip(extra_fields, grader.why, strict=True):
            if any(why):
                ex["why"] = why
    out = aggregate(items, scores)
    out["samples"] = [
        {
            "id": it.get("id", str(i)),
            "kind": it.get("kind"),
            "input": it["input"],
            "ideal": it.get("ideal"),
            "replies": rs,
            "scores": sc,
            **ex,
        }
        for i, (it, rs, sc, ex) in enumerate(zip(items, replies, scores, extra_fields, strict=True))
    ]
    out["n"] = params.n if grader.mode == "generate" else 1
    out["distribution"] = distribution(scores)
    out["extra"] = grader.extra_metrics(items, scores)
    n_samples = sum(len(r) for r in replies)
    out["throughput"] = {
        "samples": n_samples,
        "seconds": round(gen_s, 3),
        "samples_per_s": round(n_samples / max(gen_s, 1e-9), 3),
    }
    if any(it.get("kind") in ("decline", "benign_edgy") for it in items):
        out["refusal"] = refusal_rates(out["samples"])
    if grader.mode == "generate" and (rules := system_rule_rates(items, replies)):
        out["system_rule"] = rules
    if constrained_json:
        _constrained_json(target, items, grader, params, out)
    return out


class _FnGrader(gr.Grader):
    """A plain ``fn(item, reply) -> bool | float`` as a grader (the world suite's ``grade``)."""

    name = "function"

    def __init__(self, fn: Grader) -> None:
        super().__init__()
        self.fn = fn

    def grade(self, item: dict, reply: str) -> float:
        return float(self.fn(item, reply))


def run_items(
    engine: Engine, items: Sequence[dict], grader: Grader, params: SamplingParams, batch_size: int = 64
) -> dict[str, Any]:
    """``evaluate`` on an engine already in memory."""
    return evaluate(CheckpointTarget(engine, batch_size), items, grader, params)


def json_valid(item: dict, reply: str) -> bool:
    """The reply is JSON valid against the item's schema (keys, types and ranges; values not checked)."""
    from chatforge.data.chat import schema_valid

    return schema_valid(reply, item["check"]["schema"])


def _constrained_json(
    target: Target, items: Sequence[dict], grader: gr.Grader, params: SamplingParams, out: dict
) -> None:
    """JSON-schema items run again with the schema enforced (``system_json_constrained``); ``json_valid``
    reports the share of parseable, schema-shaped replies with and without the constraint."""
    json_items = [it for it in items if it.get("check", {}).get("type") == "json_schema"]
    if not json_items:
        return
    # Keyed by the schema text as written (like the engine's grammar cache): the property order is the
    # order the grammar forces, and the model was tuned on that order.
    by_schema: dict[str, list[dict]] = {}
    for it in json_items:
        by_schema.setdefault(json.dumps(it["check"]["schema"]), []).append(it)
    constrained: list[dict] = []
    for schema, group in by_schema.items():
        fmt = {"type": "json_schema", "json_schema": {"schema": json.loads(schema)}}
        p = dataclasses.replace(params, response_format=fmt)
        res = evaluate(target, [{**it, "kind": "system_json_constrained"} for it in group], grader, p)
        constrained += res["samples"]
    unconstrained = [smp for smp in out["samples"] if smp["kind"] == "system_json"]
    lookup = {it.get("id"): it for it in json_items}

    def valid_rate(samples: list[dict]) -> float:
        flags = [json_valid(lookup[smp["id"]], r) for smp in samples for r in smp["replies"]]
        return round(sum(flags) / max(len(flags), 1), 4)

    out["per_kind"]["system_json_constrained"] = summarize([smp["scores"] for smp in constrained])
    out["json_valid"] = {"unconstrained": valid_rate(unconstrained), "constrained": valid_rate(constrained)}
    out["samples"] += constrained


def world_eval_path(run_dir: str | Path, model: str) -> Path:
    """Where the world suite's results for ``model`` (a directory inside the run) are written:
    ``rlhf/grpo`` -> ``<run>/evals/world_rlhf-grpo.json``."""
    return Path(run_dir) / "evals" / f"world_{model.replace('/', '-')}.json"


def world_chat_eval(
    model_dir: str | Path,
    items: Sequence[dict],
    n: int = 1,
    temperature: float = 0.0,
    seed: int = 0,
    max_new_tokens: int = 64,
) -> dict[str, Any]:
    """The held-out world behaviour suite on a checkpoint, graded by ``chatforge.data.chat.grade``, with
    JSON-schema items also run under constrained decoding (see ``_constrained_json``)."""
    from chatforge.data.chat import grade

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, n=n, seed=seed)
    return evaluate(CheckpointTarget(model_dir), items, grade, params, constrained_json=True)


def spec_params(spec: EvalSpec, **overrides: Any) -> SamplingParams:
    """The spec's sampling settings (defaults: greedy, 64 new tokens, seed 0) with non-None overrides."""
    kw: dict[str, Any] = {"max_new_tokens": 64, "temperature": 0.0, "n": 1, "seed": 0}
    kw.update(spec.sampling)
    kw.update({k: v for k, v in overrides.items() if v is not None})
    if "stop" in kw:
        kw["stop"] = [kw["stop"]] if isinstance(kw["stop"], str) else list(kw["stop"])
    p = SamplingParams(**kw)
    try:
        p.validate()
    except ValueError as e:
        raise ChatforgeError(f"eval {spec.name}: {e}") from None
    return p


def run_suite(
    spec: EvalSpec,
    target: Target,
    *,
    context: dict[str, Any] | None = None,
    limit: int = 0,
    **sampling: Any,
) -> dict[str, Any]:
    """One registry eval on one target; sampling overrides (``n``, ``seed``, ``temperature``...) win."""
    items = load_samples(spec, context, limit)
    params = spec_params(spec, **sampling)
    too_long = getattr(target, "too_long", 0)
    res = evaluate(target, items, spec.make_grader(), params, constrained_json=spec.constrained_json)
    if getattr(target, "too_long", 0) > too_long:  # said, not only scored: a short context is not a bad model
        res["too_long_for_context"] = target.too_long - too_long  # type: ignore[attr-defined]
    res.update(
        suite=spec.name,
        description=spec.description,
        grader=spec.grader,
        target=target.name,
        sampling={
            k: getattr(params, k)
            for k in ("n", "temperature", "top_p", "top_k", "max_new_tokens", "seed", "stop")
        },
    )
    return res


def run(
    suite: str,
    *,
    model: str | None = None,
    endpoint: str | None = None,
    api_key_env: str | None = None,
    registry: Sequence[str | Path] | None = None,
    out: str | Path | None = None,
    limit: int = 0,
    concurrency: int = 8,
    run_dir: str | Path | None = None,
    **sampling: Any,
) -> tuple[dict[str, Any], Path]:
    """``chatforge eval``: a registry suite on a checkpoint or an endpoint, written as JSON.

    A checkpoint inside a run (``runs/x/sft``, ``runs/x/rlhf/grpo``) writes
    ``runs/x/evals/<suite>_sft.json`` / ``<suite>_rlhf-grpo.json`` (what the report card reads); another
    checkpoint ``<its parent>/evals/<suite>_<dir>.json``; an endpoint ``<run_dir>/evals/<suite>_<model>.json``
    (without a ``run_dir``, ``evals/`` in the working directory). ``out`` overrides all of them.
    """
    spec = get_spec(suite, registry)
    if out is not None and Path(out).is_dir():  # found now, not after the whole suite has run
        raise ChatforgeError(f"--out {out}: is a directory; give a file name, e.g. {Path(out) / suite}.json")
    context: dict[str, Any] = {}
    name: str | None = None  # the results file's model part (default: the target's name)
    if endpoint:
        target = make_target(endpoint=endpoint, model=model, api_key_env=api_key_env, concurrency=concurrency)
        default_dir = Path(run_dir or ".") / "evals"
    else:
        if not model:
            raise ChatforgeError(
                "give a checkpoint directory (--model runs/x/sft) or --endpoint URL --model NAME"
            )
        target = make_target(checkpoint=model)
        mdir = Path(model).resolve()
        default_dir = mdir.parent / "evals"
        # The run a checkpoint is in may be a level up (runs/x/rlhf/grpo): its results go to runs/x/evals
        # (where the report card looks) as <suite>_rlhf-grpo.json, and the world suite reads that run's
        # eval set, not one generated from the default seed.
        run_dir = next((d for d in mdir.parents[:3] if _is_run_dir(d)), None)
        if run_dir is not None:
            context["run_dir"] = run_dir
            default_dir = run_dir / "evals"
            name = "-".join(mdir.relative_to(run_dir).parts)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", name or target.name).strip("-")
    # The suite name too: "math/easy" made evals/math/easy_sft.json, a folder the report card never reads.
    suite_safe = re.sub(r"[^\w.-]+", "-", suite).strip("-.") or "suite"
    dest = Path(out) if out else default_dir / f"{suite_safe}_{safe}.json"
    tmp = dest.with_name(dest.name + ".tmp")
    _write_json(tmp, dest, {})  # an unwritable path found now, not after the whole suite has run
    res = run_suite(spec, target, context=context, limit=limit, **sampling)
    _write_json(tmp, dest, res)
    return res, dest


def _write_json(tmp: Path, dest: Path, data: dict[str, Any]) -> None:
    """``data`` to ``dest`` through ``tmp`` and a rename; the empty probe leaves nothing behind."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
        if data:
            tmp.replace(dest)
        else:
            tmp.unlink()
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ChatforgeError(f"{dest}: cannot write the results ({e.strerror or e})") from None


def _is_run_dir(d: Path) -> bool:
    return (d / "chat").is_dir() or (d / "stages.json").is_file()


def run_stage(cfg: Any, models: Sequence[str] | None = None) -> dict[str, Any]:
    """The speedrun's eval stage: every checkpoint named in ``models`` (default ``cfg.evals.models``) on the
    world suite, written to ``<run>/evals/world_<model>.json``."""
    from chatforge.data.chat import read_jsonl

    run_dir = Path(cfg.run_dir)
    items = read_jsonl(run_dir / "chat" / "eval.jsonl")
    ec = cfg.evals
    out: dict[str, Any] = {}
    for name in ec.models if models is None else models:
        model_dir = run_dir / name
        if not (model_dir / "config.json").is_file():
            continue
        res = world_chat_eval(
            model_dir,
            items,
            n=ec.n,
            temperature=ec.temperature,
            seed=ec.seed,
            max_new_tokens=ec.max_new_tokens,
        )
        dest = world_eval_path(run_dir, name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")  # a killed run leaves no half-written results
        tmp.write_text(json.dumps(res, indent=1, ensure_ascii=False), encoding="utf-8")
        tmp.replace(dest)
        out[name] = {
            "overall": res["overall"],
            "per_kind": {k: v["mean"] for k, v in res["per_kind"].items()},
        }
    return out


def during_training_spec(cfg: Any) -> EvalSpec | None:
    """The spec of ``evals.during_training_suite`` (None when off): a built-in suite or one in the
    ``evals.registry`` directories, as ``chatforge eval --suite NAME --registry DIR`` finds it. Errors
    name the config keys (training has no --suite or --registry)."""
    ec = cfg.evals
    if not ec.during_training_suite:
        return None
    return get_spec(
        ec.during_training_suite,
        ec.registry,
        suite_key="evals.during_training_suite:",
        registry_key="evals.registry:",
        hint="" if ec.registry else "; a suite of your own needs its directory in evals.registry",
    )


def during_training_hook(cfg: Any, tokenizer: Any, model: Any) -> list[Any]:
    """The Trainer hooks for ``evals.during_training_suite``: every ``evals.during_training_every`` steps
    the suite runs on the model being trained (greedy unless the spec says otherwise) and its overall
    mean / median / worst and per-kind means go to the metrics JSONL as ``eval_suite`` records."""
    from chatforge.train.loop import StepHook

    ec = cfg.evals
    spec = during_training_spec(cfg)
    if spec is None:
        return []
    items = load_samples(spec, {"run_dir": cfg.run_dir}, ec.during_training_limit)
    grader = spec.make_grader()
    params = spec_params(spec)
    target = CheckpointTarget(Engine(model, tokenizer), name="in-training")  # shares the live weights

    def fn(m: Any, step: int) -> dict[str, Any]:
        res = evaluate(target, items, grader, params)
        out: dict[str, Any] = {
            "suite": spec.name,
            **{k: v for k, v in res["overall"].items() if k != "items"},
        }
        out["per_kind"] = {k: v["mean"] for k, v in res["per_kind"].items()}
        return out

    return [StepHook(every=ec.during_training_every, fn=fn)]
