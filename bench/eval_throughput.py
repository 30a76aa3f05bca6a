"""Eval throughput (samples/s): the same suite on the same checkpoint, in-process through the engine vs
through our OpenAI-compatible server over HTTP on loopback. Prints JSON.

    .venv/bin/python bench/eval_throughput.py --model runs/cpu-demo/sft --suite world --limit 96
    .venv/bin/python bench/eval_throughput.py --random S          # a random model of shape S (no run needed)

Greedy decoding, so both targets must produce the same replies (checked: ``same_replies``). The server runs
in this process (uvicorn in a thread) with its continuous-batching scheduler; the HTTP client keeps
``--concurrency`` requests in flight.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def random_checkpoint(shape: str, root: Path) -> Path:
    from chatforge.checkpoint import save_model
    from chatforge.config import ModelConfig
    from chatforge.data.chat import world_conversations
    from chatforge.data.world import build_world
    from chatforge.model import GPT
    from chatforge.tokenizer import train_tokenizer
    from shapes import SHAPES

    s = SHAPES[shape]
    convs = world_conversations(build_world(0), 400, 0)
    tok = train_tokenizer([m["content"] for c in convs for m in c["messages"]], vocab_size=s["vocab"])
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tok.vocab_size,
        hidden_size=s["hidden"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["heads"],
        intermediate_size=s["intermediate"],
        max_position_embeddings=512,
    )
    return save_model(GPT(cfg), root / f"random-{shape}", tokenizer=tok)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory")
    ap.add_argument("--random", default=None, help="instead: a random model of this bench shape (S, M)")
    ap.add_argument("--suite", default="world")
    ap.add_argument("--limit", type=int, default=96)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32, help="in-process batch and server max_batch")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import uvicorn

    from chatforge.config import ServeConfig
    from chatforge.evals import registry, runner
    from chatforge.evals.targets import CheckpointTarget, EndpointTarget
    from chatforge.serve.api import create_app

    tmp = tempfile.TemporaryDirectory()
    model = Path(args.model) if args.model else random_checkpoint(args.random or "S", Path(tmp.name))
    spec = registry.get_spec(args.suite)
    items = registry.load_samples(spec, {"run_dir": model.parent}, args.limit)
    grader = spec.make_grader()
    params = runner.spec_params(spec, max_new_tokens=args.max_new_tokens, temperature=0.0, n=1)
    results = {}

    local = CheckpointTarget(model, batch_size=args.batch_size)
    runner.evaluate(local, items[:4], grader, params)  # warm-up
    res_local = runner.evaluate(local, items, grader, params)
    results["in_process"] = res_local["throughput"]

    app = create_app({"m": model}, cfg=ServeConfig(max_batch=args.batch_size))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    remote = EndpointTarget(f"http://127.0.0.1:{port}", "m", concurrency=args.concurrency)
    runner.evaluate(remote, items[:4], grader, params)
    res_http = runner.evaluate(remote, items, grader, params)
    results["http"] = res_http["throughput"]
    server.should_exit = True
    th.join(10)
    same = [s["replies"] for s in res_local["samples"]] == [s["replies"] for s in res_http["samples"]]
    out = {
        "model": str(model) if args.model else f"random {args.random or 'S'}",
        "suite": args.suite,
        "items": len(items),
        "max_new_tokens": args.max_new_tokens,
        "threads": torch.get_num_threads(),
        **results,
        "same_replies": same,
        "mean_score": {"in_process": res_local["overall"]["mean"], "http": res_http["overall"]["mean"]},
    }
    print(json.dumps(out, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
