"""The ``chatforge`` command: one subcommand per stage, each reading a YAML recipe plus ``--set`` overrides.

chatforge speedrun                      # every stage of recipes/cpu-demo.yaml, then the report card
chatforge pretrain --set pretrain.steps=200 --set name=quick
chatforge sample --model runs/cpu-demo/base --prompt "Once upon a time"
"""

from __future__ import annotations

import argparse
import json
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
    engine = load_engine(args.model or cfg.run_dir / "base")
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


def cmd_speedrun(args: argparse.Namespace) -> None:
    from chatforge import speedrun

    speedrun.run(_config(args), fresh=args.fresh)


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
    }
    for name, (fn, help_) in specs.items():
        p = sub.add_parser(name, help=help_, description=help_)
        _add_config_args(p)
        p.set_defaults(fn=fn)
        if name in ("pretrain", "sft", "speedrun"):
            p.add_argument("--fresh", action="store_true", help="ignore existing outputs and checkpoints")
        if name == "sample":
            p.add_argument("--model", default=None, help="checkpoint directory (default: <run>/base)")
            p.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable)")
            p.add_argument("-n", type=int, default=1, help="samples per prompt")
            p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=None)
            p.add_argument("--temperature", type=float, default=None)
            p.add_argument("--top-k", dest="top_k", type=int, default=None)
            p.add_argument("--top-p", dest="top_p", type=float, default=None)
            p.add_argument("--seed", type=int, default=None)
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except ChatforgeError as e:
        print(f"chatforge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"chatforge {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
