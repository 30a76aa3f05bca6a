"""GRPO or PPO on a tiny chat-tuned model saved by the test (used by tests/test_rl_ddp.py).

Usage: tiny_rl.py ALGO BASE_DIR OUT_DIR STEPS PROMPTS [INTERRUPT_AT]. Runs under plain python or torchrun
(gloo on CPU). ALGO is grpo or ppo; BASE_DIR holds a saved model and tokenizer; PROMPTS is prompts per
iteration. Every rank appends the replies it scored to OUT_DIR/replies_rank<R>.jsonl (one record per
reward call: the prompts and texts), and raises KeyboardInterrupt in its INTERRUPT_AT-th reward call (all
ranks at once, as Ctrl-C in a torchrun terminal would). Rank 0 writes the trained weights to
OUT_DIR/final.pt and the summary to OUT_DIR/summary.json.
"""

import json
import os
import sys
from pathlib import Path

import torch

from chatforge.checkpoint import load_model
from chatforge.config import GRPOConfig, PPOConfig
from chatforge.tokenizer import Tokenizer
from chatforge.train import grpo, ppo
from rl_helpers import toy_pairs

POOL = [{"input": p["messages"]} for p in toy_pairs(40, 0)]


def main() -> None:
    torch.set_num_threads(1)
    algo, base, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    steps, prompts = int(sys.argv[4]), int(sys.argv[5])
    interrupt_at = int(sys.argv[6]) if len(sys.argv) > 6 else 0
    rank = int(os.environ.get("RANK", "0"))
    out.mkdir(parents=True, exist_ok=True)
    calls = {"n": 0}

    def says_yes(items: list[dict], texts: list[str]) -> list[float]:
        calls["n"] += 1
        if calls["n"] == interrupt_at:
            raise KeyboardInterrupt
        with open(out / f"replies_rank{rank}.jsonl", "a") as f:
            rec = {"call": calls["n"], "prompts": [x["input"][0]["content"] for x in items], "texts": texts}
            f.write(json.dumps(rec) + "\n")
        return [float(t.startswith("yes")) for t in texts]

    tok, policy = Tokenizer.load(base), load_model(base)
    if algo == "grpo":
        c = GRPOConfig(steps=steps, prompts_per_step=prompts, samples_per_prompt=4, max_new_tokens=8)
        c.kl_coef, c.train.batch_size = 0.1, 8
    else:
        c = PPOConfig(steps=steps, prompts_per_step=prompts, epochs=2, max_new_tokens=8, kl_coef=0.02)
        c.adaptive_kl, c.kl_target, c.kl_horizon, c.train.batch_size = True, 0.5, 10, 4
    c.train.lr, c.train.progress, c.train.threads = 1e-3, False, 1
    c.train.warmup_steps, c.train.schedule, c.train.ckpt_every = 0, "constant", 1
    train = grpo.train_grpo if algo == "grpo" else ppo.train_ppo
    model, summary = train(policy, tok, says_yes, POOL, c, out, resume=True)
    if rank == 0:
        torch.save(model.state_dict(), out / "final.pt")
        (out / "summary.json").write_text(json.dumps(summary, default=str))


if __name__ == "__main__":
    main()
