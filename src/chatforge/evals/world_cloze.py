"""A base model's multiple-choice cloze accuracy on the built-in world's facts.

"Mirela Tovak was born in ___": the model scores the true value and distractors of the same relation as
continuations of a sentence from the pretraining templates, and picks the likeliest. No generation and no
chat format, so it measures what pretraining stored and rises smoothly with compute (chance = 1/choices):
the downstream metric of the scaling ladder.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import nn

from chatforge.data.world import PERSON_TEMPLATES, PLACE_TEMPLATES, World
from chatforge.tokenizer import Tokenizer


def _cloze_template(relation: str) -> str | None:
    """The first template "{s} ... {v}." of a relation (subject first, value last, nothing else)."""
    for t in PERSON_TEMPLATES.get(relation, ()) + PLACE_TEMPLATES.get(relation, ()):
        head = t.removesuffix(" {v}.")
        if t.startswith("{s} ") and head != t and "{" not in head[3:]:
            return head
    return None


def cloze_items(
    world: World, split: str | None = "eval", n_choices: int = 4, seed: int = 0, top: int = 0
) -> list[dict[str, Any]]:
    """One item per fact of ``split`` whose relation has a cloze template: a prompt, ``n_choices``
    continuations (the answer first), the relation and the subject.

    ``top`` > 0 keeps only the facts about the first ``top`` people and the first ``top`` towns in the
    world's order (any split): the most mentioned ones when the prose draws entities by fame (``zipf``).
    In a Zipfian world most entities are named a few times, so a small model's cloze accuracy over all of
    them sits at chance; over the famous ones it rises with scale."""
    rng = random.Random(f"cloze:{world.seed}:{seed}")
    keep = {p.name for p in world.people[:top]} | {t.name for t in world.places[:top]} if top > 0 else None
    items = []
    for fact in world.facts(None if keep else split):
        if keep is not None and fact.subject not in keep:
            continue
        head = _cloze_template(fact.relation)
        if head is None:
            continue
        pool = [v for v in world.values(fact.relation) if v != fact.value]
        if len(pool) < n_choices - 1:
            continue
        choices = [fact.value, *rng.sample(pool, n_choices - 1)]
        items.append(
            {
                "prompt": head.format(s=fact.subject),
                "choices": [f" {c}." for c in choices],
                "answer": 0,
                "relation": fact.relation,
                "subject": fact.subject,
            }
        )
    return items


def _encode(tok: Tokenizer, prompt: str, cont: str) -> tuple[list[int], int]:
    """Token ids of prompt+continuation and where the continuation starts (BPE may merge across the seam,
    so the start is the longest common prefix with the prompt's own ids)."""
    full, head = tok.encode(prompt + cont), tok.encode(prompt)
    start = 0
    while start < min(len(full), len(head)) and full[start] == head[start]:
        start += 1
    return full, max(1, min(start, len(full) - 1))


@torch.no_grad()
def cloze_accuracy(
    model: nn.Module, tok: Tokenizer, items: list[dict[str, Any]], batch_size: int = 64
) -> float:
    """Share of items whose answer has the highest summed log-probability among its choices."""
    if not items:
        return float("nan")
    device = next(model.parameters()).device
    seqs = [_encode(tok, it["prompt"], c) for it in items for c in it["choices"]]
    scores: list[float] = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i : i + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        x = torch.zeros(len(chunk), width, dtype=torch.long)
        for r, (ids, _) in enumerate(chunk):
            x[r, : len(ids)] = torch.tensor(ids)
        logp = torch.log_softmax(model(x.to(device)).float(), dim=-1).cpu()
        for r, (ids, start) in enumerate(chunk):
            pos = torch.arange(start - 1, len(ids) - 1)  # position t predicts token t+1
            scores.append(float(logp[r, pos, torch.tensor(ids[start:])].sum()))
    correct, k = 0.0, 0
    for it in items:
        s = scores[k : k + len(it["choices"])]
        # A tie at the top earns its expected credit: the answer is always choice 0, so "first wins"
        # would score a model that cannot tell the choices apart at 100%.
        tied = [j for j, v in enumerate(s) if v == max(s)]
        correct += (it["answer"] in tied) / len(tied)
        k += len(it["choices"])
    return correct / len(items)
