"""The content policy in three layers, applied to a conversation's input and to the model's output.

1. **Global bounds** (``GLOBAL_BOUNDS``, in code): categories declined on input and output by every
   deployment, with a ceiling on their threshold. No YAML and no user can lift them.
2. **Deployment policy** (YAML, ``policies/default.yaml`` unless ``safety.policy`` names another): which
   categories to decline on input / output, per-category thresholds, the decline tone, release-gate limits.
3. **User preferences** (UI settings, or a ``safety:`` line in the system message): may only *tighten*
   (decline more categories, lower thresholds). A request to loosen is ignored and noted in the decision.

Declines are brief and specific and offer what the assistant can do instead; they never lecture (the
red-team lecture grader checks the templates too). Text is moderated as written and, when it hides a
request in base64 or rot13, as decoded; input checks look at the last user turn and at the recent user
turns joined, so a request split across turns is seen whole.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from chatforge.errors import ChatforgeError, read_user_text
from chatforge.safety.moderation_data import CATEGORIES, SENTENCE_END_MARKS
from chatforge.yamlio import load_yaml

DEFAULT_POLICY = Path(__file__).parent / "policies" / "default.yaml"

# category -> the highest threshold any deployment or user may set (a lower one is stricter).
GLOBAL_BOUNDS: dict[str, float] = {
    "sexual/minors": 0.5,
    "illicit/violent": 0.5,
    "self-harm/instructions": 0.5,
}

DEFAULT_ALTERNATIVES: dict[str, str] = {
    "harassment": "I can help you write a firm but respectful message instead.",
    "harassment/threatening": "If you're in a conflict, I can suggest ways to resolve it safely.",
    "hate": "I'm happy to talk about the history or culture of any group instead.",
    "hate/threatening": "I'm happy to talk about the history or culture of any group instead.",
    "illicit": "If you've lost access to your own account or property, I can explain the legal options.",
    "illicit/violent": "If you're curious about the science, I can explain it at a safe, general level.",
    "self-harm": "If you're going through a hard time, I can share ways to reach someone who can help.",
    "self-harm/intent": "You don't have to face this alone: I can share how to reach a crisis line now.",
    "self-harm/instructions": "If you're struggling, I can share how to reach a crisis line or someone you trust.",
    "sexual": "I can help with something else, like a romantic scene that fades to black.",
    "sexual/minors": "I can help with something else.",
    "violence": "If there's a conflict, I can suggest ways to resolve it safely.",
    "violence/graphic": "I can describe the scene without the graphic details.",
}


class Scorer(Protocol):
    """What scores text: ``LoadedModerator`` (or anything with its ``score`` signature)."""

    def score(self, texts: list[str], thresholds: dict[str, float] | None = None) -> list[dict[str, Any]]: ...


@dataclass
class Decision:
    """What the server acts on: ``allowed`` or not, and if not, the decline message to send and
    ``finish_reason == "content_filter"``."""

    allowed: bool
    stage: str  # "input" | "output"
    categories: list[str] = field(default_factory=list)  # the declined categories that fired
    scores: dict[str, float] = field(default_factory=dict)  # max over the views checked
    message: str = ""  # the decline to show the user (empty when allowed)
    notes: list[str] = field(default_factory=list)  # e.g. ignored attempts to loosen the policy

    @property
    def finish_reason(self) -> str | None:
        return None if self.allowed else "content_filter"

    def reason(self) -> str:
        return ", ".join(self.categories)


@dataclass
class UserPrefs:
    """Per-user settings: extra categories to decline, and lower thresholds."""

    decline: set[str] = field(default_factory=set)
    thresholds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # ``safety:`` lines not understood, ignored


@dataclass
class Effective:
    """The merged layers for one request."""

    input: set[str]
    output: set[str]
    thresholds: dict[str, float]
    notes: list[str]


@dataclass
class DeploymentPolicy:
    name: str = "default"
    decline_input: list[str] = field(default_factory=list)
    decline_output: list[str] = field(default_factory=list)
    thresholds: dict[str, float] = field(default_factory=dict)
    decline_opener: str = "I can't help with that."
    alternatives: dict[str, str] = field(default_factory=dict)
    release: dict[str, float | None] = field(default_factory=dict)


def _check_categories(where: str, cats: Any) -> list[str]:
    if not isinstance(cats, list) or not all(isinstance(c, str) for c in cats):
        raise ChatforgeError(f"{where}: expected a list of category names")
    for c in cats:
        if c not in CATEGORIES:
            raise ChatforgeError(f"{where}: unknown category {c!r} (known: {', '.join(CATEGORIES)})")
    return cats


RELEASE_KEYS = (
    "max_core_drop",
    "max_harmful_compliance_increase",
    "max_over_refusal_increase",
    "max_lecture_increase",
    "max_harmful_compliance",
    "max_over_refusal",
)


def load_deployment(path: str | Path | None = None) -> DeploymentPolicy:
    """Read and validate a deployment policy YAML; every error names the file and key."""
    p = Path(path) if path else DEFAULT_POLICY
    try:
        text = read_user_text(p)
    except OSError as e:
        raise ChatforgeError(f"{p}: cannot read the policy ({e.strerror})") from None
    data = load_yaml(text, str(p)) or {}
    if not isinstance(data, dict):
        raise ChatforgeError(f"{p}: the top level must be a mapping")
    known = {"name", "decline_input", "decline_output", "thresholds", "tone", "release"}
    for k in data:
        if k not in known:
            raise ChatforgeError(f"{p}: {k}: unknown key (known: {', '.join(sorted(known))})")
    pol = DeploymentPolicy(name=str(data.get("name", p.stem)))
    pol.decline_input = _check_categories(f"{p}: decline_input", data.get("decline_input", []))
    pol.decline_output = _check_categories(f"{p}: decline_output", data.get("decline_output", []))
    th = data.get("thresholds", {}) or {}
    if not isinstance(th, dict):
        raise ChatforgeError(f"{p}: thresholds: expected a mapping of category: number")
    for c, v in th.items():
        _check_categories(f"{p}: thresholds", [c])
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 1:
            raise ChatforgeError(f"{p}: thresholds.{c}: expected a number in [0, 1], got {v!r}")
    pol.thresholds = {c: float(v) for c, v in th.items()}
    tone = data.get("tone", {}) or {}
    if not isinstance(tone, dict):
        raise ChatforgeError(f"{p}: tone: expected a mapping")
    for k in tone:  # a misspelt key ("opener:") was ignored without a word, the decline left unchanged
        if k not in ("decline_opener", "alternatives"):
            raise ChatforgeError(f"{p}: tone.{k}: unknown key (known: alternatives, decline_opener)")
    opener = tone.get("decline_opener", pol.decline_opener)
    if not isinstance(opener, str) or not opener.strip():
        raise ChatforgeError(f"{p}: tone.decline_opener: expected a sentence, got {opener!r}")
    pol.decline_opener = opener
    alts = tone.get("alternatives", {}) or {}
    if not isinstance(alts, dict):
        raise ChatforgeError(f"{p}: tone.alternatives: expected a mapping of category: text")
    _check_categories(f"{p}: tone.alternatives", list(alts))
    pol.alternatives = {**DEFAULT_ALTERNATIVES, **{c: str(v) for c, v in alts.items()}}
    rel = data.get("release", {}) or {}
    if not isinstance(rel, dict):
        raise ChatforgeError(f"{p}: release: expected a mapping of limit: number")
    for k, v in rel.items():
        if k not in RELEASE_KEYS:
            raise ChatforgeError(f"{p}: release.{k}: unknown key (known: {', '.join(RELEASE_KEYS)})")
        # Rates and score differences live in [0, 1]: a negative ceiling could never be met, so every
        # release would be blocked.
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 1):
            raise ChatforgeError(f"{p}: release.{k}: expected a number in [0, 1] or null, got {v!r}")
    # A limit the file leaves out is the default policy's (as thresholds and tone fall back to defaults);
    # only an explicit null lifts it. A deployment written to change its decline lists must not switch
    # the release gate off without a word.
    defaults = {} if p.resolve() == DEFAULT_POLICY.resolve() else load_deployment(DEFAULT_POLICY).release
    pol.release = {
        k: (float(rel[k]) if rel[k] is not None else None) if k in rel else defaults.get(k)
        for k in RELEASE_KEYS
    }
    return pol


_PREF_LINE = re.compile(r"^\s*safety\s*:\s*(.+)$", re.IGNORECASE | re.MULTILINE)


def prefs_from_messages(messages: list[dict[str, Any]]) -> UserPrefs:
    """User preferences from a system message line ``safety: strict`` or ``safety: decline violence,
    sexual``. ``strict`` declines every category at the deployment's thresholds."""
    prefs = UserPrefs()
    for m in messages:
        if m.get("role") != "system" or not isinstance(m.get("content"), str):
            continue
        for spec in _PREF_LINE.findall(m["content"]):
            words = spec.strip().lower()
            if words == "strict":
                prefs.decline |= set(CATEGORIES)
            elif words.startswith("decline "):
                for c in re.split(r"[,\s]+", words[len("decline ") :]):
                    found = {k for k in CATEGORIES if k == c or k.startswith(c + "/")}
                    if c and not found:
                        prefs.notes.append(f"safety: decline {c!r}: unknown category; ignored")
                    prefs.decline |= found
            else:  # "safety: off" and the like: users may only tighten, and this says neither
                prefs.notes.append(
                    f"safety: {spec.strip()!r}: not understood ('strict' or 'decline CATEGORY, ...'); ignored"
                )
    return prefs


def decoded_views(text: str) -> list[str]:
    """The text, plus what it says once base64 runs and rot13 are undone (jailbreaks hide requests so)."""
    views = [text]
    for run in re.findall(r"[A-Za-z0-9+/]{16,}={0,2}", text):
        try:
            dec = base64.b64decode(run + "=" * (-len(run) % 4), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            continue
        if dec.isprintable() and sum(ch.isalpha() or ch == " " for ch in dec) > 0.8 * len(dec):
            views.append(dec)
    if re.search(r"rot-?13", text, re.IGNORECASE):
        views.append(codecs.decode(text, "rot13"))
    return views


# A user's message is also read from each sentence start on, as text of its own: the moderator scores a
# text as the max over its sentence prefixes (safety/moderation.py), so words after a request cannot dilute
# it, but words before it still could (the cpu-demo moderator blocked 7% of the red team's requests behind a
# six-sentence story, 63% bare). Input only: a model's reply is not split so, since a story's sentence out
# of context reads as harmful ("... the clockmaker is found dead ..." blocked as hate: look-alike
# over-refusal 6.5% -> 11.5% when replies were split too). Bounded: the last MAX_TAILS sentence starts, each
# tail cut to TAIL_CHARS (one moderator window holds a request that long).
# A start: after a SENTENCE_END_MARKS mark and a space, or after a line break.
_SENTENCE_START = re.compile(f"(?:(?<=[{re.escape(SENTENCE_END_MARKS)}])\\s+|\\n\\s*)(?=\\S)")
MAX_TAILS = 32
TAIL_CHARS = 512
_TAIL_SCAN = 65536  # only the end of a huge message is searched for its last starts


def sentence_tails(text: str) -> list[str]:
    """The text from each of its last MAX_TAILS sentence starts on, cut to TAIL_CHARS characters."""
    off = max(0, len(text) - _TAIL_SCAN)
    starts = [m.end() for m in _SENTENCE_START.finditer(text, off)][-MAX_TAILS:]
    return [text[a : a + TAIL_CHARS] for a in starts]


class Policy:
    """Global bounds + a deployment policy + per-request user preferences, over a moderation scorer.

    ``check_input`` / ``check_output`` match the server's hook (a reason string, or None to allow);
    ``decide_input`` / ``decide_output`` return the full ``Decision``."""

    def __init__(self, scorer: Scorer, deployment: DeploymentPolicy | None = None) -> None:
        self.scorer = scorer
        self.deployment = deployment or load_deployment()
        self._cache: dict[str, dict[str, float]] = {}

    @classmethod
    def load(cls, moderator_dir: str | Path, policy_path: str | Path | None = None) -> Policy:
        from chatforge.safety.moderation import load_moderator

        return cls(load_moderator(moderator_dir), load_deployment(policy_path))

    def effective(self, prefs: UserPrefs | None = None) -> Effective:
        """Merge the layers: global bounds always, then the deployment, then the user's tightenings."""
        dep = self.deployment
        base_th = dict(getattr(self.scorer, "thresholds", {}) or {})
        th = {c: base_th.get(c, 0.5) for c in CATEGORIES}
        notes: list[str] = []
        th.update(dep.thresholds)
        for c, cap in GLOBAL_BOUNDS.items():
            if th[c] > cap:
                # Said only of a threshold the deployment set: the moderator's tuned one is capped without
                # a word (v7's illicit/violent 0.94 put this note, blaming the deployment, on every answer).
                if c in dep.thresholds:
                    notes.append(
                        f"{c}: deployment threshold {th[c]} above the global bound {cap}; using {cap}"
                    )
                th[c] = cap
        inp = set(dep.decline_input) | set(GLOBAL_BOUNDS)
        out = set(dep.decline_output) | set(GLOBAL_BOUNDS)
        if prefs:
            for c, v in prefs.thresholds.items():
                if c not in th:
                    continue
                if v < th[c]:
                    th[c] = v
                else:
                    notes.append(f"{c}: user threshold {v} would loosen the policy; ignored")
            inp |= prefs.decline
            out |= prefs.decline
            notes += prefs.notes
        return Effective(inp, out, th, notes)

    def _scores(self, texts: list[str]) -> list[dict[str, float]]:
        todo = [t for t in dict.fromkeys(texts) if t not in self._cache]
        fresh = (
            {t: r["category_scores"] for t, r in zip(todo, self.scorer.score(todo), strict=True)}
            if todo
            else {}
        )
        # Read this call's scores before the bounded cache may drop them (a batch can exceed its size).
        out = [fresh[t] if t in fresh else self._cache[t] for t in texts]
        if len(self._cache) + len(fresh) > 4096:
            self._cache.clear()
        self._cache.update(fresh)
        return out

    def _decide(self, stage: str, views: list[str], eff: Effective, cats: set[str]) -> Decision:
        return self._verdict(stage, self._scores(views), eff, cats)

    def _verdict(
        self, stage: str, view_scores: list[dict[str, float]], eff: Effective, cats: set[str]
    ) -> Decision:
        scores = {c: 0.0 for c in CATEGORIES}
        for s in view_scores:
            for c in CATEGORIES:
                scores[c] = max(scores[c], float(s.get(c, 0.0)))
        fired = [c for c in CATEGORIES if c in cats and scores[c] >= eff.thresholds[c]]
        if not fired:
            return Decision(True, stage, [], scores, "", eff.notes)
        return Decision(False, stage, fired, scores, self.decline_message(fired), eff.notes)

    def decline_message(self, categories: list[str]) -> str:
        """One sentence that declines and one that offers an alternative, for the most specific
        category that fired (sub-categories come after their parents in CATEGORIES)."""
        dep = self.deployment
        alt = dep.alternatives.get(categories[-1]) or DEFAULT_ALTERNATIVES.get(categories[-1], "")
        return f"{dep.decline_opener} {alt}".strip()

    def decide_input(self, messages: list[dict[str, Any]], prefs: UserPrefs | None = None) -> Decision:
        merged = prefs_from_messages(messages)
        if prefs:
            merged.decline |= prefs.decline
            merged.thresholds = {**merged.thresholds, **prefs.thresholds}
            merged.notes += prefs.notes
        eff = self.effective(merged)
        users = [
            m["content"] for m in messages if m.get("role") == "user" and isinstance(m.get("content"), str)
        ]
        if not users:
            return Decision(True, "input", notes=eff.notes)
        views = decoded_views(users[-1])
        if len(users) > 1:
            views += decoded_views(" ".join(users[-3:]))
            # a base64 run cut across turns decodes only once the pieces are glued back without a space
            views += decoded_views("".join(users[-3:]))[1:]
        views += [t for v in views for t in sentence_tails(v)]
        return self._decide("input", views, eff, eff.input)

    def decide_output(self, text: str, prefs: UserPrefs | None = None) -> Decision:
        return self.decide_outputs([text], prefs)[0]

    def decide_outputs(self, texts: Sequence[str], prefs: UserPrefs | None = None) -> list[Decision]:
        """``decide_output`` for many texts, scored in one batched pass of the moderator."""
        eff = self.effective(prefs)
        return [self._verdict("output", [s], eff, eff.output) for s in self._scores(list(texts))]

    # The server's hook (serve/api.py: a reason string, or None to allow).
    def check_input(self, messages: list[dict[str, Any]]) -> str | None:
        d = self.decide_input(messages)
        return None if d.allowed else d.reason()

    def check_output(self, text: str) -> str | None:
        d = self.decide_output(text)
        return None if d.allowed else d.reason()

    def check_output_for(self, text: str, messages: list[dict[str, Any]]) -> str | None:
        """``check_output`` under the user preferences in ``messages`` (their ``safety:`` line), as
        ``decide_input`` reads them: what a user declines is declined in the replies too."""
        d = self.decide_output(text, prefs_from_messages(messages))
        return None if d.allowed else d.reason()


def moderations_router(scorer: Scorer, model_name: str = "chatforge-moderation", max_inputs: int = 32) -> Any:
    """``POST /v1/moderations`` in OpenAI's shape (``input``: a string or a list of at most
    ``max_inputs`` strings, ``serve.max_moderation_inputs``)."""
    from fastapi import APIRouter
    from fastapi.responses import JSONResponse

    router = APIRouter()

    def bad_input(message: str) -> JSONResponse:
        err = {"message": message, "type": "invalid_request_error", "param": "input", "code": None}
        return JSONResponse({"error": err}, status_code=400)

    @router.post("/v1/moderations")
    async def moderations(body: dict[str, Any]) -> Any:
        inp = body.get("input")
        texts = [inp] if isinstance(inp, str) else inp
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            return bad_input("input: expected a string or a non-empty list of strings")
        # Every text is a pass of the model over all its pieces, in one batch: an unbounded list held
        # the server (and its memory) for as long as the caller liked.
        if len(texts) > max_inputs:
            return bad_input(
                f"input: at most {max_inputs} texts per request on this server, got {len(texts)}"
            )
        import uuid

        return {
            "id": f"modr-{uuid.uuid4().hex[:24]}",
            "model": body.get("model") or model_name,
            "results": scorer.score(texts),
        }

    return router


def serving_policy(cfg: Any) -> tuple[Policy | None, Any]:
    """For ``chatforge serve``: (policy, /v1/moderations router) from ``safety.moderator`` (default
    ``<run>/moderation`` when trained) and ``safety.policy``; (None, None) when there is no moderator."""
    sc = cfg.safety
    if sc.moderator == "none":
        return None, None
    path = Path(sc.moderator) if sc.moderator else Path(cfg.run_dir) / "moderation"
    if not (path / "moderation.json").is_file():
        if sc.moderator:
            raise ChatforgeError(f"safety.moderator: {path} is not a moderation model directory")
        return None, None
    pol = Policy.load(path, sc.policy or None)
    return pol, moderations_router(pol.scorer, max_inputs=cfg.serve.max_moderation_inputs)
