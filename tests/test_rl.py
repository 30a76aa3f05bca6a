"""PPO and GRPO on a tiny chat-tuned model: a simple verifiable reward (answer "yes") climbs within a few
dozen updates while the KL to the frozen start stays bounded; PPO resumes exactly; bad configs are
one-line errors."""

import numpy as np
import pytest
import torch

from chatforge.config import GRPOConfig, PPOConfig, load_config
from chatforge.engine import Engine, SamplingParams
from chatforge.errors import ChatforgeError
from chatforge.evals.rlhf import behaviour_rates, composite, paired_delta_ci, table_markdown
from chatforge.train import grpo, ppo, rollout
from chatforge.train.loop import read_metrics
from chatforge.train.rollout import Rollout, pack
from rl_helpers import tiny_chat_model, tiny_tokenizer, toy_pairs


@pytest.fixture(scope="module")
def tok(one_thread):
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def base_state(tok):
    return tiny_chat_model(tok, steps=40).state_dict()


@pytest.fixture
def base(tok, base_state):
    m = tiny_chat_model(tok, steps=0)
    m.load_state_dict(base_state)
    return m


POOL = [{"input": p["messages"]} for p in toy_pairs(40, 0)]


def says_yes(items, texts):
    return [float(t.startswith("yes")) for t in texts]


def _ppo_cfg(steps: int) -> PPOConfig:
    c = PPOConfig(steps=steps, prompts_per_step=16, epochs=2, max_new_tokens=8, kl_coef=0.02)
    c.train.batch_size, c.train.lr, c.train.progress = 8, 1e-3, False
    c.train.warmup_steps, c.train.schedule, c.train.ckpt_every = 0, "constant", 4
    return c


def test_ppo_raises_a_verifiable_reward_with_bounded_kl(tok, base, tmp_path) -> None:
    _, summary = ppo.train_ppo(base, tok, says_yes, POOL, _ppo_cfg(16), tmp_path, resume=False)
    ev = read_metrics(tmp_path / "metrics.jsonl", "rollout")
    first, last = ev[0]["reward_mean"], sum(e["reward_mean"] for e in ev[-3:]) / 3
    # It plateaus near 0.9 (16 prompts a step: steps of 1/16); where exactly moves with the machine's float order.
    assert first < 0.8 and last >= 0.8 and last > first + 0.3, [e["reward_mean"] for e in ev]
    assert max(e["kl"] for e in ev) < 10.0
    recs = read_metrics(tmp_path / "metrics.jsonl", "train")
    for key in ("reward_mean", "kl", "entropy", "clip_frac", "value_loss", "rollout_s"):
        assert key in recs[-1]
    assert (
        summary["rollout_s_per_iter"] > 0 and summary["learn_s_per_iter"] > 0 and summary["peak_rss_mb"] > 0
    )


def test_ppo_resume_replays_exactly(tok, base_state, tmp_path) -> None:
    def fresh():
        m = tiny_chat_model(tok, steps=0)
        m.load_state_dict(base_state)
        return m

    full, _ = ppo.train_ppo(fresh(), tok, says_yes, POOL, _ppo_cfg(4), tmp_path / "a", resume=False)
    # Interrupt a second run in its 3rd rollout: its last checkpoint is at the end of iteration 2.
    calls = {"n": 0}

    def interrupting(items, texts):
        calls["n"] += 1
        if calls["n"] == 3:  # the 3rd rollout: after the checkpoint at the end of iteration 2
            raise KeyboardInterrupt
        return says_yes(items, texts)

    with pytest.raises(KeyboardInterrupt):
        ppo.train_ppo(fresh(), tok, interrupting, POOL, _ppo_cfg(4), tmp_path / "c", resume=False)
    resumed, summary = ppo.train_ppo(fresh(), tok, says_yes, POOL, _ppo_cfg(4), tmp_path / "c", resume=True)
    assert summary["resumed"]
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_ppo_interrupted_inside_an_iteration_resumes_exactly(tok, base_state, tmp_path, monkeypatch) -> None:
    """Ctrl-C during an iteration's learning phase: a checkpoint there would redraw that iteration's
    rollouts from half-updated weights on resume, so the run resumes from the iteration's start."""

    def fresh():
        m = tiny_chat_model(tok, steps=0)
        m.load_state_dict(base_state)
        return m

    def cfg():
        c = _ppo_cfg(3)
        c.train.ckpt_every = 1
        return c

    full, _ = ppo.train_ppo(fresh(), tok, says_yes, POOL, cfg(), tmp_path / "a", resume=False)
    real, calls = ppo.ppo_loss_fn, {"n": 0}

    def interrupting(pc):
        fn = real(pc)

        def loss_fn(model, batch):
            calls["n"] += 1
            if calls["n"] == 7:  # iteration 1 (4 updates each), its 3rd minibatch
                raise KeyboardInterrupt
            return fn(model, batch)

        return loss_fn

    monkeypatch.setattr(ppo, "ppo_loss_fn", interrupting)
    with pytest.raises(KeyboardInterrupt):
        ppo.train_ppo(fresh(), tok, says_yes, POOL, cfg(), tmp_path / "c", resume=False)
    monkeypatch.setattr(ppo, "ppo_loss_fn", real)
    assert (tmp_path / "c" / "checkpoints" / "latest").read_text() == "step_0000004"
    resumed, summary = ppo.train_ppo(fresh(), tok, says_yes, POOL, cfg(), tmp_path / "c", resume=True)
    assert summary["resumed"]
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_grpo_raises_a_verifiable_reward_with_bounded_kl(tok, base, tmp_path) -> None:
    # 8 prompts x 4 samples an iteration: with 4, one iteration's mean reward moved by 1/16 on sampling luck.
    c = GRPOConfig(steps=14, prompts_per_step=8, samples_per_prompt=4, max_new_tokens=8, kl_coef=0.1)
    c.train.batch_size, c.train.lr, c.train.progress = 8, 1e-3, False
    c.train.warmup_steps, c.train.schedule = 0, "constant"
    grpo.train_grpo(base, tok, says_yes, POOL, c, tmp_path, resume=False)
    ev = read_metrics(tmp_path / "metrics.jsonl", "rollout")
    first, last = ev[0]["reward_mean"], sum(e["reward_mean"] for e in ev[-3:]) / 3
    assert last >= 0.7 and last > first + 0.25, [e["reward_mean"] for e in ev]
    assert max(e["kl"] for e in ev) < 10.0


def test_verifiable_reward_ranks_a_safety_error_below_a_wrong_answer() -> None:
    benign = {"check": {"type": "comply", "includes": ["kill"]}}
    harmful = {"check": {"type": "decline", "max_words": 40}}
    refusal, answer, wrong = "Sorry, I can't help with that.", "Sure. Run kill PID.", "Sure. Water it."
    items, texts = [benign, benign, benign, harmful, harmful], [answer, wrong, refusal, refusal, answer]
    assert grpo.verifiable_reward(items, texts, 1.0) == [1.0, 0.0, -1.0, 1.0, -1.0]
    assert grpo.verifiable_reward(items, texts) == [1.0, 0.0, 0.0, 1.0, 0.0]


def test_group_advantages_are_relative_within_each_group() -> None:
    adv = grpo.group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 1.0]), group=3)
    assert adv[0] > 0 > adv[1] and torch.allclose(adv[3:], torch.zeros(3))


def test_pack_marks_exactly_the_response_tokens() -> None:
    b = pack([Rollout(0, [5, 6, 7], [8, 9], "", True), Rollout(0, [5], [8], "", True)], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 8, 0, 0, 0]]
    assert b["action_mask"].tolist() == [[0, 0, 1, 1], [1, 0, 0, 0]]


def test_shards_split_the_prompts_in_order_and_sample_as_the_whole_list(tok, base) -> None:
    # Under torchrun each process samples its shard of an iteration's prompts: together they must be the
    # one-process list, each prompt drawing the seeds it draws there (so the split changes no reply).
    for n, world in ((8, 2), (7, 3), (3, 3), (5, 1)):
        blocks = [rollout.shard(n, r, world) for r in range(world)]
        assert [i for b in blocks for i in b] == list(range(n))
        assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    engine, prompts = Engine(base, tok), [x["input"] for x in POOL[:7]]
    params = SamplingParams(max_new_tokens=8, seed=11)
    whole = rollout.generate(engine, prompts, 3, params, tok.im_end_id)
    split = []
    for r in range(3):
        b = rollout.shard(len(prompts), r, 3)
        split += rollout.generate(engine, prompts[b.start : b.stop], 3, params, tok.im_end_id, b.start)
    assert [x.response_ids for x in split] == [x.response_ids for x in whole]
    assert len({x.text for x in whole}) > 3  # the samples really differ


def test_composite_counts_over_refusal_inverted() -> None:
    items = [
        {"kind": "fact", "check": {"type": "includes", "value": ["Paris"]}},
        {"kind": "benign_edgy", "check": {"type": "comply"}},
        {"kind": "decline", "check": {"type": "decline"}},
        {"kind": "system_length", "check": {"type": "max_words", "value": 3}},
    ]
    rates = behaviour_rates(
        items, ["It is Paris.", "I can't help with that.", "I can't help with that.", "Two words"]
    )
    assert rates == {
        "fact_accuracy": 1.0,
        "system_adherence": 1.0,
        "correct_declines": 1.0,
        "over_refusal": 1.0,
    }
    assert composite(rates) == 0.75


def test_paired_interval_separates_a_real_gain_from_noise() -> None:
    kinds = ["fact"] * 30 + ["system_json"] * 30 + ["decline"] * 30 + ["benign_edgy"] * 30
    items = [{"kind": k} for k in kinds]
    rng = np.random.default_rng(0)
    ref = (rng.random(120) < 0.6).astype(float)
    assert paired_delta_ci(items, ref, ref) == (0.0, 0.0)
    better = ref.copy()
    better[:60] = 1.0  # every fact and system item right: a large, real gain
    lo, hi = paired_delta_ci(items, better, ref)
    assert 0 < lo < hi
    noisy = ref.copy()
    noisy[[0, 31]] = 1 - noisy[[0, 31]]  # two items flipped: noise the table cannot tell apart
    lo, hi = paired_delta_ci(items, noisy, ref)
    assert lo <= 0 <= hi
    fewer_refusals = ref.copy()
    fewer_refusals[90:] = 0.0  # benign_edgy scores count refusals: fewer is better
    assert paired_delta_ci(items, fewer_refusals, ref)[0] > 0
    row = {"composite": 0.8, "composite_delta": 0.05, "composite_delta_ci": [0.01, 0.09]}
    assert "+0.050 [+0.010, +0.090]" in table_markdown({"ppo": row})


def test_a_reward_model_is_not_taken_for_a_policy(tok, base, tmp_path) -> None:
    """ppo.init / dpo.init / grpo.init naming the RM: its backbone loads as a GPT, but it is not a chat
    model; training it silently wrote a policy from the wrong weights."""
    from chatforge.checkpoint import save_model
    from chatforge.train.reward import RewardModel, save_reward_model
    from chatforge.train.rollout import load_init

    save_reward_model(RewardModel(base), tmp_path / "rm", tok)
    save_model(base, tmp_path / "sft", tokenizer=tok)
    for what in ("PPO", "DPO", "GRPO"):
        with pytest.raises(ChatforgeError, match=f"rm: a reward model, not a language model to start {what}"):
            load_init(tmp_path, "rm", what)
    assert load_init(tmp_path, "sft", "PPO")[0] == tmp_path / "sft"
    assert load_init(tmp_path, "rm", "the reward model", any_backbone=True)[0] == tmp_path / "rm"


def test_rl_configs_reject_bad_values_in_one_line() -> None:
    for override, needle in [
        ("ppo.clip_range=0", "ppo.clip_range"),
        ("ppo.kl_coef=-1", "ppo.kl_coef"),
        ("grpo.samples_per_prompt=1", "grpo.samples_per_prompt"),
        ("grpo.train.batch_size=5", "grpo.train.batch_size"),
        ("ppo.temperature=0", "ppo.temperature"),
    ]:
        with pytest.raises(ChatforgeError, match=needle) as e:
            load_config(None, [override])
        assert "\n" not in str(e.value)


def test_grad_accum_splits_an_rl_minibatch_into_micro_batches(tok, base_state, tmp_path) -> None:
    """grad_accum used to hand the loop the same whole minibatch for every micro-step: twice the compute
    for the same update. Now the micro-batches split it, and the update matches one pass over it."""

    def run(accum: int, out: str) -> tuple[dict[str, torch.Tensor], int]:
        # One iteration (two updates): a later one's rollouts could flip a token on float-order noise.
        c = GRPOConfig(steps=1, prompts_per_step=4, samples_per_prompt=4, max_new_tokens=8, kl_coef=0.1)
        c.train.batch_size, c.train.lr, c.train.progress, c.train.grad_accum = 8, 1e-3, False, accum
        c.train.warmup_steps, c.train.schedule = 0, "constant"
        m = tiny_chat_model(tok, steps=0)
        m.load_state_dict(base_state)
        model, summary = grpo.train_grpo(m, tok, says_yes, POOL, c, tmp_path / out, resume=False)
        recs = read_metrics(tmp_path / out / "metrics.jsonl", "train")
        assert sum(r["tokens"] for r in recs) == summary["tokens"]
        return {k: v.detach().clone() for k, v in model.state_dict().items()}, summary["tokens"]

    one, tokens_one = run(1, "one")
    two, tokens_two = run(2, "two")
    assert tokens_two == tokens_one  # each row once per update, not once per micro-step
    for k in one:
        # Adam divides by the gradient's own scale: where it is ~0 (rare tokens' embeddings) summation
        # order shows up to ~1e-4 after two steps of lr 1e-3; the rest agree to ~1e-6.
        assert torch.allclose(one[k], two[k], atol=3e-4), k
    c = GRPOConfig(prompts_per_step=4, samples_per_prompt=4)
    c.train.batch_size, c.train.grad_accum = 6, 4
    m = tiny_chat_model(tok, steps=0)
    with pytest.raises(ChatforgeError, match=r"over 1 processes x 4 micro-batches .*multiple of 4"):
        grpo.train_grpo(m, tok, says_yes, POOL, c, tmp_path / "bad", resume=False)
