"""The reward model on real preference data (recipes/rm-real.yaml): long prompts keep the replies, held-out
splits keep whole conversations apart, the length baseline, and `reward.run` on the real pairs in
../shared/data (skipped when absent) with per-source accuracy / ECE and a random-init RM beside it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chatforge.checkpoint import load_model, save_model
from chatforge.config import ConfigError, load_config
from chatforge.data import prefs
from chatforge.train import reward
from chatforge.train.reward import encode_reply, length_baseline
from rl_helpers import tiny_model, tiny_tokenizer

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "rm-real.yaml"


@pytest.fixture(scope="module")
def tok(one_thread):
    return tiny_tokenizer()


def _pair(messages: list[dict], chosen: str, rejected: str, source: str = "s") -> dict:
    return {
        "messages": messages,
        "chosen": {"role": "assistant", "content": chosen},
        "rejected": {"role": "assistant", "content": rejected},
        "source": source,
    }


def test_a_long_prompt_is_cut_from_the_front_so_both_replies_survive(tok) -> None:
    prompt = [{"role": "user", "content": "green apple river stone " * 60}]
    full, full_mask = encode_reply(tok, prompt, "yes happy water", 10_000)
    assert len(full) > 64
    a, a_mask = encode_reply(tok, prompt, "yes happy water", 64)
    b, _ = encode_reply(tok, prompt, "no slow night", 64)
    assert len(a) == 64 and a != b  # the old front-keeping cut made these identical
    assert a == full[-64:] and a_mask == full_mask[-64:]
    assert sum(a_mask) == sum(full_mask)  # the whole reply (and its <|im_end|>) is still scored


def test_split_keeps_every_turn_of_a_conversation_on_one_side() -> None:
    pairs = []
    for i in range(40):
        root = [{"role": "user", "content": f"question {i}"}]
        pairs.append(_pair(root, f"good {i}", f"bad {i}"))
        # a deeper turn of the same thread quotes the first pair's chosen reply
        deeper = [*root, {"role": "assistant", "content": f"good {i}"}, {"role": "user", "content": "more?"}]
        pairs.append(_pair(deeper, f"more good {i}", f"more bad {i}"))
    train, held = prefs.split_by_prompt(pairs, 0.25, seed=3)
    assert train and held and len(train) + len(held) == len(pairs)
    assert not {prefs.thread_key(p["messages"]) for p in train} & {
        prefs.thread_key(p["messages"]) for p in held
    }
    held_replies = {p["chosen"]["content"] for p in held}
    quoted = {m["content"] for p in train for m in p["messages"] if m["role"] == "assistant"}
    assert not held_replies & quoted


def test_length_baseline_counts_longer_wins_and_ties_as_half() -> None:
    pairs = [
        _pair([{"role": "user", "content": "q"}], "a longer reply", "short", "x"),
        _pair([{"role": "user", "content": "q"}], "tiny", "much longer one", "x"),
        _pair([{"role": "user", "content": "q"}], "same", "size", "y"),
    ]
    res = length_baseline(pairs)
    assert res["by_group"] == {"x": 0.5, "y": 0.5}
    assert res["accuracy"] == pytest.approx((1 + 0 + 0.5) / 3, abs=1e-4)


def test_reward_out_and_init_random_config() -> None:
    cfg = load_config(str(RECIPE), ["reward.init_random=true", "reward.out=rm-random"])
    assert cfg.reward.init_random is True and cfg.reward.out == "rm-random"
    assert cfg.reward.init == "base" and cfg.reward.world_pairs == 0 and cfg.reward.pref_files
    with pytest.raises(ConfigError, match=r"reward\.out"):
        load_config(str(RECIPE), ["reward.out=../elsewhere"])


def _recipe_pref_files() -> list[Path]:
    """The recipe's pair files, found in this machine's shared data folder (the recipe's paths are relative
    to the repository root)."""
    cfg = load_config(str(RECIPE))
    root = prefs.chat.shared_data_dir()
    return [root / Path(f).relative_to("../shared/data") for f in cfg.reward.pref_files]


@pytest.mark.skipif(
    not all(p.is_file() for p in _recipe_pref_files()), reason="../shared/data preference sets are absent"
)
def test_reward_stage_on_the_real_pairs_reports_per_source_and_a_random_init_baseline(tok, tmp_path) -> None:
    base = tiny_model(tok)
    with torch.no_grad():
        base.model.embed_tokens.weight.zero_()  # a "pretrained" marker that re-initialisation must erase
    save_model(base, tmp_path / "runs" / "rm-real" / "base", tokenizer=tok)
    files = [str(p) for p in _recipe_pref_files()]
    common = [
        f"runs_dir={tmp_path / 'runs'}",
        "reward.train.steps=4",
        "reward.train.batch_size=4",
        "reward.train.seq_len=128",
        "reward.train.eval_every=2",
        "reward.train.eval_batches=2",
        "reward.train.progress=false",
        "reward.train.threads=1",
    ]
    cfg = load_config(str(RECIPE), common)
    cfg.reward.pref_files = files
    summary = reward.run(cfg, resume=False)
    run_dir = cfg.run_dir

    train, held = prefs.prepared(run_dir)
    assert not {prefs.thread_key(p["messages"]) for p in train} & {
        prefs.thread_key(p["messages"]) for p in held
    }
    sources = {p["source"] for p in held}
    assert len(sources) == len(files)  # every file contributes held-out pairs
    h = summary["heldout"]
    assert h["pairs"] == len(held) and set(h["by_group"]) == sources == set(h["ece_by_group"])
    assert all(0 <= v <= 1 for v in [*h["by_group"].values(), *h["ece_by_group"].values()])
    by_len = h["by_length"]  # accuracy when the chosen reply is the longer / the shorter one
    assert 0 < by_len["chosen_longer"]["pairs"] + by_len["chosen_shorter"]["pairs"] <= len(held)
    base_acc = summary["baselines"]["longer_wins"]
    assert summary["baselines"]["chance"] == 0.5 and set(base_acc["by_group"]) == sources
    assert 0 < base_acc["accuracy"] < 1
    saved = json.loads((run_dir / "rm" / "training_summary.json").read_text())
    assert saved["heldout"]["by_group"] == h["by_group"]
    head_before = load_file(str(run_dir / "rm" / reward.HEAD_FILE))

    # the no-pretraining baseline: same architecture and tokenizer, fresh weights, its own output dir
    cfg = load_config(
        str(RECIPE), [*common, "reward.init_random=true", "reward.out=rm-random", "reward.train.lr=1e-9"]
    )
    cfg.reward.pref_files = [f for f in files if "hh-rlhf" in f]  # the small ones: this checks the plumbing
    rnd = reward.run(cfg, resume=False)
    assert "re-initialised" in rnd["init"] and (run_dir / "train" / "rm-random").is_dir()
    rnd_backbone = load_model(run_dir / "rm-random")
    emb = rnd_backbone.model.embed_tokens.weight.detach()  # not the zeroed "pretrained" one
    assert float(emb.std()) == pytest.approx(rnd_backbone.config.init_std, rel=0.2)
    head_after = load_file(str(run_dir / "rm" / reward.HEAD_FILE))
    assert all(torch.equal(head_before[k], head_after[k]) for k in head_before)  # rm/ left alone
