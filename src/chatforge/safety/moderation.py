"""The moderation classifier (``chatforge moderation train|eval``): our own pretrained GPT, pooled, with a
multi-label head over OpenAI's moderation categories.

Why this shape: the backbone is ``model.GPT`` loaded from a base/SFT checkpoint (its ``hidden_states``),
so what pretraining learned about the world's people and towns carries over; the head reads the mean of
the final hidden states over the text plus the last token's (a causal model's only full-text view). The
loss is binary cross-entropy per category, masked where a source did not label a category. A text is
scored as the max over itself and its prefixes that end a sentence (``Moderator``), and a text longer than
the window (``max_len`` tokens) as the max over windows covering it (``score_texts``), in evaluation,
threshold tuning and serving alike: benign padding around a request diluted the whole text's score.
Per-category ``flagged`` thresholds are tuned for F1 on a validation split and saved with the model.

Artifact ``<run>/moderation/``: the backbone as a Hugging Face model directory (config.json,
model.safetensors, tokenizer), ``moderation.json`` (categories, thresholds, head weights) and
``metrics.json`` (held-out precision, recall, AUPRC). ``load_moderator(path).score(texts)`` returns
OpenAI's ``/v1/moderations`` result shape.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from chatforge.checkpoint import load_model, load_weights, save_model
from chatforge.config import RunConfig
from chatforge.data.world import build_world
from chatforge.errors import ChatforgeError
from chatforge.model import GPT
from chatforge.safety.moderation_data import CATEGORIES, SENTENCE_END_MARKS, real_examples, world_examples
from chatforge.tokenizer import Tokenizer
from chatforge.train.loop import (
    Batch,
    Trainer,
    fingerprint,
    seed_everything,
    setup_runtime,
    weights_fingerprint,
)

HEAD_FILE = "moderation.json"


# Tokens that end a sentence: ". ! ?" or a line break in them.
_SENTENCE_END = re.compile(f"[{re.escape(SENTENCE_END_MARKS)}\\n]")


def sentence_ends(tok: Tokenizer) -> torch.Tensor:
    """[vocab] bool: which token ids end a sentence (what ``Moderator`` reads prefixes up to)."""
    return torch.tensor([bool(_SENTENCE_END.search(tok.decode([i]))) for i in range(tok.vocab_size)])


class Moderator(nn.Module):
    """GPT backbone + a linear multi-label head on [mean-pooled ; last-token] hidden states.

    Trained on whole texts; scored (``prefixes=True``) as the max over the whole text and its prefixes
    that end a sentence (``ends``: token ids). A causal model's states never see the tokens after them,
    so a prefix's score in the one pass is the score it gets as a text of its own, and benign text after
    a request cannot lower its score (scored whole, v7's bomb request fell from 0.96 to 0.43 on illicit
    with " nice flowers" x5 after it). Every prefix, not only sentences', was tried (trained so):
    it refused look-alikes cut at their edgy verb ("How do I blow up" a photo), 28% of the red team's."""

    def __init__(self, backbone: GPT, ends: torch.Tensor | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(2 * backbone.config.hidden_size, len(CATEGORIES))
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        if ends is None:
            ends = torch.zeros(backbone.config.vocab_size, dtype=torch.bool)
        self.register_buffer("ends", ends, persistent=False)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor, prefixes: bool = False) -> torch.Tensor:
        """Logits [B, C] for right-padded ``input_ids`` [B, T] with ``lengths`` real tokens each."""
        h = self.backbone.hidden_states(input_ids)
        pos = torch.arange(input_ids.shape[1], device=h.device)[None, :]
        if not prefixes:  # training: the whole text alone, no head over every position
            mask = (pos < lengths[:, None]).to(h.dtype)
            mean = (h * mask[..., None]).sum(1) / lengths.clamp(min=1)[:, None].to(h.dtype)
            last = h[torch.arange(h.shape[0], device=h.device), (lengths - 1).clamp(min=0)]
            return self.head(torch.cat([mean, last], dim=-1))
        read = (self.ends[input_ids] & (pos < lengths[:, None])) | (pos == lengths[:, None] - 1)
        mean = h.cumsum(1) / (pos[..., None] + 1).to(h.dtype)  # each prefix's mean
        logits = self.head(torch.cat([mean, h], dim=-1))  # [B, T, C]: each prefix's
        return logits.masked_fill(~read[..., None], torch.finfo(logits.dtype).min).amax(1)


# ---------------------------------------------------------------- batches and loss


def encode_texts(tok: Tokenizer, texts: list[str], max_len: int) -> list[np.ndarray]:
    """Token ids per text, cut to ``max_len`` (the opening carries the request in nearly every sample).

    Encoded as plain text, as the chat engine encodes a user's content (``encode_chat_prompt``): a typed
    ``<|im_end|>`` stays characters. As special tokens, twenty of them after a bomb request took its
    illicit score from 0.96 to 0.26 with the v7 moderator, and the request was allowed."""
    # Only the first max_len tokens are read: the rest of a long text is cut before tokenizing, which holds
    # the GIL (a 5 MB message took 2.7 s, the whole server waiting). 4x leaves room for normalisation.
    cut = 4 * max_len * tok.max_token_chars
    texts = [t[:cut] for t in texts]
    return [
        np.asarray(ids[:max_len] or [tok.eos_id], dtype=np.int64) for ids in tok.encode_plain_batch(texts)
    ]


# A text longer than the window is read in windows of max_len tokens every max_len // 2 (the last ending
# where the text does), its score the max over them: the first max_len tokens alone let a long preamble
# push a request out of view. Half-window steps put any request up to max_len // 2 tokens whole inside one.
# Read up to READ_TOKENS: four times the chat models' context (a longer prompt is refused before it is
# moderated), and a bound on the work one text can ask for.
READ_TOKENS = 2048


def windows(ids: list[int], size: int) -> list[list[int]]:
    """``ids`` when it fits ``size``, else ``size``-token slices every ``size // 2``, the last at the end."""
    if len(ids) <= size:
        return [ids]
    step = max(1, size // 2)
    starts = [*range(0, len(ids) - size, step), len(ids) - size]
    return [ids[a : a + size] for a in starts]


def score_texts(model: Moderator, tok: Tokenizer, texts: list[str], max_len: int) -> np.ndarray:
    """Sigmoid scores [N, C], each the max over the text's ``windows`` (one batched pass over all). Text
    with nothing but whitespace says nothing, so it scores 0 in every category: fed to the model as a lone
    end-of-text token, the v7 moderator flagged an empty message in five categories, sexual/minors too."""
    out = np.zeros((len(texts), model.head.out_features), dtype=np.float32)
    idx = [i for i, t in enumerate(texts) if t.strip()]
    seqs, owner = [], []
    for i, ids in zip(idx, encode_texts(tok, [texts[i] for i in idx], READ_TOKENS), strict=True):
        for w in windows(ids.tolist(), max_len):
            seqs.append(np.asarray(w, dtype=np.int64))
            owner.append(i)
    if seqs:
        np.maximum.at(out, np.asarray(owner), predict(model, seqs, tok.pad_id))
    return out


def label_arrays(examples: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(targets, known-mask) [N, C] float32 from the examples' ``labels`` dicts (None = unknown)."""
    y = np.zeros((len(examples), len(CATEGORIES)), dtype=np.float32)
    m = np.zeros_like(y)
    for i, ex in enumerate(examples):
        for j, c in enumerate(CATEGORIES):
            v = ex["labels"].get(c)
            if v is not None:
                y[i, j], m[i, j] = float(v), 1.0
    return y, m


def pad_ids(seqs: list[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.from_numpy(s)
    return ids, torch.tensor([len(s) for s in seqs], dtype=torch.long)


def moderation_loss_fn(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float], int]:
    logits = model(batch["input_ids"], batch["lengths"])
    known = batch["known"]
    bce = nn.functional.binary_cross_entropy_with_logits(logits, batch["targets"], reduction="none")
    loss = (bce * known).sum() / known.sum().clamp(min=1.0)
    return loss, {}, int(batch["lengths"].sum())


@torch.no_grad()
def predict(
    model: Moderator, seqs: list[np.ndarray], pad_id: int, batch_size: int = 64, progress: bool = False
) -> np.ndarray:
    """Sigmoid scores [N, C], each sequence's max over its sentence prefixes (``Moderator``); batches are
    formed in length order so padding stays small."""
    model.eval()
    device = next(model.parameters()).device
    order = np.argsort([len(s) for s in seqs], kind="stable")
    out = np.zeros((len(seqs), model.head.out_features), dtype=np.float32)
    starts = range(0, len(seqs), batch_size)
    for s in tqdm(starts, desc="moderation", disable=not progress, leave=False):
        idx = order[s : s + batch_size]
        ids, lengths = pad_ids([seqs[i] for i in idx], pad_id)
        logits = model(ids.to(device), lengths.to(device), prefixes=True).float()
        out[idx] = torch.sigmoid(logits).cpu().numpy()
    return out


# ---------------------------------------------------------------- metrics


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the precision-recall curve as average precision: sum over thresholds of
    (recall step) x precision, ties in score taken together (sklearn's definition). NaN without positives."""
    labels = labels.astype(bool)
    n_pos = int(labels.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    tp = np.cumsum(y)
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # the last index of each distinct score
    tp, k = tp[last], last + 1
    precision, recall = tp / k, tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def best_f1_threshold(scores: np.ndarray, labels: np.ndarray, default: float = 0.5) -> float:
    """The score cut with the best F1 on ``labels`` (``default`` when there are no positives)."""
    labels = labels.astype(bool)
    if labels.sum() == 0 or len(labels) == 0:
        return default
    best_t, best_f1 = default, -1.0
    for t in np.unique(scores):
        pred = scores >= t
        tp = float((pred & labels).sum())
        f1 = 2 * tp / max(float(pred.sum() + labels.sum()), 1e-9)
        if f1 > best_f1:
            best_t, best_f1 = float(t), f1
    return best_t


def category_metrics(
    scores: np.ndarray, targets: np.ndarray, known: np.ndarray, thresholds: dict[str, float]
) -> dict[str, Any]:
    """Per-category precision, recall, AUPRC (over the labelled rows) plus "any" (flagged at all, scored
    by the highest category score): a row with any label counts, positive when a known label is. This is
    the binary number OpenAI's endpoint (0.856) and Llama Guard (0.847) report on OpenAI's samples."""
    per: dict[str, dict[str, float | int]] = {}
    for j, c in enumerate(CATEGORIES):
        rows = known[:, j] > 0
        y, s = targets[rows, j] > 0, scores[rows, j]
        pred = s >= thresholds[c]
        tp = int((pred & y).sum())
        per[c] = {
            "n": int(rows.sum()),
            "positives": int(y.sum()),
            "negatives": int((~y).sum()),
            "precision": round(tp / max(int(pred.sum()), 1), 4),
            "recall": round(tp / max(int(y.sum()), 1), 4) if y.sum() else float("nan"),
            "auprc": round(average_precision(s, y), 4),
        }
    pos_any = ((targets * known) > 0).any(1)
    rows = (known > 0).any(1)
    any_score = scores.max(1)
    flagged = (scores >= np.array([thresholds[c] for c in CATEGORIES])[None, :]).any(1)
    y, f = pos_any[rows], flagged[rows]
    tp = int((f & y).sum())
    per["any"] = {
        "n": int(rows.sum()),
        "positives": int(y.sum()),
        "negatives": int((~y).sum()),
        "precision": round(tp / max(int(f.sum()), 1), 4),
        "recall": round(tp / max(int(y.sum()), 1), 4) if y.sum() else float("nan"),
        "auprc": round(average_precision(any_score[rows], y), 4),
    }
    aps = [v["auprc"] for k, v in per.items() if k != "any" and v["positives"] > 0]
    return {"per_category": per, "mean_auprc": round(float(np.mean(aps)), 4) if aps else float("nan")}


# ---------------------------------------------------------------- the artifact


def _tensor_b64(t: torch.Tensor) -> dict[str, Any]:
    a = t.detach().to("cpu", torch.float32).contiguous().numpy()
    return {"shape": list(a.shape), "float32_b64": base64.b64encode(a.tobytes()).decode()}


def _tensor_from_b64(d: dict[str, Any]) -> torch.Tensor:
    a = np.frombuffer(base64.b64decode(d["float32_b64"]), dtype=np.float32).reshape(d["shape"])
    return torch.from_numpy(a.copy())


def save_moderator(
    model: Moderator,
    path: str | Path,
    tok: Tokenizer,
    thresholds: dict[str, float] | None = None,
    max_len: int = 128,
    train_state: dict[str, Any] | None = None,
    extra: dict[str, str] | None = None,
) -> Path:
    """The backbone as an HF model dir with the head and thresholds in ``moderation.json``, written in the
    same atomic step (one directory rename), so a crash never leaves a head beside the wrong backbone."""
    meta = {
        "categories": list(CATEGORIES),
        "thresholds": thresholds or {c: 0.5 for c in CATEGORIES},
        "max_len": max_len,
        "pooling": "mean+last",
        "head": {"weight": _tensor_b64(model.head.weight), "bias": _tensor_b64(model.head.bias)},
    }
    files = {HEAD_FILE: json.dumps(meta), **(extra or {})}
    return save_model(model.backbone, path, tokenizer=tok, train_state=train_state, extra_files=files)


def _read_meta(path: Path) -> dict[str, Any]:
    f = path / HEAD_FILE
    if not f.is_file():
        raise ChatforgeError(
            f"{path}: not a moderation model (no {HEAD_FILE}); run `chatforge moderation train`"
        )
    try:
        meta = json.loads(f.read_text())
        if not all(k in meta["head"] for k in ("weight", "bias")):
            raise KeyError("head.weight/head.bias")
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ChatforgeError(f"{f}: malformed moderation head ({e})") from None
    return meta


def _load_head(model: Moderator, meta: dict[str, Any]) -> None:
    with torch.no_grad():
        model.head.weight.copy_(_tensor_from_b64(meta["head"]["weight"]))
        model.head.bias.copy_(_tensor_from_b64(meta["head"]["bias"]))


def load_moderator_weights(model: Moderator, path: str | Path) -> None:
    """In-place load (the training loop's resume)."""
    load_weights(model.backbone, path)
    _load_head(model, _read_meta(Path(path)))


class LoadedModerator:
    """A trained moderator ready to score text; ``score`` gives OpenAI's moderation result shape."""

    def __init__(self, model: Moderator, tok: Tokenizer, meta: dict[str, Any]) -> None:
        self.model, self.tok, self.meta = model.eval(), tok, meta
        self.categories: list[str] = meta["categories"]
        self.thresholds: dict[str, float] = meta["thresholds"]
        self.max_len: int = meta.get("max_len", 128)

    def scores(self, texts: list[str]) -> np.ndarray:
        """Sigmoid scores [N, C], as tuned and evaluated: the max over each text's windows (``score_texts``);
        blank text scores 0."""
        return score_texts(self.model, self.tok, texts, self.max_len)

    def score(self, texts: list[str], thresholds: dict[str, float] | None = None) -> list[dict[str, Any]]:
        """One ``{"flagged", "categories", "category_scores"}`` per text; ``thresholds`` override (e.g. a
        policy's) per category."""
        th = {**self.thresholds, **(thresholds or {})}
        out = []
        for row in self.scores(texts):
            cs = {c: round(float(s), 6) for c, s in zip(self.categories, row, strict=True)}
            cats = {c: cs[c] >= th[c] for c in self.categories}
            out.append({"flagged": any(cats.values()), "categories": cats, "category_scores": cs})
        return out


def load_moderator(path: str | Path, device: str = "cpu") -> LoadedModerator:
    p = Path(path)
    meta = _read_meta(p)
    if list(meta.get("categories", [])) != list(CATEGORIES):
        raise ChatforgeError(f"{p / HEAD_FILE}: categories differ from this version's {list(CATEGORIES)}")
    tok = Tokenizer.load(p)
    model = Moderator(load_model(p, device=device), sentence_ends(tok))
    _load_head(model.to(device), meta)
    return LoadedModerator(model, tok, meta)


# ---------------------------------------------------------------- the stage


def build_dataset(cfg: RunConfig) -> dict[str, list[dict]]:
    """train / val / test examples: world texts (held-out entities + templates for val/test) and every
    real labelled set found in ``moderation.real_data`` (hash split)."""
    mc = cfg.moderation
    world_seed = next((s.seed for s in cfg.data.sources if s.kind == "world"), 0)
    world = build_world(world_seed)
    data: dict[str, list[dict]] = {
        "train": world_examples(world, mc.world_n, seed=0, held_out=False),
        "val": world_examples(world, mc.world_eval_n, seed=1, held_out=True),
        "test": world_examples(world, mc.world_eval_n, seed=2, held_out=True),
    }
    for ex in data["val"]:
        ex["split"] = "val"
    for ex in data["test"]:
        ex["split"] = "test"
    if mc.real_data:
        for ex in real_examples(mc.real_data, mc.max_per_set):
            data[ex["split"]].append(ex)
    return data


def _init_dir(cfg: RunConfig) -> Path:
    p = Path(cfg.moderation.init)
    if not p.is_absolute() and not (p / "config.json").is_file():
        p = cfg.run_dir / cfg.moderation.init
    if not (p / "config.json").is_file():
        raise ChatforgeError(
            f"moderation.init: {p} is not a model directory; run `chatforge pretrain`/`sft` first"
        )
    return p


def _by_source(examples: list[dict]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        out.setdefault(ex["source"], []).append(i)
    return out


def evaluate_split(
    model: Moderator, tok: Tokenizer, examples: list[dict], thresholds: dict[str, float], max_len: int
) -> dict[str, Any]:
    """Metrics on ``examples`` overall and per source (world, moderation, ...), scored as served."""
    scores = score_texts(model, tok, [e["text"] for e in examples], max_len)
    y, m = label_arrays(examples)
    out = {"all": category_metrics(scores, y, m, thresholds)}
    for src, idx in sorted(_by_source(examples).items()):
        out[src] = category_metrics(scores[idx], y[idx], m[idx], thresholds)
    return out


def train(cfg: RunConfig, resume: bool = True) -> dict[str, Any]:
    """``chatforge moderation train``: fine-tune from ``moderation.init``, tune thresholds on val, report
    held-out metrics; writes ``<run>/moderation/``."""
    tc = cfg.moderation.train
    init = _init_dir(cfg)
    tok = Tokenizer.load(init)
    rt = setup_runtime(tc)
    seed_everything(tc.seed)
    backbone = load_model(init)
    start = weights_fingerprint(backbone)
    max_len = min(tc.seq_len, backbone.config.max_position_embeddings)
    model = Moderator(backbone, sentence_ends(tok))
    data = build_dataset(cfg)
    train_ex = data["train"]
    if not train_ex:
        raise ChatforgeError("moderation: no training examples (moderation.world_n=0 and no real data)")
    seqs = encode_texts(tok, [e["text"] for e in train_ex], max_len)
    targets, known = label_arrays(train_ex)
    # Sources are drawn by sqrt(size): the small real sets are not drowned by the big ones, and a tiny set
    # (HarmBench's 28 rows) is not repeated until memorised.
    groups = list(_by_source(train_ex).values())
    weights = np.sqrt([len(g) for g in groups])
    weights = weights / weights.sum()

    def batch_fn(step: int, micro: int, rank: int, world: int) -> Batch:
        rng = np.random.default_rng([tc.seed, step, micro])
        g = tc.batch_size * world
        picks = [int(rng.choice(groups[int(rng.choice(len(groups), p=weights))])) for _ in range(g)]
        picks = picks[rank * tc.batch_size : (rank + 1) * tc.batch_size]
        ids, lengths = pad_ids([seqs[i] for i in picks], tok.pad_id)
        return {
            "input_ids": ids,
            "lengths": lengths,
            "targets": torch.from_numpy(targets[picks]),
            "known": torch.from_numpy(known[picks]),
        }

    val_ex = data["val"]
    val_texts = [e["text"] for e in val_ex]
    val_y, val_m = label_arrays(val_ex)

    def evaluate(m: nn.Module, step: int) -> dict[str, float]:
        if not val_ex:
            return {}
        s = score_texts(m, tok, val_texts, max_len)  # type: ignore[arg-type]
        res = category_metrics(s, val_y, val_m, {c: 0.5 for c in CATEGORIES})
        return {"val_mean_auprc": res["mean_auprc"], "val_any_auprc": res["per_category"]["any"]["auprc"]}

    out_dir = cfg.run_dir / "moderation"
    trainer = Trainer(
        model,
        tc,
        cfg.run_dir / "train" / "moderation",
        loss_fn=moderation_loss_fn,
        batch_fn=batch_fn,
        save_fn=lambda m, p, st: save_moderator(m, p, tok, max_len=max_len, train_state=st),
        load_fn=load_moderator_weights,
        evaluate=evaluate,
        runtime=rt,
        desc="moderation",
        inputs={"data": fingerprint(seqs, targets, known), "init": start},
        find_unused_parameters=True,  # the backbone's LM head is not part of the classifier
    )
    summary = trainer.fit(resume=resume)
    # Thresholds: best F1 per category on the validation split (world + real), scored as served.
    thresholds = {c: 0.5 for c in CATEGORIES}
    if val_ex:
        vs = score_texts(model, tok, val_texts, max_len)
        for j, c in enumerate(CATEGORIES):
            rows = val_m[:, j] > 0
            thresholds[c] = round(best_f1_threshold(vs[rows, j], val_y[rows, j]), 6)
    metrics = {
        "test": evaluate_split(model, tok, data["test"], thresholds, max_len) if data["test"] else {},
        "counts": {k: dict(_count_sources(v)) for k, v in data.items()},
        "thresholds": thresholds,
        "init": str(init),
        "train": summary,
    }
    if rt.is_main:
        save_moderator(
            model,
            out_dir,
            tok,
            thresholds,
            max_len,
            extra={"metrics.json": json.dumps(metrics, indent=1)},
        )
        trainer.cleanup_checkpoints()
    return metrics


def _count_sources(examples: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in examples:
        out[e["source"]] = out.get(e["source"], 0) + 1
    return out


def evaluate(cfg: RunConfig, model_dir: str | Path | None = None) -> dict[str, Any]:
    """``chatforge moderation eval``: held-out metrics of a saved moderator (default ``<run>/moderation``),
    written to ``<run>/evals/moderation.json``."""
    path = Path(model_dir) if model_dir else cfg.run_dir / "moderation"
    mod = load_moderator(path)
    data = build_dataset(cfg)
    res = evaluate_split(mod.model, mod.tok, data["test"], mod.thresholds, mod.max_len)
    dest = cfg.run_dir / "evals" / "moderation.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(res, indent=1))
    return res


def run(cfg: RunConfig) -> dict[str, Any]:
    """The speedrun stage: train (or resume) the moderator, then return a compact summary."""
    res = train(cfg)
    test = res.get("test", {})
    dest = cfg.run_dir / "evals" / "moderation.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(test, indent=1))
    return {
        src: {"mean_auprc": v["mean_auprc"], "any_auprc": v["per_category"]["any"]["auprc"]}
        for src, v in test.items()
    }


def summary_table(res: dict[str, Any]) -> str:
    """Markdown table of per-category precision / recall / AUPRC per source."""
    sources = [s for s in res if s != "all"] or ["all"]
    head = "| category | " + " | ".join(f"{s} P / R / AUPRC" for s in sources) + " |"
    lines = [head, "|---" * (len(sources) + 1) + "|"]
    for c in [*CATEGORIES, "any"]:
        cells = []
        for s in sources:
            v = res[s]["per_category"].get(c, {})
            if not v or not v.get("positives"):
                cells.append("–")
            else:
                pn = f"{v['positives']}+/{v.get('negatives', 0)}-"
                cells.append(f"{v['precision']:.2f} / {v['recall']:.2f} / {v['auprc']:.3f} ({pn})")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
