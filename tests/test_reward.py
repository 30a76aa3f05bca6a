"""Reward model: Bradley–Terry training learns a tiny separable preference; the artifact reloads; DPO
starts at log 2 and widens the chosen-vs-rejected margin."""

import math

import pytest
import torch

from chatforge.config import DPOConfig, RewardConfig, load_config
from chatforge.errors import ChatforgeError
from chatforge.train.dpo import dpo_loss_fn, train_dpo
from chatforge.train.loop import read_metrics
from chatforge.train.reward import (
    calibration,
    load_reward_model,
    pair_batch,
    save_reward_model,
    score,
    tokenize_pairs,
    train_reward_model,
)
from chatforge.train.rollout import load_model_copy
from rl_helpers import tiny_model, tiny_tokenizer, toy_pairs


@pytest.fixture(scope="module")
def tok(one_thread):
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def trained_rm(tok, tmp_path_factory):
    rc = RewardConfig()
    rc.train.steps, rc.train.batch_size, rc.train.lr = 30, 8, 3e-3
    rc.train.progress, rc.train.eval_every = False, 15
    work = tmp_path_factory.mktemp("rm")
    rm, summary = train_reward_model(
        tiny_model(tok), tok, toy_pairs(160, 0), toy_pairs(40, 1), rc, work, resume=False
    )
    return rm, summary, work


def test_bt_loss_decreases_and_the_rm_learns_a_separable_preference(trained_rm) -> None:
    _rm, summary, work = trained_rm
    losses = [r["loss"] for r in read_metrics(work / "metrics.jsonl", "train")]
    assert losses[0] == pytest.approx(math.log(2), abs=0.1)  # a fresh head barely separates anything
    assert sum(losses[-5:]) / 5 < 0.2 * losses[0]
    assert summary["heldout"]["accuracy"] == 1.0  # held-out prompts it never saw
    assert 0 <= summary["heldout"]["ece"] <= 1 and summary["heldout"]["reliability"]


def test_reward_model_artifact_reloads_with_the_same_scores(trained_rm, tok, tmp_path) -> None:
    rm, _, _ = trained_rm
    save_reward_model(rm, tmp_path / "rm", tok)
    assert (tmp_path / "rm" / "config.json").is_file() and (tmp_path / "rm" / "model.safetensors").is_file()
    again = load_reward_model(tmp_path / "rm")
    prompts = [[{"role": "user", "content": "green apple?"}]] * 2
    a, b = (
        score(rm.eval(), tok, prompts, ["yes river", "no river"]),
        score(again, tok, prompts, ["yes river", "no river"]),
    )
    assert a == pytest.approx(b, abs=1e-5) and a[0] > a[1]
    with pytest.raises(ChatforgeError, match="not a reward model"):
        load_reward_model(tmp_path)


def test_calibration_of_a_perfect_confident_model_is_near_zero() -> None:
    import numpy as np

    res = calibration(np.full(100, 8.0), bins=10)
    assert res["ece"] < 0.01


def test_likelihood_feature_rm_learns_saves_and_reloads(tok, tmp_path) -> None:
    """``reward.lm_feature``: the score adds w · the reply's log-likelihood under the backbone's LM head.
    It trains on the same separable preference, its learnt w and scores survive a save/load, and the
    likelihood term really is part of the score (changing w moves the scores by w · log-likelihood)."""
    rc = RewardConfig(lm_feature=True)
    rc.train.steps, rc.train.batch_size, rc.train.lr = 30, 8, 3e-3
    rc.train.progress, rc.train.eval_every = False, 0
    rm, summary = train_reward_model(
        tiny_model(tok), tok, toy_pairs(160, 0), toy_pairs(40, 1), rc, tmp_path / "w", resume=False
    )
    assert summary["heldout"]["accuracy"] == 1.0
    assert float(rm.lm_weight.detach()) != pytest.approx(0.1)  # learnt, not left at its start
    save_reward_model(rm, tmp_path / "rm", tok)
    again = load_reward_model(tmp_path / "rm")
    assert float(again.lm_weight.detach()) == pytest.approx(float(rm.lm_weight.detach()))
    prompts = [[{"role": "user", "content": "green apple?"}]] * 2
    replies = ["yes river", "no river"]
    a = score(rm.eval(), tok, prompts, replies)
    assert a == pytest.approx(score(again, tok, prompts, replies), abs=1e-5) and a[0] > a[1]
    with torch.no_grad():
        again.lm_weight.add_(1.0)
    b = score(again, tok, prompts, replies)
    assert all(abs(x - y) > 1e-3 for x, y in zip(a, b))  # the likelihood term moved each score
    with pytest.raises(ValueError, match="reply_mask"):
        again(torch.tensor([[1, 2, 3]]), torch.tensor([3]))


def test_pair_weights_scale_the_loss_and_outvote_a_careless_rater(tok, tmp_path) -> None:
    """A pair's weight (a rater's reliability) scales its Bradley–Terry loss: weight 0 counts for nothing.
    Trained on pairs of which 60% come from a rater who votes backwards, the RM learns the backwards
    preference, unless that rater's pairs carry the low weight `feedback raters` would give them."""
    from chatforge.train.reward import RewardModel, bt_loss_fn

    rm = RewardModel(tiny_model(tok))
    enc = tokenize_pairs(toy_pairs(2, 5), tok, 256)
    both = pair_batch([enc[0], (*enc[1][:4], 0.0)], tok.pad_id)
    first = pair_batch(enc[:1], tok.pad_id)
    with torch.no_grad():
        loss_both, loss_first = bt_loss_fn(0.0)(rm, both)[0], bt_loss_fn(0.0)(rm, first)[0]
    assert float(loss_both) == pytest.approx(float(loss_first), abs=1e-6)

    def flip(p: dict) -> dict:
        return {**p, "chosen": p["rejected"], "rejected": p["chosen"], "weight": 0.05}

    pairs = [flip(p) if i % 5 < 3 else p for i, p in enumerate(toy_pairs(160, 7))]
    unweighted = [{k: v for k, v in p.items() if k != "weight"} for p in pairs]
    acc = {}
    for name, train in (("weighted", pairs), ("unweighted", unweighted)):
        rc = RewardConfig()
        rc.train.steps, rc.train.batch_size, rc.train.lr = 30, 8, 3e-3
        rc.train.progress, rc.train.eval_every = False, 0
        _, summary = train_reward_model(
            tiny_model(tok), tok, train, toy_pairs(40, 1), rc, tmp_path / name, False
        )
        acc[name] = summary["heldout"]["accuracy"]
    assert acc["weighted"] >= 0.9 and acc["unweighted"] <= 0.1, acc


def test_dpo_loss_starts_at_log2_and_the_margin_grows(tok, tmp_path) -> None:
    policy = tiny_model(tok, seed=1)
    pairs = toy_pairs(96, 2)
    ref = load_model_copy(policy).eval()
    b = pair_batch(tokenize_pairs(pairs[:8], tok, 256), tok.pad_id)
    loss, _, _ = dpo_loss_fn(ref, beta=0.1)(policy, b)
    assert float(loss) == pytest.approx(math.log(2), abs=1e-5)
    dc = DPOConfig(beta=0.5)
    dc.train.steps, dc.train.batch_size, dc.train.lr, dc.train.progress = 25, 8, 3e-3, False
    dc.train.eval_every = 0
    _, summary = train_dpo(policy, tok, pairs, toy_pairs(16, 3), dc, tmp_path / "dpo", resume=False)
    recs = read_metrics(tmp_path / "dpo" / "metrics.jsonl", "train")
    assert recs[-1]["loss"] < 0.5 * math.log(2)
    assert recs[-1]["reward_margin"] > recs[0]["reward_margin"] + 1.0
    assert summary["heldout_accuracy"] >= 0.9 and summary["heldout_margin"] > 1.0


def test_reward_and_dpo_configs_reject_bad_values_in_one_line() -> None:
    for override, needle in [
        ("reward.margin=-1", "reward.margin"),
        ("reward.world_pairs=-5", "reward.world_pairs"),
        ("dpo.beta=0", "dpo.beta"),
        ("reward.train.lrr=1", "did you mean 'lr'"),
    ]:
        with pytest.raises(ChatforgeError, match=needle) as e:
            load_config(None, [override])
        assert "\n" not in str(e.value)
