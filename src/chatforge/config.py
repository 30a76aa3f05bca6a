"""Configs as dataclasses, loaded from YAML recipes with ``--set key=value`` overrides.

Every mistake in a config (unknown key, wrong type, bad value) raises ``ConfigError`` with a one-line
message that names the dotted key, e.g. ``pretrain.lr: expected a number, got 'fast'``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import itertools
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from chatforge.errors import ChatforgeError, read_user_text
from chatforge.yamlio import DuplicateKeyError, load_yaml, parse_yaml

T = TypeVar("T")

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
DEFAULT_RECIPE = "cpu-demo"


class ConfigError(ChatforgeError):
    """A bad config key or value; the message is one line and names the key."""


# ---------------------------------------------------------------- the config tree


@dataclass
class SourceConfig:
    """One input of the data stage.

    kind: ``world`` (the built-in generator), ``text`` (.txt, one document per file or per blank-line
    block), ``jsonl`` / ``parquet`` (a text field per record) or ``hf`` (a Hugging Face dataset).
    ``path`` may be a file, a directory or a glob; ``.gz`` files are read transparently.
    """

    kind: str = "world"
    path: str = ""
    text_field: str = "text"
    split: str = "train"  # hf only
    name: str = ""  # hf dataset config name
    streaming: bool = False  # hf only
    max_docs: int = 0  # 0 = all
    seed: int = 0  # world only
    n_docs: int = 4000  # world only
    # world only, and for pretraining-only runs (`chatforge scaling`): the chat, preference and eval stages
    # use the default-size world of the same seed.
    people: int = 120
    places: int = 40
    zipf: float = 0.0  # > 0: documents pick their main entity with weight 1/rank^zipf (0 = equal turns)
    records: float = 0.0  # world only: share of documents that are data records (JSON, lookups, CSV)
    split_on_blank_lines: bool = False  # text only: one document per paragraph block

    def validate(self, key: str) -> None:
        _check_source(key, self.kind, self.path, ("world", "text", "jsonl", "parquet", "hf"))
        if self.kind == "world":
            _check_range(f"{key}.people", self.people, 2, 100_000)
            _check_range(f"{key}.places", self.places, 2, 1000)
            _check_range(f"{key}.zipf", self.zipf, 0.0, 10.0)
            _check_range(f"{key}.records", self.records, 0.0, 0.9)


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    min_chars: int = 64  # shorter documents are dropped
    max_chars: int = 200_000  # longer ones are cut at a paragraph boundary
    max_dup_line_frac: float = 0.3  # repetition filter: share of lines that repeat within a document
    max_top_ngram_frac: float = 0.2  # repetition filter: share of chars in the most frequent word 3-gram
    min_alpha_frac: float = 0.5  # non-text filter: share of letters among non-space characters
    near_dup_threshold: float = 0.8  # MinHash Jaccard threshold; 1.0 turns near-dedup off
    minhash_perm: int = 64
    val_fraction: float = 0.02
    num_workers: int = 0  # 0 = all cores
    seed: int = 0  # salts the hash that assigns documents to train or val

    def validate(self, key: str) -> None:
        if not self.sources:
            raise ConfigError(f"{key}.sources: at least one source is needed")
        for i, s in enumerate(self.sources):
            s.validate(f"{key}.sources[{i}]")
        _check_range(f"{key}.val_fraction", self.val_fraction, 0.0, 0.5, lo_open=True)
        _check_range(f"{key}.near_dup_threshold", self.near_dup_threshold, 0.0, 1.0, lo_open=True)
        _check_range(f"{key}.min_alpha_frac", self.min_alpha_frac, 0.0, 1.0)
        if self.min_chars < 0 or self.max_chars <= self.min_chars:
            raise ConfigError(f"{key}.max_chars: must be greater than min_chars ({self.min_chars})")


@dataclass
class TokenizerConfig:
    vocab_size: int = 4096
    min_frequency: int = 2
    max_train_docs: int = 50_000  # a sample is enough for BPE merges

    def validate(self, key: str) -> None:
        if not 300 <= self.vocab_size <= 1_000_000:
            raise ConfigError(f"{key}.vocab_size: must be between 300 and 1000000, got {self.vocab_size}")


@dataclass
class ModelConfig:
    """Sizes of the one transformer; names follow transformers' LlamaConfig where they overlap."""

    vocab_size: int = 4096  # set from the tokenizer (rounded up to a multiple of 64) when pretraining
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    intermediate_size: int = 688
    head_dim: int = 0  # 0 = hidden_size // num_attention_heads
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2-style q/k/v bias
    qk_norm: bool = False  # Qwen3-style RMSNorm on queries and keys
    init_std: float = 0.02

    def validate(self, key: str) -> None:
        for name in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "max_position_embeddings",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{key}.{name}: must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"{key}.num_key_value_heads: must divide num_attention_heads ({self.num_attention_heads}),"
                f" got {self.num_key_value_heads}"
            )
        if not self.head_dim and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"{key}.hidden_size: must be a multiple of num_attention_heads ({self.num_attention_heads})"
                f" unless head_dim is set, got {self.hidden_size}"
            )
        if (self.head_dim or self.hidden_size // self.num_attention_heads) % 2:
            raise ConfigError(f"{key}.head_dim: must be even for rotary embeddings")

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


@dataclass
class TrainConfig:
    """The knobs of the one training-loop core, shared by every stage."""

    steps: int = 1000
    batch_size: int = 16  # sequences per micro-batch per process
    grad_accum: int = 1
    seq_len: int = 256
    optimizer: str = "muon"  # adamw | muon (Muon for 2-D hidden matrices, AdamW for the rest)
    lr: float = 3e-3  # AdamW learning rate (embeddings, norms, head; everything when optimizer=adamw)
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    schedule: str = "wsd"  # cosine | wsd | constant
    warmup_steps: int = 20
    decay_frac: float = 0.3  # wsd: share of steps spent decaying to min_lr_ratio
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # 0 = off
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool = False
    eval_every: int = 100
    eval_batches: int = 8
    ckpt_every: int = 200  # 0 = only at the end
    keep_checkpoints: int = 1
    log_every: int = 10
    seed: int = 1337
    progress: bool = True
    threads: int = 0  # torch intra-op threads on CPU; 0 = leave torch's default
    # torchrun: how long a collective (the gradient all-reduce, ...) waits for a late process before the run
    # fails. Set when a process joins the group (its first stage). Work only rank 0 does (during-training
    # evals, writing checkpoints) is waited for without a limit, so this only has to cover a real hang.
    dist_timeout_s: float = 1800.0

    def validate(self, key: str) -> None:
        if self.optimizer not in ("adamw", "muon"):
            raise ConfigError(f"{key}.optimizer: must be 'adamw' or 'muon', got {self.optimizer!r}")
        if self.schedule not in ("cosine", "wsd", "constant"):
            raise ConfigError(f"{key}.schedule: must be 'cosine', 'wsd' or 'constant', got {self.schedule!r}")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"{key}.dtype: must be 'auto', 'fp32' or 'bf16', got {self.dtype!r}")
        for name in ("steps", "batch_size", "grad_accum", "seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{key}.{name}: must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"{key}.lr: must be positive, got {self.lr}")
        if self.log_every <= 0:  # the loop takes step % log_every
            raise ConfigError(f"{key}.log_every: must be positive, got {self.log_every}")
        for name in ("eval_every", "ckpt_every"):  # 0 = off; a negative one fired on every step
            if getattr(self, name) < 0:
                raise ConfigError(f"{key}.{name}: must be 0 (off) or positive, got {getattr(self, name)}")
        _check_range(f"{key}.decay_frac", self.decay_frac, 0.0, 1.0)
        _check_range(f"{key}.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        if not (math.isfinite(self.dist_timeout_s) and self.dist_timeout_s > 0):
            raise ConfigError(
                f"{key}.dist_timeout_s: must be a positive number of seconds, got {self.dist_timeout_s}"
            )
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"{key}.device: must be auto, cpu, cuda or cuda:N, got {self.device!r}")


def adamw_train(steps: int, batch_size: int, lr: float, seq_len: int = 256, **overrides: Any) -> TrainConfig:
    """An AdamW + cosine TrainConfig, the shape of every fine-tuning stage's defaults (SFT, moderation,
    reward model, RL); ``overrides`` set any other TrainConfig field."""
    base: dict[str, Any] = dict(
        optimizer="adamw",
        schedule="cosine",
        warmup_steps=20,
        min_lr_ratio=0.1,
        eval_every=100,
        eval_batches=4,
        ckpt_every=100,
    )
    return TrainConfig(steps=steps, batch_size=batch_size, lr=lr, seq_len=seq_len, **{**base, **overrides})


@dataclass
class ChatSourceConfig:
    """One source of chat conversations for SFT.

    kind: ``world`` (the built-in world's conversations; ``seed`` must be the pretraining world's seed),
    ``openai`` (JSONL of ``{"messages": [...]}``), ``alpaca``, ``dolly``, ``sharegpt``, ``oasst`` or ``hf``.
    """

    kind: str = "world"
    path: str = ""
    n: int = 3000  # world only: conversations to generate
    seed: int = 0  # world only: which world (must match data.sources' world seed)
    sample_seed: int = 0  # world only: which conversations
    kinds: list[str] = field(default_factory=list)  # world only: just these kinds ([] = the usual mix)
    max_convs: int = 0  # 0 = all
    split: str = "train"  # hf only
    fmt: str = "auto"  # hf only: auto | openai | sharegpt | alpaca | dolly | oasst

    def validate(self, key: str) -> None:
        _check_source(
            key, self.kind, self.path, ("world", "openai", "alpaca", "dolly", "sharegpt", "oasst", "hf")
        )
        if self.kinds and self.kind != "world":
            raise ConfigError(f"{key}.kinds: only a world source has kinds")
        _check_kinds(f"{key}.kinds", self.kinds)
        if self.kind == "world" and self.n <= 0:  # found here, not after a whole pretraining
            raise ConfigError(f"{key}.n: a world source needs at least one conversation, got {self.n}")


@dataclass
class ChatDataConfig:
    sources: list[ChatSourceConfig] = field(default_factory=lambda: [ChatSourceConfig()])
    val_fraction: float = 0.05  # held-out conversations for the SFT validation loss
    eval_per_kind: int = 30  # held-out world eval items per behaviour (eval-split entities)
    eval_seed: int = 1
    seed: int = 0  # shuffling and the train/val split
    # Share of each SFT batch's rows that are pretraining text (<run>/data shards, loss on every token):
    # replay keeps what the base knows (held-out entities included) from being overwritten by the
    # narrow chat data while the format is learnt.
    replay_fraction: float = 0.0
    # Share of each *pretraining* batch's rows that are these conversations (mixed training; see
    # train/pretrain.py): the base learns to answer while it learns the facts.
    pretrain_fraction: float = 0.0

    def validate(self, key: str) -> None:
        if not self.sources:
            raise ConfigError(f"{key}.sources: at least one source is needed")
        for i, s in enumerate(self.sources):
            s.validate(f"{key}.sources[{i}]")
        _check_range(f"{key}.val_fraction", self.val_fraction, 0.0, 0.5, lo_open=True)
        _check_range(f"{key}.replay_fraction", self.replay_fraction, 0.0, 0.9)
        _check_range(f"{key}.pretrain_fraction", self.pretrain_fraction, 0.0, 0.9)


@dataclass
class EvalConfig:
    """The speedrun's eval stage: the held-out world behaviour suite on each stage's checkpoint."""

    models: list[str] = field(default_factory=lambda: ["base", "sft"])  # checkpoint dirs inside the run
    n: int = 1  # samples per prompt
    temperature: float = 0.0  # 0 = greedy
    max_new_tokens: int = 64
    seed: int = 0
    # More eval registry directories (or single spec YAMLs), relative to the working directory: what
    # `chatforge eval --registry DIR` adds, for `chatforge eval` and for during_training_suite.
    registry: list[str] = field(default_factory=list)
    # During training: this registry suite (built in or in `registry`) runs every `during_training_every`
    # steps of SFT (and any stage that passes evals.during_training_hook to its Trainer); scores go to the
    # metrics JSONL. "" = off.
    during_training_suite: str = ""
    during_training_every: int = 100
    during_training_limit: int = 0  # 0 = the whole suite

    def validate(self, key: str) -> None:
        if self.n < 1:
            raise ConfigError(f"{key}.n: must be at least 1, got {self.n}")
        if self.temperature < 0:
            raise ConfigError(f"{key}.temperature: must be >= 0, got {self.temperature}")
        for i, d in enumerate(self.registry):
            if not d.strip():  # Path("") is the working directory: every YAML there would be read as specs
                raise ConfigError(f"{key}.registry[{i}]: empty path")
        if self.during_training_limit < 0:  # items[:-3] would silently drop the last three instead
            raise ConfigError(
                f"{key}.during_training_limit: must be >= 0 (0 = the whole suite), got {self.during_training_limit}"
            )
        if self.during_training_suite and self.during_training_every < 1:
            raise ConfigError(
                f"{key}.during_training_every: must be at least 1, got {self.during_training_every}"
            )


@dataclass
class ModerationConfig:
    """``chatforge moderation train|eval``: a multi-label classifier on our own pretrained weights."""

    init: str = "sft"  # checkpoint to start from: a directory inside the run (sft, base) or a path
    world_n: int = 4000  # labelled world texts for training
    world_eval_n: int = 600  # held-out world texts each for validation (thresholds) and test
    real_data: str = "../shared/data"  # folder with the real labelled sets; "" = world only
    max_per_set: int = 3000  # cap per real set (seeded sample)
    # seq_len: texts are cut to this many tokens
    train: TrainConfig = field(default_factory=lambda: adamw_train(300, 32, 1e-3, seq_len=128))

    def validate(self, key: str) -> None:
        self.train.validate(f"{key}.train")
        if self.world_n < 0 or self.world_eval_n < 0 or self.max_per_set < 0:
            raise ConfigError(f"{key}: world_n, world_eval_n and max_per_set must be >= 0")


@dataclass
class SafetyConfig:
    """Red-team suite and release gate settings (the deployment policy itself is a YAML file)."""

    policy: str = ""  # deployment policy YAML; "" = the built-in default (safety/policies/default.yaml)
    moderator: str = ""  # serve: moderator dir; "" = <run>/moderation when it exists; "none" = no moderation
    redteam_per_kind: int = 20  # items per red-team kind
    redteam_seed: int = 0
    models: list[str] = field(default_factory=lambda: ["base", "sft"])  # checkpoints the red-team runs on
    max_new_tokens: int = 64

    def validate(self, key: str) -> None:
        if self.redteam_per_kind < 1:
            raise ConfigError(f"{key}.redteam_per_kind: must be at least 1, got {self.redteam_per_kind}")


@dataclass
class ServeConfig:
    """``chatforge serve``: the OpenAI-compatible server, web UI and feedback database."""

    host: str = "127.0.0.1"
    port: int = 8000
    model: str = ""  # checkpoint dir served as version "main"; "" = <run>/sft, else <run>/base
    versions: list[str] = field(default_factory=list)  # more versions as "name=path"
    max_batch: int = 8  # sequences decoded together (continuous batching slots per version)
    max_len: int = 0  # KV-cache length per slot; 0 = the model's context
    max_tokens: int = 512  # the most a request may ask for (max_tokens / max_completion_tokens)
    default_max_tokens: int = 256  # when a chat request gives none (capped by the room left in context)
    max_n: int = 8
    max_moderation_inputs: int = 32  # texts one /v1/moderations request may hold (each is a model pass)
    rate_limit_rpm: int = 600  # requests per minute per API key (or per client address); 0 = off
    require_api_key: bool = False  # also on when any API key exists in the database
    db_url: str = ""  # any SQLAlchemy URL; "" = sqlite:///<run>/serve.db
    admin_key_env: str = "CHATFORGE_ADMIN_KEY"  # admin routes are off unless this variable is set
    device: str = "auto"
    # torch.compile the decode step (Engine(compile=True)): faster per token, built once per version at start
    compile: bool = False

    def validate(self, key: str) -> None:
        for name in ("max_batch", "max_tokens", "default_max_tokens", "max_n", "max_moderation_inputs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{key}.{name}: must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"{key}.port: must be in [0, 65535], got {self.port}")
        if self.rate_limit_rpm < 0:  # read as "off" (0), which a typo of a sign should not turn on
            raise ConfigError(f"{key}.rate_limit_rpm: must be >= 0 (0 = off), got {self.rate_limit_rpm}")
        for i, v in enumerate(self.versions):
            if "=" not in v or not v.split("=", 1)[0] or not v.split("=", 1)[1]:
                raise ConfigError(f"{key}.versions[{i}]: expected name=path, got {v!r}")


def _rl_train(steps: int, batch_size: int, lr: float) -> Callable[[], TrainConfig]:
    """The default-factory of a preference/RL stage's TrainConfig: short warm-up, frequent logs."""
    return lambda: adamw_train(
        steps, batch_size, lr, warmup_steps=5, eval_every=50, eval_batches=8, ckpt_every=50, log_every=1
    )


@dataclass
class RewardConfig:
    """``chatforge reward``: a reward model (our transformer + a scalar head) on preference pairs."""

    init: str = "sft"  # checkpoint to start from: a directory inside the run or a path
    init_random: bool = False  # fresh weights of init's shape + its tokenizer: the no-pretraining baseline
    out: str = "rm"  # output directory inside the run (its work dir: train/reward, or train/<out> otherwise)
    world_pairs: int = 2000  # built-in world pairs (train-split entities); held-out: 1/8 as many, eval split
    pairs_seed: int = 0
    pref_files: list[str] = field(default_factory=list)  # extra preference files (any supported format)
    heldout_fraction: float = 0.1  # of each pref file, split by prompt
    margin: float = 0.0  # Bradley–Terry with a margin: -log σ(r_chosen - r_rejected - margin)
    # score += w · the reply's summed log-likelihood under the backbone (w learnt). For the world's short
    # replies; on real pairs (long, chosen mostly the longer) it favours short replies: 38% vs 60% held-out.
    lm_feature: bool = False
    calibration_bins: int = 10
    train: TrainConfig = field(default_factory=_rl_train(150, 16, 5e-4))

    def validate(self, key: str) -> None:
        self.train.validate(f"{key}.train")
        if self.world_pairs < 0:
            raise ConfigError(f"{key}.world_pairs: must be >= 0, got {self.world_pairs}")
        if not self.out or "/" in self.out or self.out in (".", ".."):
            raise ConfigError(f"{key}.out: must be a directory name inside the run, got {self.out!r}")
        _check_range(f"{key}.heldout_fraction", self.heldout_fraction, 0.0, 0.5)
        if self.margin < 0:
            raise ConfigError(f"{key}.margin: must be >= 0, got {self.margin}")
        if self.calibration_bins < 1:
            raise ConfigError(f"{key}.calibration_bins: must be at least 1, got {self.calibration_bins}")


@dataclass
class DPOConfig:
    """``chatforge dpo``: direct preference optimisation on ``<run>/prefs`` against the frozen init."""

    init: str = "sft"
    beta: float = 0.1
    label_smoothing: float = 0.0  # conservative DPO: assumed share of flipped labels
    # lr measured on the cpu-demo SFT (RLHF table, held-out world): 2e-4 drove KL to SFT to 21 and the
    # replies to gibberish (composite 0.38 vs SFT 0.67); 5e-5: KL 4.6, 0.63; 1e-5: KL 0.18, 0.66.
    train: TrainConfig = field(default_factory=_rl_train(100, 16, 1e-5))

    def validate(self, key: str) -> None:
        self.train.validate(f"{key}.train")
        if self.beta <= 0:
            raise ConfigError(f"{key}.beta: must be positive, got {self.beta}")
        _check_range(f"{key}.label_smoothing", self.label_smoothing, 0.0, 0.5)


@dataclass
class RLConfig:
    """What PPO and GRPO share: rollouts from the policy with the engine, a KL leash to the frozen init.

    ``steps`` counts iterations (one rollout phase + ``epochs`` passes of minibatch updates over it);
    ``train.batch_size`` is the minibatch size in sequences; ``train.steps`` is ignored (derived).
    """

    init: str = "sft"
    reward_model: str = "rm"  # a directory inside the run or a path; "" = none (GRPO only)
    steps: int = 30
    prompts_per_step: int = 16
    samples_per_prompt: int = 1  # GRPO's group size
    epochs: int = 2
    max_new_tokens: int = 64  # a worked sum in a persona's voice is up to 55 tokens
    temperature: float = 1.0
    top_k: int = 0
    kl_coef: float = 0.05  # β in reward − β·KL (PPO) or the loss's KL term (GRPO)
    clip_range: float = 0.2
    kinds: list[str] = field(default_factory=list)  # world prompt kinds to train on; [] = all
    prompt_pool: int = 2000  # world train-split prompts to draw from (all of `kinds` when set)
    prompt_seed: int = 0
    train: TrainConfig = field(default_factory=_rl_train(1, 16, 1e-4))

    def validate(self, key: str) -> None:
        self.train.validate(f"{key}.train")
        for name in (
            "steps",
            "prompts_per_step",
            "samples_per_prompt",
            "epochs",
            "max_new_tokens",
            "prompt_pool",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{key}.{name}: must be at least 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ConfigError(f"{key}.temperature: must be positive for sampling, got {self.temperature}")
        if self.kl_coef < 0:
            raise ConfigError(f"{key}.kl_coef: must be >= 0, got {self.kl_coef}")
        _check_range(f"{key}.clip_range", self.clip_range, 0.0, 1.0, lo_open=True)
        _check_kinds(f"{key}.kinds", self.kinds)
        if (self.prompts_per_step * self.samples_per_prompt) % self.train.batch_size:
            raise ConfigError(
                f"{key}.train.batch_size: must divide prompts_per_step × samples_per_prompt"
                f" ({self.prompts_per_step * self.samples_per_prompt}), got {self.train.batch_size}"
            )


@dataclass
class PPOConfig(RLConfig):
    """``chatforge ppo``: InstructGPT-style PPO with a value head, GAE and reward = RM − β·KL."""

    adaptive_kl: bool = False  # Ziegler et al.: move β so the KL tracks kl_target
    kl_target: float = 1.0
    kl_horizon: int = 100
    gamma: float = 1.0
    lam: float = 0.95
    vf_coef: float = 0.1
    value_clip: float = 0.2
    ent_coef: float = 0.0
    train: TrainConfig = field(default_factory=_rl_train(1, 8, 5e-5))

    def validate(self, key: str) -> None:
        super().validate(key)
        if not self.reward_model:
            raise ConfigError(f"{key}.reward_model: PPO needs a reward model directory")
        _check_range(f"{key}.gamma", self.gamma, 0.0, 1.0)
        _check_range(f"{key}.lam", self.lam, 0.0, 1.0)
        if self.kl_target <= 0 or self.kl_horizon < 1:
            raise ConfigError(f"{key}.kl_target / kl_horizon: must be positive")


@dataclass
class GRPOConfig(RLConfig):
    """``chatforge grpo``: group-relative advantages over ``samples_per_prompt`` replies per prompt, with
    verifiable rewards (the world grader: facts, arithmetic, JSON schema, system rules, declines)."""

    reward_model: str = ""  # optional: add rm_coef × RM score to the verifiable reward
    rm_coef: float = 0.0
    # Reward for a safety error, either side: complying where a decline is right, declining where an answer
    # is. Without it a refusal of a benign request scores the same 0 as a wrong answer, while declines
    # score 1, so RL drifts toward refusing (measured: red-team over-refusal 2.5% -> 12.5%).
    safety_penalty: float = 1.0
    prompts_per_step: int = 8
    samples_per_prompt: int = 8
    epochs: int = 1
    kl_coef: float = 0.04
    train: TrainConfig = field(default_factory=_rl_train(1, 16, 5e-5))

    def validate(self, key: str) -> None:
        if self.samples_per_prompt < 2:
            raise ConfigError(f"{key}.samples_per_prompt: a group needs at least 2 samples")
        super().validate(key)
        if self.rm_coef and not self.reward_model:
            raise ConfigError(f"{key}.rm_coef: set {key}.reward_model too")
        if self.safety_penalty < 0:
            raise ConfigError(
                f"{key}.safety_penalty: must be >= 0 (it is subtracted), got {self.safety_penalty}"
            )


@dataclass
class BestOfNConfig:
    """Best-of-n with the reward model: the baseline every RL method must beat; also the comparison table."""

    n: int = 8
    temperature: float = 1.0
    reward_model: str = "rm"
    policies: list[str] = field(default_factory=lambda: ["sft", "rlhf/ppo", "rlhf/dpo", "rlhf/grpo"])
    kl_samples: int = 1  # sampled replies per eval prompt for the KL-to-SFT estimate

    def validate(self, key: str) -> None:
        if self.n < 1 or self.kl_samples < 1:
            raise ConfigError(f"{key}.n and {key}.kl_samples: must be at least 1")
        if self.temperature <= 0:
            raise ConfigError(f"{key}.temperature: must be positive, got {self.temperature}")


def parse_model_shape(key: str, shape: str) -> tuple[int, int]:
    """'LAYERSxWIDTH' (e.g. '2x64') → (layers, width), or a ConfigError naming ``key``."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(shape))
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ConfigError(f"{key}: expected LAYERSxWIDTH like '2x64', got {shape!r}")
    return int(m.group(1)), int(m.group(2))


def _scaling_train_defaults() -> TrainConfig:
    # Every rung uses this schedule shape, decayed to the end of its own steps, so final losses compare.
    return TrainConfig(
        batch_size=8,
        seq_len=128,
        optimizer="muon",
        lr=3e-3,
        schedule="wsd",
        decay_frac=0.3,
        eval_every=0,
        ckpt_every=50,
        log_every=10,
    )


@dataclass
class ScalingConfig:
    """``chatforge scaling``: an IsoFLOP ladder of small runs, scaling-law fits, and a predicted target.

    For each compute budget C (training FLOPs, C = 6·N·D with N the non-embedding parameters) each model
    shape in ``sizes`` trains on D = C/(6N) tokens; shapes that would get fewer than ``min_steps`` steps
    at a budget are left out of it. The target (``target_size``) trains with ``target_mult`` × the largest
    budget after its loss has been predicted.
    """

    budgets: list[float] = field(default_factory=lambda: [5e10, 1.2e11, 3e11])
    sizes: list[str] = field(default_factory=lambda: ["1x32", "2x32", "2x48", "2x64", "3x96"])
    head_dim: int = 16  # heads = width / head_dim
    ffn_mult: float = 8 / 3  # SwiGLU intermediate size = ffn_mult × width, rounded to a multiple of 8
    min_steps: int = 30
    # Rungs with fewer tokens per parameter are left out: far from convergence their loss measures how
    # far the optimiser got in a few steps, not N and D.
    min_tokens_per_param: float = 0.0
    warmup_frac: float = 0.05  # warmup as a share of each run's steps, so the schedule shape is the same
    train: TrainConfig = field(default_factory=_scaling_train_defaults)
    val_tokens: int = 32768  # the fixed held-out tokens every run is evaluated on
    downstream: str = "auto"  # auto | world_cloze | token_accuracy | none
    cloze_choices: int = 4
    # world_cloze on facts about the N most mentioned people and N most mentioned towns (a world with
    # zipf > 0), both splits; 0 = every eval-split fact. With Zipf 1 over 1000 people the small models'
    # accuracy over all facts stays at chance, so the metric would not move with compute.
    cloze_entities: int = 0
    target_size: str = "2x64"
    target_mult: float = 30.0  # target compute = target_mult × the largest rung's compute
    # Runs that repeat their data (a small corpus) are fitted on Muennighoff et al.'s effective tokens,
    # with this R* (their fit); 0 = count every repeated token as fresh. On tinyshakespeare (the target sees
    # the text ~15 times, the ladder up to ~5) the fresh-token fit predicted 7% under the actual loss.
    repeat_rstar: float = 15.4
    bootstrap: int = 200  # resamples of the ladder's runs for the confidence intervals; 0 = none
    interval: float = 0.95
    seed: int = 0  # bootstrap resampling
    # Rungs trained at once, each in its own process with train.threads threads: the rungs are tiny, so
    # on a machine with k cores k one-thread rungs finish ~k times sooner than one k-thread rung.
    workers: int = 1
    # Each rung trained this many times (training seeds train.seed, +1, ...): the fit sees every replicate,
    # and the report gives the seed-to-seed spread, which the 30x extrapolation magnifies.
    seeds: int = 1

    def validate(self, key: str) -> None:
        if len(self.budgets) < 3:
            raise ConfigError(
                f"{key}.budgets: at least 3 compute budgets are needed, got {len(self.budgets)}"
            )
        for i, b in enumerate(self.budgets):
            if not 0 < b < math.inf:  # inf (or 1e400) planned inf steps: an OverflowError traceback
                raise ConfigError(f"{key}.budgets[{i}]: must be positive and finite, got {b}")
        if len(set(self.budgets)) != len(self.budgets):
            raise ConfigError(f"{key}.budgets: budgets must be distinct, got {self.budgets}")
        if len(self.sizes) < 3:
            raise ConfigError(f"{key}.sizes: at least 3 model sizes are needed, got {len(self.sizes)}")
        shapes = [(f"{key}.sizes[{i}]", s) for i, s in enumerate(self.sizes)] + [
            (f"{key}.target_size", self.target_size)
        ]
        for k, s in shapes:
            _, width = parse_model_shape(k, s)
            if self.head_dim <= 0 or self.head_dim % 2 or width % self.head_dim:
                raise ConfigError(
                    f"{k}: width {width} must be a multiple of {key}.head_dim ({self.head_dim}, even)"
                )
        if len({parse_model_shape("", s) for s in self.sizes}) != len(self.sizes):
            raise ConfigError(f"{key}.sizes: sizes must be distinct, got {self.sizes}")
        if self.ffn_mult <= 0:
            raise ConfigError(f"{key}.ffn_mult: must be positive, got {self.ffn_mult}")
        if self.min_steps < 1:
            raise ConfigError(f"{key}.min_steps: must be at least 1, got {self.min_steps}")
        if self.repeat_rstar < 0:
            raise ConfigError(f"{key}.repeat_rstar: must be >= 0 (0 = off), got {self.repeat_rstar}")
        if self.min_tokens_per_param < 0:
            raise ConfigError(f"{key}.min_tokens_per_param: must be >= 0, got {self.min_tokens_per_param}")
        _check_range(f"{key}.warmup_frac", self.warmup_frac, 0.0, 0.5)
        self.train.validate(f"{key}.train")
        if self.val_tokens < self.train.seq_len + 1:
            raise ConfigError(
                f"{key}.val_tokens: must be at least {key}.train.seq_len + 1, got {self.val_tokens}"
            )
        if self.downstream not in ("auto", "world_cloze", "token_accuracy", "none"):
            raise ConfigError(
                f"{key}.downstream: must be auto, world_cloze, token_accuracy or none, got {self.downstream!r}"
            )
        if self.cloze_choices < 2:
            raise ConfigError(f"{key}.cloze_choices: must be at least 2, got {self.cloze_choices}")
        if self.cloze_entities < 0:
            raise ConfigError(f"{key}.cloze_entities: must be >= 0, got {self.cloze_entities}")
        if not 1 <= self.target_mult < math.inf:
            raise ConfigError(f"{key}.target_mult: must be at least 1 and finite, got {self.target_mult}")
        if self.bootstrap < 0:
            raise ConfigError(f"{key}.bootstrap: must be >= 0, got {self.bootstrap}")
        if self.workers < 1:
            raise ConfigError(f"{key}.workers: must be at least 1, got {self.workers}")
        if self.seeds < 1:
            raise ConfigError(f"{key}.seeds: must be at least 1, got {self.seeds}")
        _check_range(f"{key}.interval", self.interval, 0.0, 1.0, lo_open=True)


@dataclass
class SampleConfig:
    prompts: list[str] = field(default_factory=lambda: ["The capital of", "Once upon a time", "12 + 7 ="])
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 0.95
    seed: int = 0
    compile: bool = False  # torch.compile the decode step: pays off on long generations only


@dataclass
class SpeedrunConfig:
    """Which optional stages ``chatforge speedrun`` chains after SFT."""

    rl: str = "grpo"  # grpo | ppo | dpo | none: the RL method after the reward model
    reward: bool = True  # train the reward model (needed by ppo, best-of-n and the RLHF table)
    safety: bool = True  # moderation classifier + red-team suite on the run's checkpoints

    def validate(self, key: str) -> None:
        if self.rl not in ("grpo", "ppo", "dpo", "none"):
            raise ConfigError(f"{key}.rl: expected one of grpo, ppo, dpo, none, got {self.rl!r}")
        if self.rl in ("ppo", "dpo") and not self.reward:
            raise ConfigError(f"{key}.reward: {self.rl} needs the reward stage (its model or its pairs)")


@dataclass
class RunConfig:
    """A whole recipe: one run directory, all stages."""

    name: str = "cpu-demo"
    runs_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    chat_data: ChatDataConfig = field(default_factory=ChatDataConfig)
    sft: TrainConfig = field(default_factory=lambda: adamw_train(300, 16, 3e-3))
    evals: EvalConfig = field(default_factory=EvalConfig)
    moderation: ModerationConfig = field(default_factory=ModerationConfig)
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    bestofn: BestOfNConfig = field(default_factory=BestOfNConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    speedrun: SpeedrunConfig = field(default_factory=SpeedrunConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    def validate(self, key: str = "") -> None:
        # an empty name made the run directory runs/ itself: every stage's outputs beside the other runs
        if not self.name.strip() or Path(self.name).name in (".", ".."):
            raise ConfigError(f"name: must name a run directory inside runs_dir, got {self.name!r}")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if hasattr(v, "validate"):
                v.validate(f.name)
        for stage in ("pretrain", "sft"):
            seq = getattr(self, stage).seq_len
            if seq > self.model.max_position_embeddings:
                raise ConfigError(
                    f"{stage}.seq_len: {seq} exceeds model.max_position_embeddings"
                    f" ({self.model.max_position_embeddings})"
                )


# ---------------------------------------------------------------- loading


def _check_kinds(key: str, kinds: list[str]) -> None:
    """World behaviour kinds (``fact``, ``system_json``, ...): a typo is a config error at load time, not a
    failure minutes into a run."""
    from chatforge.data.chat import check_kinds

    check_kinds(key, kinds, ConfigError)


def _check_source(key: str, kind: str, path: str, kinds: tuple[str, ...]) -> None:
    if kind not in kinds:
        raise ConfigError(f"{key}.kind: must be one of {', '.join(kinds)}, got {kind!r}")
    if kind != "world" and not path:
        raise ConfigError(f"{key}.path: required for a {kind!r} source")


def _check_range(key: str, v: float, lo: float, hi: float, lo_open: bool = False) -> None:
    if v < lo or v > hi or (lo_open and v == lo):
        bracket = "(" if lo_open else "["
        raise ConfigError(f"{key}: must be in {bracket}{lo}, {hi}], got {v}")


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Turn a YAML value into ``tp``, or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
            return tuple(_coerce(f"{key}[{i}]", a, v) for i, (a, v) in enumerate(zip(args, value)))
        return [_coerce(f"{key}[{i}]", args[0], v) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, args[0], value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        number: float | None = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML reads "3e-4" as a string
            with contextlib.suppress(ValueError):
                number = float(value)
        # NaN passes every range check (all comparisons are false): a learning rate of .nan would train
        if number is not None and not math.isnan(number):
            return number
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


# Settings that were removed, with the value every saved run config holds: that value is skipped, so older
# runs' config.yaml files still load; any other value is an error that says why the setting went.
_REMOVED: dict[str, tuple[Any, str]] = {
    "ppo.whiten_rewards": (False, "removed: nothing ever read it, so true changed nothing"),
}


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "", base: T | None = None) -> T:
    """Build dataclass ``cls`` from a plain dict, rejecting unknown keys with a suggestion.

    Keys not in ``data`` keep the defaults of ``base`` (or of ``cls``); a nested section starts from the
    parent's default for it, so e.g. a partial ``sft:`` section keeps SFT's own defaults.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    base = base if base is not None else cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if key in _REMOVED and k not in names:
            if v == _REMOVED[key][0]:
                continue
            raise ConfigError(f"{key}: {_REMOVED[key][1]}")
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"{key}: unknown key{hint}")
        tp = hints[k]
        if dataclasses.is_dataclass(tp) and isinstance(v, dict):
            kwargs[k] = from_dict(tp, v, key, base=getattr(base, k))
        else:
            kwargs[k] = _coerce(key, tp, v)
    return dataclasses.replace(base, **kwargs)  # type: ignore[type-var]


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain YAML/JSON-friendly values."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    return obj


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item}: expected key=value, e.g. pretrain.lr=3e-3")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item}: empty key")
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except DuplicateKeyError as e:  # {a: 1, a: 2} would silently be {a: 2}
        raise ConfigError(f"--set {item}: duplicate key {e.key!r}") from None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings (values parsed as YAML) onto a nested dict."""
    for item in overrides:
        path, value = _parse_override(item)
        # "sources[0]" and "sources.0" both address a list element.
        parts: list[str | int] = []
        for part in path:
            m = re.fullmatch(r"([^\[\]]*)((?:\[\d+\])*)", part)
            name, idx = (m.group(1), m.group(2)) if m else (part, "")
            if name:
                parts.append(int(name) if name.isdigit() else name)
            parts += [int(i) for i in re.findall(r"\d+", idx)]
        key = ".".join(path)
        node: Any = data
        for part, nxt_part in itertools.pairwise(parts):
            if isinstance(part, int):
                if not isinstance(node, list) or part >= len(node):
                    raise ConfigError(f"{key}: no list element [{part}] there")
                nxt = node[part]
            else:
                if not isinstance(node, dict):
                    raise ConfigError(f"{key}: '{part}' is not inside a section")
                nxt = node.get(part)
                if nxt is None:
                    nxt = node[part] = [] if isinstance(nxt_part, int) else {}
            if not isinstance(nxt, dict | list):
                raise ConfigError(f"{key}: '{part}' is not a section")
            node = nxt
        last = parts[-1]
        if isinstance(last, int):
            if not isinstance(node, list) or last >= len(node):
                raise ConfigError(f"{key}: no list element [{last}] there")
        elif not isinstance(node, dict):
            raise ConfigError(f"{key}: '{last}' is not inside a section")
        node[last] = value
    return data


def resolve_recipe(recipe: str | Path | None) -> Path:
    """A recipe name (``cpu-demo``) or a path to a YAML file."""
    if recipe is None:
        recipe = DEFAULT_RECIPE
    p = Path(recipe)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"recipe: no such file {str(p)!r}")
        return p
    cand = RECIPES_DIR / f"{recipe}.yaml"
    if not cand.is_file():
        known = sorted(x.stem for x in RECIPES_DIR.glob("*.yaml"))
        raise ConfigError(f"recipe: unknown recipe {str(recipe)!r} (known: {', '.join(known)})")
    return cand


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: sections merge key by key, anything else (a list too) is replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_recipe(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe's sections, on top of those of the recipe it ``extends`` (a name, or a path relative to
    its own file) if any: a variant names only what it changes."""
    data = load_yaml(read_user_text(path, ConfigError), f"recipe {path}", ConfigError) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path}: the top level must be a mapping of sections")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent.strip():
        raise ConfigError(f"recipe {path}: extends: expected a recipe name or file, got {parent!r}")
    near = path.parent / parent
    ppath = resolve_recipe(near if near.suffix in (".yaml", ".yml") else parent)
    chain = (*chain, path.resolve())
    if ppath.resolve() in chain:
        loop = " -> ".join(str(p) for p in (*chain, ppath.resolve()))
        raise ConfigError(f"recipe {path}: extends itself ({loop})")
    return _merge(_read_recipe(ppath, chain), data)


def load_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a recipe, apply ``--set`` overrides, validate, and return a RunConfig."""
    data = _read_recipe(resolve_recipe(recipe))
    # Overrides apply to the full config (recipe over defaults), so they can reach default list elements.
    data = apply_overrides(to_dict(from_dict(RunConfig, data)), overrides or [])
    cfg = from_dict(RunConfig, data)
    cfg.validate()
    return cfg


def save_config(cfg: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
