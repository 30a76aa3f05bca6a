"""The eval registry: YAML specs + JSONL samples, close to openai/evals, so anyone can add an eval
without writing code.

A YAML file maps eval names to specs::

    capitals:
      description: Capital cities, one word answers
      samples: capitals.jsonl          # relative to this YAML file; or `loader: gsm8k` + `loader_args`
      grader: includes                 # any name in chatforge.evals.graders.GRADERS
      grader_options: {all: false}
      sampling: {n: 1, temperature: 0.0, max_new_tokens: 32}

Each samples line is ``{"input": [{"role": ..., "content": ...}, ...] or "raw prompt", "ideal": ...}``
plus what the grader reads (``choices``, ``test``, ``check``...), optionally ``"id"`` and ``"kind"`` (the
report breaks scores down by kind). Specs come from this directory and from user directories
(``--registry DIR``, later ones override same-named evals). Every mistake is one line naming the file and
the line: a missing field, a key given twice, an unknown key or grader, a bad option, an unreadable or malformed JSONL line.
"""

from __future__ import annotations

import difflib
import inspect
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from chatforge.errors import ChatforgeError, read_user_text
from chatforge.yamlio import load_yaml

BUILTIN_DIR = Path(__file__).resolve().parent
SPEC_KEYS = (
    "description",
    "samples",
    "loader",
    "loader_args",
    "grader",
    "grader_options",
    "sampling",
    "constrained_json",
    "limit",
)
SAMPLING_KEYS = ("n", "temperature", "top_p", "top_k", "max_new_tokens", "seed", "stop")
_SAMPLING_TYPES = {
    "n": "an integer",
    "top_k": "an integer",
    "max_new_tokens": "an integer",
    "seed": "an integer",
    "temperature": "a number",
    "top_p": "a number",
    "stop": "a string or a list of strings",
}


def _sampling_value_ok(key: str, value: Any) -> bool:
    want = _SAMPLING_TYPES[key]
    if want == "a string or a list of strings":
        return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if want == "an integer" else isinstance(value, int | float)


class RegistryError(ChatforgeError):
    pass


@dataclass
class EvalSpec:
    name: str
    grader: str
    where: str  # "file.yaml:LINE", for messages
    description: str = ""
    samples: Path | None = None
    loader: str | None = None
    loader_args: dict[str, Any] = field(default_factory=dict)
    grader_options: dict[str, Any] = field(default_factory=dict)
    sampling: dict[str, Any] = field(default_factory=dict)
    constrained_json: bool = False  # also run JSON-schema items with the schema enforced (world suite)
    limit: int = 0  # 0 = every sample

    def make_grader(self) -> Any:
        from chatforge.evals.graders import make_grader

        try:
            return make_grader(self.grader, self.grader_options)
        except ChatforgeError as e:
            raise RegistryError(f"{self.where}: {e}") from None


def _line_map(node: yaml.Node) -> dict[str, tuple[int, dict[str, int]]]:
    """eval name -> (its line, {key: line}) from the composed YAML, for messages that point at lines."""
    out: dict[str, tuple[int, dict[str, int]]] = {}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            keys = {}
            if isinstance(v, yaml.MappingNode):
                keys = {kk.value: kk.start_mark.line + 1 for kk, _ in v.value}
            out[str(k.value)] = (k.start_mark.line + 1, keys)
    return out


def _check_loader_args(fn: Any, args: dict[str, Any], where: str) -> None:
    """Each of ``args`` is a parameter of the loader, of its default's type where the default says one."""
    from chatforge.evals.graders import option_type, option_type_ok

    params = {k: p.default for k, p in inspect.signature(fn).parameters.items() if k != "context"}
    for key, value in args.items():
        if key not in params:
            close = difflib.get_close_matches(str(key), params, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(params)}"
            raise RegistryError(f"{where}: unknown loader_args key {key!r} ({hint})")
        default = params[key]
        want = option_type(default) if default is not inspect.Parameter.empty else ""
        if want and not option_type_ok(default, value):
            raise RegistryError(f"{where}: loader_args.{key} must be {want}, got {value!r}")


def load_spec_file(path: Path) -> dict[str, EvalSpec]:
    from chatforge.evals.benchmarks import LOADERS

    try:
        text = read_user_text(path, RegistryError)
    except OSError as e:
        raise RegistryError(f"{path}: cannot read ({e.strerror})") from None
    data = load_yaml(text, str(path), RegistryError)
    lines = _line_map(yaml.compose(text))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RegistryError(f"{path}:1: expected a mapping of eval names to specs")
    specs = {}
    for name, body in data.items():
        line, key_lines = lines.get(str(name), (1, {}))
        where = f"{path}:{line}"
        if not isinstance(body, dict):
            raise RegistryError(f"{where}: eval {name!r} must be a mapping of spec keys")

        def at(key: str, _kl: dict[str, int] = key_lines, _line: int = line) -> str:
            return f"{path}:{_kl.get(key, _line)}"

        for key in body:
            if key not in SPEC_KEYS:
                close = difflib.get_close_matches(str(key), SPEC_KEYS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(SPEC_KEYS)})"
                raise RegistryError(f"{at(key)}: eval {name!r}: unknown key {key!r}{hint}")
        if "grader" not in body:
            raise RegistryError(f"{where}: eval {name!r}: missing field 'grader'")
        if ("samples" in body) == ("loader" in body):
            raise RegistryError(
                f"{where}: eval {name!r}: give exactly one of 'samples' (a JSONL file) or 'loader'"
            )
        if "loader" in body and body["loader"] not in LOADERS:
            close = difflib.get_close_matches(str(body["loader"]), LOADERS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(sorted(LOADERS))})"
            raise RegistryError(f"{at('loader')}: eval {name!r}: unknown loader {body['loader']!r}{hint}")
        for key in ("loader_args", "grader_options", "sampling"):
            if not isinstance(body.get(key, {}), dict):
                raise RegistryError(f"{at(key)}: eval {name!r}: {key} must be a mapping")
        if "samples" in body and not (isinstance(body["samples"], str) and body["samples"]):
            raise RegistryError(
                f"{at('samples')}: eval {name!r}: samples must be a JSONL file name, got {body['samples']!r}"
            )
        if not isinstance(body.get("constrained_json", False), bool):  # bool("no") would be True
            raise RegistryError(
                f"{at('constrained_json')}: eval {name!r}: constrained_json must be true or false,"
                f" got {body['constrained_json']!r}"
            )
        if "loader" in body:  # else a TypeError from inside the loader when the eval runs
            _check_loader_args(
                LOADERS[body["loader"]], body.get("loader_args", {}), f"{at('loader_args')}: eval {name!r}"
            )
        for key, value in body.get("sampling", {}).items():
            if key not in SAMPLING_KEYS:
                raise RegistryError(
                    f"{at('sampling')}: eval {name!r}: unknown sampling key {key!r} (known: {', '.join(SAMPLING_KEYS)})"
                )
            if not _sampling_value_ok(key, value):  # else a TypeError deep in the run
                raise RegistryError(
                    f"{at('sampling')}: eval {name!r}: sampling.{key} must be {_SAMPLING_TYPES[key]}, got {value!r}"
                )
        limit = body.get("limit", 0)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise RegistryError(f"{at('limit')}: eval {name!r}: limit must be an integer >= 0, got {limit!r}")
        spec = EvalSpec(
            name=str(name),
            grader=str(body["grader"]),
            where=at("grader"),
            description=str(body.get("description", "")),
            samples=(path.parent / body["samples"]) if "samples" in body else None,
            loader=body.get("loader"),
            loader_args=dict(body.get("loader_args", {})),
            grader_options=dict(body.get("grader_options", {})),
            sampling=dict(body.get("sampling", {})),
            constrained_json=bool(body.get("constrained_json", False)),
            limit=limit,
        )
        spec.make_grader()  # unknown grader or bad options: reported now, with the line
        spec.where = where
        specs[spec.name] = spec
    return specs


def check_dirs(dirs: Sequence[str | Path], key: str = "--registry") -> list[Path]:
    """``dirs`` (registry directories or single YAML files) as paths; one that is not there is a
    RegistryError naming the setting it came from: ``key`` is ``--registry`` or ``evals.registry:``."""
    for d in dirs:
        if not (Path(d).is_file() or Path(d).is_dir()):
            raise RegistryError(f"{key} {d}: no such file or directory")
    return [Path(d) for d in dirs]


def load_registry(
    extra_dirs: Sequence[str | Path] | None = None, *, registry_key: str = "--registry"
) -> dict[str, EvalSpec]:
    """Every spec in the built-in directory, then in each of ``extra_dirs`` (a dir or a single YAML)."""
    specs: dict[str, EvalSpec] = {}
    for d in [BUILTIN_DIR, *check_dirs(extra_dirs or [], registry_key)]:
        files = [d] if d.is_file() else sorted([*d.glob("*.yaml"), *d.glob("*.yml")])
        for f in files:
            specs.update(load_spec_file(f))
    return specs


def get_spec(
    name: str,
    extra_dirs: Sequence[str | Path] | None = None,
    *,
    suite_key: str = "--suite",
    registry_key: str = "--registry",
    hint: str = "",
) -> EvalSpec:
    """The spec named ``name``. Messages name the settings ``suite_key`` and ``registry_key`` (options of
    ``chatforge eval``, or config keys in training); a missing suite's message ends with ``hint``."""
    specs = load_registry(extra_dirs, registry_key=registry_key)
    if name not in specs:
        close = difflib.get_close_matches(name, specs, n=3)
        known = f" (did you mean {', '.join(close)}?)" if close else f" (known: {', '.join(sorted(specs))})"
        raise RegistryError(f"{suite_key} {name}: no such eval{known}{hint}")
    return specs[name]


def check_item(item: Any, where: str, grader: str) -> dict:
    """One sample: an object with an ``input`` (messages or a string) and what the grader needs."""
    if not isinstance(item, dict):
        raise RegistryError(f"{where}: expected a JSON object")
    if "input" not in item:
        raise RegistryError(f"{where}: missing field 'input'")
    inp = item["input"]
    if isinstance(inp, list):
        if not inp:
            raise RegistryError(f"{where}: 'input' is an empty list of messages")
        for k, m in enumerate(inp):
            if not (
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            ):
                raise RegistryError(f'{where}: input[{k}] must be {{"role": str, "content": str}}')
            if m["role"] not in ("system", "user", "assistant"):
                raise RegistryError(
                    f"{where}: input[{k}].role must be system, user or assistant, got {m['role']!r}"
                )
    elif not isinstance(inp, str) or not inp:
        raise RegistryError(f"{where}: 'input' must be a list of messages or a non-empty string")
    needs = {
        "choice_logprob": ("choices", "ideal"),
        "code_exec": ("test",),
        "ifeval": ("instruction_id_list", "kwargs"),
        "exact": ("ideal",),
        "includes": ("ideal",),
        "fuzzy": ("ideal",),
        "number": ("ideal",),
    }.get(grader, ())
    for key in needs:
        if key not in item:
            raise RegistryError(f"{where}: missing field {key!r} (the {grader!r} grader needs it)")
    if grader == "ifeval":
        from chatforge.evals.graders import ifeval_item_problem

        if problem := ifeval_item_problem(item):
            raise RegistryError(f"{where}: {problem}")
    return item


def read_samples(path: Path, grader: str) -> list[dict]:
    try:
        raw = read_user_text(path, RegistryError)
    except OSError as e:
        raise RegistryError(f"{path}: cannot read samples ({e.strerror})") from None
    items = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise RegistryError(f"{path}:{lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
        items.append(check_item(obj, f"{path}:{lineno}", grader))
    if not items:
        raise RegistryError(f"{path}: no samples")
    return items


def load_samples(spec: EvalSpec, context: dict[str, Any] | None = None, limit: int = 0) -> list[dict]:
    """The spec's items (ids and kinds filled in), at most ``limit`` (or the spec's own limit)."""
    from chatforge.evals.benchmarks import LOADERS

    if spec.samples is not None:
        items = read_samples(spec.samples, spec.grader)
    else:
        try:
            items = LOADERS[spec.loader](**{**spec.loader_args, "context": context or {}})
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            # A file in another shape (loader_args.path): a KeyError traceback from inside the loader.
            raise RegistryError(
                f"{spec.where}: eval {spec.name!r}: the data is not in the {spec.loader} loader's format"
                f" ({e.__class__.__name__}: {e})"
            ) from None
        for k, it in enumerate(items):
            check_item(it, f"{spec.where} (loader {spec.loader}, item {k})", spec.grader)
        if not items:  # else a StatisticsError from the scores of no items, after loading the model
            raise RegistryError(f"{spec.where}: eval {spec.name!r}: loader {spec.loader} found no items")
    limit = limit or spec.limit
    items = items[:limit] if limit else items
    for k, it in enumerate(items):
        it.setdefault("id", f"{spec.name}-{k:05d}")
        it.setdefault("kind", spec.name)
    return items
