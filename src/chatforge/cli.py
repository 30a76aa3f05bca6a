"""The ``chatforge`` command: one subcommand per stage, each reading a YAML recipe plus ``--set`` overrides.

chatforge speedrun                      # every stage of recipes/cpu-demo.yaml, then the report card
chatforge pretrain --set pretrain.steps=200 --set name=quick
chatforge sample --model runs/cpu-demo/base --prompt "Once upon a time"
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from chatforge.config import RunConfig, load_config
from chatforge.errors import ChatforgeError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-r", "--recipe", default=None, help="recipe name in recipes/ or a YAML path (default: cpu-demo)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key",
    )
    p.add_argument("--name", default=None, help="run name (same as --set name=...)")


def _config(args: argparse.Namespace) -> RunConfig:
    overrides = list(args.overrides)
    if args.name:
        overrides.append(f"name={args.name}")
    return load_config(args.recipe, overrides)


def _print(obj: Any) -> None:
    if os.environ.get("RANK", "0") != "0":  # under torchrun, one summary (rank 0's), not one per process
        return
    print(json.dumps(obj, indent=2, default=str, ensure_ascii=False))


def cmd_data(args: argparse.Namespace) -> None:
    from chatforge.data import corpus

    _print(corpus.prepare(_config(args)))


def cmd_tokenizer(args: argparse.Namespace) -> None:
    from chatforge import tokenizer

    _print(tokenizer.run(_config(args)))


def cmd_pretrain(args: argparse.Namespace) -> None:
    from chatforge.train import pretrain

    _print(pretrain.run(_config(args), resume=not args.fresh))


def cmd_sft(args: argparse.Namespace) -> None:
    from chatforge.train import sft

    _print(sft.run(_config(args), resume=not args.fresh))


def cmd_sample(args: argparse.Namespace) -> None:
    from chatforge.sample import load_engine, sample_prompts

    cfg = _config(args)
    sc = cfg.sample
    for key in ("max_new_tokens", "temperature", "top_k", "top_p", "seed"):
        if getattr(args, key) is not None:
            setattr(sc, key, getattr(args, key))
    engine = load_engine(args.model or cfg.run_dir / "base", compile=cfg.sample.compile)
    prompts = args.prompt or sc.prompts
    for c in sample_prompts(engine, sc, prompts, n=args.n):
        print(f"--- [{c.prompt_index}.{c.sample_index}] {prompts[c.prompt_index]!r} ({c.finish_reason})")
        print(prompts[c.prompt_index] + c.text)


def cmd_chat(args: argparse.Namespace) -> None:
    from chatforge.chat import main as chat
    from chatforge.engine import SamplingParams

    run_dir = _config(args).run_dir
    model = args.model or (
        run_dir / "sft" if (run_dir / "sft" / "config.json").is_file() else run_dir / "base"
    )
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    try:
        params.validate()
    except ValueError as e:
        raise ChatforgeError(str(e)) from None
    chat(model, params, system=args.system)


def cmd_rlhf(args: argparse.Namespace) -> None:
    """reward / dpo / ppo / grpo: one stage module each, same shape as sft."""
    import importlib

    stage = {"reward": "reward", "dpo": "dpo", "ppo": "ppo", "grpo": "grpo"}[args.command]
    _print(importlib.import_module(f"chatforge.train.{stage}").run(_config(args), resume=not args.fresh))


def cmd_rlhf_eval(args: argparse.Namespace) -> None:
    from chatforge.evals import rlhf

    res = rlhf.run(_config(args))
    print(rlhf.table_markdown(res["rows"]), end="")


def cmd_speedrun(args: argparse.Namespace) -> None:
    from chatforge import speedrun

    speedrun.run(_config(args), fresh=args.fresh)


def cmd_scaling(args: argparse.Namespace) -> None:
    from chatforge import scaling

    _print(scaling.run(_config(args), until=args.until))


def cmd_moderation(args: argparse.Namespace) -> None:
    from chatforge.safety import moderation

    cfg = _config(args)
    if args.action == "train":
        res = moderation.train(cfg, resume=not args.fresh)
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0's table only (as _print)
            print(moderation.summary_table(res["test"]))
    else:
        print(moderation.summary_table(moderation.evaluate(cfg, args.model)))


def cmd_redteam(args: argparse.Namespace) -> None:
    from chatforge.safety import redteam

    cfg = _config(args)
    # The speedrun's stage skips the configured checkpoints not trained yet; asked for by hand, finding
    # none is an error, not an empty result (and no suite written into a run directory that isn't there).
    if not args.model and not redteam.checkpoints(cfg):
        raise ChatforgeError(
            f"{cfg.run_dir}: none of safety.models ({', '.join(cfg.safety.models)}) is a checkpoint there;"
            " pass --model DIR, or train them first"
        )
    _print(redteam.run(cfg, models=args.model or None))


def cmd_release(args: argparse.Namespace) -> None:
    from chatforge.safety import release

    res = release.release(_config(args), args.model, version=args.version, force=args.force)
    _print({k: v for k, v in res.items() if k != "results"})
    if not res["promoted"]:
        raise ChatforgeError(f"{args.model}: not promoted: {'; '.join(res['reasons'])}")


def cmd_serve(args: argparse.Namespace) -> None:
    from chatforge.serve import api

    cfg = _config(args)
    for key in ("host", "port", "max_batch", "db_url"):
        if getattr(args, key) is not None:
            setattr(cfg.serve, key, getattr(args, key))
    api.run(cfg, model=args.model, versions=args.versions)


def cmd_feedback(args: argparse.Namespace) -> None:
    from chatforge.serve import feedback

    _print(feedback.main(args, _config(args).run_dir))


def cmd_eval(args: argparse.Namespace) -> None:
    from chatforge.evals import registry, runner

    # Loaded even though only an endpoint's results use it: a bad --set or --recipe should stop here, not
    # be silently ignored.
    cfg = _config(args)
    # The recipe's evals.registry (the directories its during-training suite comes from), then --registry.
    dirs = [*registry.check_dirs(cfg.evals.registry, "evals.registry:"), *args.registry]
    if args.list:
        for name, spec in sorted(registry.load_registry(dirs).items()):
            print(f"{name:16s} {spec.grader:15s} {spec.description}")
        return
    if not args.suite:
        raise ChatforgeError("--suite NAME is required (chatforge eval --list shows the suites)")
    if args.limit < 0:  # a negative limit would slice off the last items instead
        raise ChatforgeError(f"--limit {args.limit}: must be >= 0 (0 = every item)")
    if args.concurrency < 1:
        raise ChatforgeError(f"--concurrency {args.concurrency}: must be at least 1")
    res, dest = runner.run(
        args.suite,
        model=args.model,
        endpoint=args.endpoint,
        api_key_env=args.api_key_env,
        registry=dirs,
        out=args.out,
        limit=args.limit,
        concurrency=args.concurrency,
        run_dir=cfg.run_dir,
        n=args.n,
        seed=args.seed,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
    )
    keys = ("suite", "target", "n", "overall", "extra", "throughput", "too_long_for_context")
    shown = {k: res[k] for k in keys if k in res}
    if len(res.get("per_kind", {})) > 1:  # items with kinds: each kind's mean too
        shown["per_kind"] = {k: v["mean"] for k, v in res["per_kind"].items()}
    _print(shown)
    print(f"results: {dest}")


def cmd_report(args: argparse.Namespace) -> None:
    from pathlib import Path

    from chatforge.evals import report

    cfg = _config(args)
    if args.run:
        run = Path(args.run)
        if not run.is_dir():
            raise ChatforgeError(f"--run {run}: no such run directory")
        cfg.runs_dir, cfg.name = str(run.parent), run.name
    elif not cfg.run_dir.is_dir():
        raise ChatforgeError(f"{cfg.run_dir}: no such run directory (pass --name NAME or --run DIR)")
    saved = cfg.run_dir / "config.yaml"
    if args.recipe is None and saved.is_file():
        # The settings the run was made with (its model sizes, its evals.models), not the default
        # recipe's: a gpu-small run's report card would give cpu-demo's hidden size and layers. A file
        # from an older chatforge that no longer loads leaves the recipe's.
        runs_dir, name = cfg.runs_dir, cfg.name
        with contextlib.suppress(ChatforgeError):
            cfg = load_config(saved, list(args.overrides))
        cfg.runs_dir, cfg.name = runs_dir, name
    print(f"report: {report.write_report(cfg)['md']}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="chatforge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="command", required=True)
    specs = {
        "data": (cmd_data, "gather, clean, filter and deduplicate the recipe's sources"),
        "tokenizer": (cmd_tokenizer, "train the BPE tokenizer and tokenize the documents into shards"),
        "pretrain": (cmd_pretrain, "pretrain the base model (resumes from the last checkpoint)"),
        "sft": (cmd_sft, "chat-tune the base model on conversations (assistant tokens only)"),
        "sample": (cmd_sample, "sample continuations from a checkpoint"),
        "chat": (cmd_chat, "chat with a checkpoint in the terminal (streams replies; /help for commands)"),
        "speedrun": (cmd_speedrun, "run every stage of the recipe and write the report card"),
        "reward": (cmd_rlhf, "train the reward model on preference pairs (Bradley-Terry) -> <run>/rm"),
        "dpo": (cmd_rlhf, "direct preference optimisation against the frozen SFT model -> <run>/rlhf/dpo"),
        "ppo": (cmd_rlhf, "PPO against the reward model with a KL leash to SFT -> <run>/rlhf/ppo"),
        "grpo": (cmd_rlhf, "GRPO with verifiable world rewards (optionally + RM) -> <run>/rlhf/grpo"),
        "rlhf-eval": (cmd_rlhf_eval, "compare SFT, best-of-n, PPO, DPO, GRPO on the held-out world suite"),
        "serve": (cmd_serve, "serve the OpenAI-compatible API and the web chat UI (versions, votes)"),
        "feedback": (cmd_feedback, "UI votes: export preference JSONL, version leaderboard, rater stats"),
        "moderation": (cmd_moderation, "train or evaluate the moderation classifier (<run>/moderation)"),
        "redteam": (cmd_redteam, "run the red-team suite (harmful, jailbreak, benign look-alikes)"),
        "release": (cmd_release, "promote a model only if core and red-team evals do not regress"),
        "eval": (cmd_eval, "run a registry eval suite on a checkpoint or an OpenAI-compatible endpoint"),
        "report": (cmd_report, "regenerate the report card (report.md/json, plots) from a run directory"),
        "scaling": (cmd_scaling, "IsoFLOP ladder + scaling-law fits; predict a big run's loss, check it"),
    }
    for name, (fn, help_) in specs.items():
        p = sub.add_parser(name, help=help_, description=help_)
        _add_config_args(p)
        p.set_defaults(fn=fn)
        if name in ("pretrain", "sft", "speedrun", "reward", "dpo", "ppo", "grpo"):
            p.add_argument("--fresh", action="store_true", help="ignore existing outputs and checkpoints")
        if name == "scaling":
            g = p.add_mutually_exclusive_group()
            g.add_argument(
                "--ladder-only",
                dest="until",
                action="store_const",
                const="ladder",
                help="train (or finish) the ladder only",
            )
            g.add_argument(
                "--predict",
                dest="until",
                action="store_const",
                const="predict",
                help="ladder, fits and prediction.json; do not train the target",
            )
            g.add_argument(
                "--check",
                dest="until",
                action="store_const",
                const="check",
                help="everything: also train the target and compare (the default)",
            )
            p.set_defaults(until="check")
        if name == "sample":
            p.add_argument("--model", default=None, help="checkpoint directory (default: <run>/base)")
            p.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable)")
            p.add_argument("-n", type=int, default=1, help="samples per prompt")
            p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=None)
            p.add_argument("--temperature", type=float, default=None)
            p.add_argument("--top-k", dest="top_k", type=int, default=None)
            p.add_argument("--top-p", dest="top_p", type=float, default=None)
            p.add_argument("--seed", type=int, default=None)
        if name == "moderation":
            p.add_argument("action", choices=("train", "eval"))
            p.add_argument("--model", default=None, help="eval: moderator dir (default: <run>/moderation)")
            p.add_argument("--fresh", action="store_true", help="train: ignore existing checkpoints")
        if name == "redteam":
            p.add_argument(
                "--model",
                action="append",
                default=None,
                help="checkpoint dir (repeatable; default: safety.models)",
            )
        if name == "release":
            p.add_argument("--model", required=True, help="checkpoint directory to promote")
            p.add_argument("--version", default=None, help="version name (default: the directory's name)")
            p.add_argument("--force", action="store_true", help="promote even if the gate fails (recorded)")
        if name == "serve":
            p.add_argument(
                "--model", default=None, help="checkpoint dir (default: <run>/sft, else <run>/base)"
            )
            p.add_argument(
                "--versions", nargs="*", default=[], metavar="NAME=PATH", help="more versions to serve"
            )
            p.add_argument("--host", default=None)
            p.add_argument("--port", type=int, default=None)
            p.add_argument("--max-batch", dest="max_batch", type=int, default=None)
            p.add_argument("--db-url", dest="db_url", default=None, help="SQLAlchemy URL for the feedback DB")
        if name == "feedback":
            from chatforge.serve.feedback import add_arguments

            add_arguments(p)
        if name == "eval":
            p.add_argument("--suite", default=None, help="eval name in the registry (see --list)")
            p.add_argument("--list", action="store_true", help="list the registry's evals and exit")
            p.add_argument("--model", default=None, help="checkpoint dir, or the model name with --endpoint")
            p.add_argument("--endpoint", default=None, help="OpenAI-compatible URL (http://host:port/v1)")
            p.add_argument("--api-key-env", dest="api_key_env", default=None, help="env var with the API key")
            p.add_argument("--registry", action="append", default=[], help="extra registry dir or YAML file")
            p.add_argument("--n", type=int, default=None, help="samples per prompt (default: the spec's)")
            p.add_argument(
                "--seed",
                type=int,
                default=None,
                help="fixed seed: the same samples on every run (each prompt and sample its own stream)",
            )
            p.add_argument("--temperature", type=float, default=None)
            p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=None)
            p.add_argument("--limit", type=int, default=0, help="only the first N items")
            p.add_argument("--concurrency", type=int, default=8, help="requests in flight (endpoints)")
            p.add_argument(
                "--out",
                default=None,
                help="results JSON (default: evals/SUITE_MODEL.json in the checkpoint's run, or in <run> for --endpoint)",
            )
        if name == "report":
            p.add_argument("--run", default=None, help="run directory (default: runs/<recipe name>)")
        if name == "chat":
            p.add_argument(
                "--model", default=None, help="checkpoint directory (default: <run>/sft, else <run>/base)"
            )
            p.add_argument("--system", default=None, help="initial system message")
            p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=256)
            p.add_argument("--temperature", type=float, default=0.7)
            p.add_argument("--top-k", dest="top_k", type=int, default=0)
            p.add_argument("--top-p", dest="top_p", type=float, default=0.9)
            p.add_argument("--seed", type=int, default=None)
    return ap


# What torchrun may launch with several processes: the training stages, whose processes share each step's
# batch and of which rank 0 alone writes. Any other command would run in full once per process.
TORCHRUN_COMMANDS = ("pretrain", "sft", "reward", "dpo", "ppo", "grpo", "moderation train")


def torchrun_refusal(args: argparse.Namespace) -> str | None:
    """Why this command must not run as one of several torchrun processes, or None if it may."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        world = 1
    name = args.command + (f" {args.action}" if args.command == "moderation" else "")
    if world <= 1 or name in TORCHRUN_COMMANDS:
        return None
    how = f"not for torchrun (WORLD_SIZE={world})"
    if args.command == "scaling":
        return (
            f"{how}: the ladder starts its own worker processes (scaling.workers), so every process would"
            " train the whole ladder into the same files; run `chatforge scaling` once without torchrun"
            " (raise scaling.workers to use more cores)"
        )
    if args.command == "speedrun":
        return (
            f"{how}: its data, tokenizer, eval and report stages are one process's work; run it without"
            f" torchrun, or run the training stages ({', '.join(TORCHRUN_COMMANDS)}) one by one under it"
        )
    return (
        f"{how}: every process would run all of it and write the same outputs; run it without torchrun"
        f" (torchrun is for {', '.join(TORCHRUN_COMMANDS)})"
    )


def _error_tag() -> str | None:
    """How this process reports an error: "" plainly, a rank tag, or None (another process says it).

    Under torchrun an error raised before the process group is joined (a config or a file) is the same on
    every process of a node, which read the same inputs: the node's first process says it once. Once
    joined, an error may be one rank's own (its data, its device), so each says its own, tagged."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return ""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return f"(rank {dist.get_rank()}) "
    return "" if os.environ.get("LOCAL_RANK", "0") == "0" else None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    refused = torchrun_refusal(args)
    if refused is not None:
        if os.environ.get("RANK", "0") == "0":  # the same on every process: said once
            print(f"chatforge {args.command}: error: {refused}", file=sys.stderr)
        return 2
    try:
        args.fn(args)
    except ChatforgeError as e:
        tag = _error_tag()
        if tag is not None:
            print(f"chatforge {args.command}: error: {tag}{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank stops: say it once
            print(f"chatforge {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
