"""Checkpoint directories: transformers models load as our GPT and back, writes are atomic, errors are clear."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import chatforge.checkpoint as checkpoint
from chatforge.checkpoint import load_model, load_train_state, save_model
from chatforge.config import ModelConfig
from chatforge.errors import ChatforgeError
from chatforge.model import GPT, lm_loss

VOCAB = 101
TOL = 1e-4
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
)


def hf_model(family: str) -> PreTrainedModel:
    """A randomly initialised transformers model, built here from a config (no download)."""
    torch.manual_seed(0)
    # A non-default rope theta, so that a theta that is not carried over shows up in the logits.
    rope = {"rope_type": "default", "rope_theta": 50000.0}
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**COMMON, num_key_value_heads=2, rope_parameters=rope))
    elif family == "qwen2":  # q/k/v biases, tied embeddings like the small Qwen2 models
        model = Qwen2ForCausalLM(
            Qwen2Config(**COMMON, num_key_value_heads=2, tie_word_embeddings=True, rope_parameters=rope)
        )
    else:  # qwen3: qk-norm and a head_dim that is not hidden/heads
        model = Qwen3ForCausalLM(
            Qwen3Config(**COMMON, num_key_value_heads=2, head_dim=32, rope_parameters=rope)
        )
    # Fresh norms are 1 and biases 0: perturb everything so a wrongly mapped one changes the logits.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------- transformers -> ours -> transformers


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_transformers_model_loads_trains_and_saves_back(family: str, tmp_path: Path) -> None:
    hf = hf_model(family)
    hf.save_pretrained(tmp_path / "hf")
    ids = tokens(2, 30)

    ours = load_model(tmp_path / "hf")
    assert isinstance(ours, GPT)
    assert ours.config.qk_norm == (family == "qwen3")
    assert ours.config.attention_bias == (family == "qwen2")
    assert ours.config.rope_theta == 50000.0
    with torch.no_grad():
        before = ours(ids)
        assert max_diff(before, hf(ids).logits) <= TOL

    # A few training steps with our model, then back to transformers.
    ours.train()
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-2)
    batch = tokens(4, 17, seed=2)
    for _ in range(3):
        lm_loss(ours(batch[:, :-1]), batch[:, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    ours.eval()
    save_model(ours, tmp_path / "ours", tokenizer=None)
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["model_type"] == family

    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(back) is type(hf)
    with torch.no_grad():
        after = ours(ids)
        assert max_diff(after, before) > 1e-2  # training changed the model...
        assert max_diff(after, back(ids).logits) <= TOL  # ...and transformers sees the same change


def test_a_sliding_window_caps_the_context_so_the_logits_stay_exact(tmp_path: Path) -> None:
    """Mistral's sliding-window attention is not built here, but inside the window it is full causal
    attention: the loaded model's context is the window, and up to it the logits are transformers'."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    hf = MistralForCausalLM(MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=16)).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    assert ours.config.max_position_embeddings == 16
    ids = tokens(2, 16)
    with torch.no_grad():
        assert max_diff(ours(ids), hf(ids).logits) <= TOL


def test_ours_round_trips_through_our_own_loader(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, qk_norm=True))
    save_model(model, tmp_path / "m", train_state={"step": 7, "rng": torch.arange(3)})
    again = load_model(tmp_path / "m")
    assert again.config == model.config
    ids = tokens(2, 12)
    with torch.no_grad():
        assert max_diff(model(ids), again(ids)) == 0.0
    state = load_train_state(tmp_path / "m")
    assert state is not None and state["step"] == 7 and state["rng"].tolist() == [0, 1, 2]
    assert load_train_state(tmp_path / "nowhere") is None


# ---------------------------------------------------------------- atomic writes


def small_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, intermediate_size=64))


def snapshot(d: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(d.iterdir())}


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path: Path, monkeypatch) -> None:
    dest = tmp_path / "ckpt"
    old = small_model(0)
    save_model(old, dest)
    before = snapshot(dest)

    def boom(*args, **kwargs) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_model(small_model(1), dest)
    assert snapshot(dest) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp or old directory left behind
    ids = tokens(1, 8)
    with torch.no_grad():
        assert max_diff(load_model(dest)(ids), old(ids)) == 0.0

    # A failed first save leaves nothing at all.
    with pytest.raises(OSError, match="disk full"):
        save_model(old, tmp_path / "fresh")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_overwrite_replaces_checkpoint_without_leftovers(tmp_path: Path) -> None:
    dest = tmp_path / "ckpt"
    save_model(small_model(0), dest, train_state={"step": 1})
    new = small_model(1)
    save_model(new, dest)  # no train_state this time: the old one must not survive
    assert sorted(p.name for p in dest.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    ids = tokens(1, 8)
    with torch.no_grad():
        assert max_diff(load_model(dest)(ids), new(ids)) == 0.0


# ---------------------------------------------------------------- clear errors


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    dest = tmp_path / "ckpt"
    save_model(small_model(0), dest)
    return dest


def edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


def test_directory_without_config_json(tmp_path: Path) -> None:
    with pytest.raises(ChatforgeError, match=r"not a model directory \(no config.json\)"):
        load_model(tmp_path)
    with pytest.raises(ChatforgeError, match=r"no config\.json"):
        load_model(tmp_path / "does-not-exist")


def test_config_json_that_is_not_json(saved: Path) -> None:
    (saved / "config.json").write_text("{not json")
    with pytest.raises(ChatforgeError, match=r"config\.json: not valid JSON"):
        load_model(saved)


def test_unsupported_model_type(saved: Path) -> None:
    edit_config(saved, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(ChatforgeError, match=r"model_type 'gpt2' is not supported \(supported: llama"):
        load_model(saved)


def test_unsupported_activation_and_rope_scaling(saved: Path) -> None:
    edit_config(saved, hidden_act="gelu")
    with pytest.raises(ChatforgeError, match="hidden_act 'gelu' is not supported"):
        load_model(saved)
    edit_config(saved, hidden_act="silu", rope_parameters={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ChatforgeError, match="rope scaling 'yarn' is not supported"):
        load_model(saved)


def test_config_missing_a_required_field(saved: Path) -> None:
    edit_config(saved, hidden_size=None)
    with pytest.raises(ChatforgeError, match="missing field 'hidden_size'"):
        load_model(saved)
    edit_config(saved, hidden_size=64, num_attention_heads=None, head_dim=None)  # was a KeyError
    with pytest.raises(ChatforgeError, match="missing field 'num_attention_heads'"):
        load_model(saved)
    (saved / "config.json").write_text("[1]")  # JSON, but not an object: was an AttributeError
    with pytest.raises(ChatforgeError, match=r"config\.json: expected a JSON object, got list"):
        load_model(saved)


def test_truncated_or_corrupt_weights(saved: Path) -> None:
    """An interrupted copy or download: a one-line error naming the file, not a SafetensorError."""
    f = saved / "model.safetensors"
    full = f.read_bytes()
    for data in (full[: len(full) // 2], b"", b"\x00" * 64):
        f.write_bytes(data)
        with pytest.raises(ChatforgeError, match=r"model\.safetensors: not a readable safetensors file"):
            load_model(saved)
    f.unlink()
    (saved / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ChatforgeError, match=r"index\.json: not a safetensors index \(no weight_map\)"):
        load_model(saved)


def test_missing_weights_file(saved: Path) -> None:
    (saved / "model.safetensors").unlink()
    with pytest.raises(ChatforgeError, match=r"no model.safetensors \(or sharded index\) found"):
        load_model(saved)


def test_weights_missing_for_the_config(saved: Path) -> None:
    edit_config(saved, num_hidden_layers=2)  # the file holds one layer
    with pytest.raises(
        ChatforgeError, match=r"weights do not match config.json \(missing: \['model.layers.1"
    ):
        load_model(saved)


def test_weights_of_the_wrong_shape_for_the_config(saved: Path) -> None:
    edit_config(saved, intermediate_size=128)  # the file holds 64
    with pytest.raises(ChatforgeError, match=r"do not match config\.json"):
        load_model(saved)


# ---------------------------------------------------------------- chat checkpoints in transformers

CHAT = [
    {"role": "user", "content": "Who builds clocks?"},
    {"role": "assistant", "content": "Ada builds clocks."},
]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Path:
    """A real (tiny) SFT stage on one conversation, from a saved base model: it learns to end its reply."""
    from chatforge.config import load_config
    from chatforge.train import sft
    from serve_util import make_checkpoints

    root = tmp_path_factory.mktemp("chat")
    make_checkpoints(root / "runs" / "tiny", ("base",))  # <run>/base, saved as a base model
    data = root / "chat.jsonl"
    data.write_text((json.dumps({"messages": CHAT}) + "\n") * 40)
    cfg = load_config(
        None,
        [
            f"runs_dir={root / 'runs'}",
            "name=tiny",
            "chat_data.sources[0].kind=openai",
            "chat_data.replay_fraction=0",
            f"chat_data.sources[0].path={data}",
            "sft.steps=80",
            "sft.batch_size=4",
            "sft.seq_len=64",
            "sft.eval_every=1000",
            "sft.ckpt_every=1000",
            "sft.progress=false",
            "evals.during_training_suite=''",
        ],
    )
    sft.run(cfg)
    return root / "runs" / "tiny"


def test_a_chat_checkpoint_ends_its_turns_with_im_end_in_transformers(sft_run: Path) -> None:
    from transformers import AutoTokenizer

    from chatforge.tokenizer import Tokenizer

    base, chat = sft_run / "base", sft_run / "sft"
    for path, eos in ((base, "<|endoftext|>"), (chat, "<|im_end|>")):  # base models keep <|endoftext|>
        for f in ("tokenizer_config.json", "special_tokens_map.json"):
            assert json.loads((path / f).read_text())["eos_token"] == eos, (path, f)
        assert AutoTokenizer.from_pretrained(path).eos_token == eos
    assert (Tokenizer.load(base).chat, Tokenizer.load(chat).chat) == (False, True)

    hf_tok = AutoTokenizer.from_pretrained(chat)
    ours = Tokenizer.load(chat)
    assert hf_tok.eos_token_id == ours.im_end_id
    prompt = CHAT[:1]
    text = hf_tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert text == ours.render_chat(prompt, add_generation_prompt=True)
    assert hf_tok.apply_chat_template(CHAT, tokenize=False) == ours.render_chat(CHAT)
    ids = hf_tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # v5 returns a BatchEncoding
    assert ids == ours.apply_chat_template(prompt, add_generation_prompt=True)

    # transformers' generate, stopping where the tokenizer says the turn ends (as pipelines and servers
    # that read eos_token do): the learnt reply, then <|im_end|>, and nothing after it.
    model = AutoModelForCausalLM.from_pretrained(chat, dtype=torch.float32).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            x,
            max_new_tokens=30,
            do_sample=False,
            eos_token_id=hf_tok.eos_token_id,
            pad_token_id=hf_tok.pad_token_id,
        )
    new = out[0, x.shape[1] :].tolist()
    assert new[-1] == ours.im_end_id and new.count(ours.im_end_id) == 1
    assert hf_tok.decode(new, skip_special_tokens=True) == "Ada builds clocks."
    # The checkpoint's own generation config stops there too.
    with torch.no_grad():
        plain = model.generate(x, max_new_tokens=30, do_sample=False, pad_token_id=hf_tok.pad_token_id)
    assert plain[0, x.shape[1] :].tolist() == new


def test_a_tokenizer_config_that_names_eos_as_an_object_still_loads(sft_run: Path, tmp_path: Path) -> None:
    """transformers' save_pretrained may write eos_token as an AddedToken object; an old checkpoint names
    <|endoftext|>: both load, as chat and as base."""
    import shutil

    from chatforge.tokenizer import Tokenizer

    chat = tmp_path / "resaved"
    shutil.copytree(sft_run / "sft", chat)
    f = chat / "tokenizer_config.json"
    cfg = json.loads(f.read_text())
    f.write_text(json.dumps({**cfg, "eos_token": {"content": "<|im_end|>", "special": True}}))
    assert Tokenizer.load(chat).chat
    f.write_text(json.dumps({**cfg, "eos_token": "<|endoftext|>"}))  # as every checkpoint said before
    old = Tokenizer.load(chat)
    assert not old.chat and old.im_end_id == 2 and old.eos_id == 0


def test_the_later_chat_stages_save_chat_checkpoints_from_an_old_one(sft_run: Path, tmp_path: Path) -> None:
    """Reward, DPO/GRPO/PPO policies save <|im_end|> as eos_token even when they start from an SFT
    checkpoint written before chat checkpoints said so."""
    from chatforge.tokenizer import Tokenizer
    from chatforge.train.ppo import PolicyWithValue, _save
    from chatforge.train.reward import RewardModel, save_reward_model
    from chatforge.train.rollout import save_policy

    old = Tokenizer.load(sft_run / "base")  # says <|endoftext|>, as an old SFT checkpoint does
    model = load_model(sft_run / "sft")
    save_policy(model, tmp_path / "policy", old, {"steps": 1})
    save_reward_model(RewardModel(load_model(sft_run / "sft")), tmp_path / "rm", old)
    _save(PolicyWithValue(model, kl_coef=0.05), tmp_path / "ppo", old)
    for name in ("policy", "rm", "ppo"):
        assert (
            json.loads((tmp_path / name / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"
        )
    assert not old.chat  # saving did not change the tokenizer it was given
