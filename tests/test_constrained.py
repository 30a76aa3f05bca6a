"""JSON / JSON-schema constrained decoding: valid output even from an untrained random model."""

import json

import jsonschema
import pytest
import torch

from chatforge.config import ModelConfig
from chatforge.engine import Engine, SamplingParams, json_schema_of
from chatforge.model import GPT
from chatforge.tokenizer import train_tokenizer

TEXTS = [
    '{"name":"Ada","age":36,"tags":["math","poetry"],"ok":true,"score":-1.5e3,"x":null}',
    "the quick brown fox jumps over the lazy dog, said the caf\u00e9 owner \u00fcber 42 times",
]

# Every schema here bounds the length of its JSON (maxLength, integer ranges, maxItems, enums), so a
# constrained row must end with finish_reason "stop" well within MAX_NEW.
MAX_NEW = 600
SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 130},
            "role": {"enum": ["admin", "user", "guest"]},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 10},
                    "zip": {"type": "integer", "minimum": 10000, "maximum": 99999},
                },
                "required": ["city", "zip"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "age", "role", "address"],
        "additionalProperties": False,
    },
    "array_of_objects": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"id": {"type": "integer", "minimum": -5, "maximum": 5}, "ok": {"type": "boolean"}},
            "required": ["id", "ok"],
            "additionalProperties": False,
        },
        "minItems": 1,
        "maxItems": 4,
    },
    "enum_and_const": {
        "type": "object",
        "properties": {
            "answer": {"enum": ["yes", "no", 3, None]},
            "kind": {"const": "reply"},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
        },
        "required": ["answer", "kind", "tags"],
        "additionalProperties": False,
    },
    "integers": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "maxItems": 6},
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread: None) -> None:
    """Every test here runs single-threaded (see conftest)."""


@pytest.fixture(scope="module")
def engine() -> Engine:
    """A random, untrained model: its choices are noise, so only the grammar keeps the JSON valid."""
    tok = train_tokenizer(TEXTS * 20, vocab_size=320)
    cfg = ModelConfig(
        vocab_size=384,  # larger than the tokenizer, as after rounding: the extra ids must never appear
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    return Engine(GPT(cfg), tok)


def _rf(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
@pytest.mark.parametrize(
    "sampling",
    [
        dict(temperature=1.0),
        dict(temperature=0.0),
        dict(temperature=0.8, top_p=0.9),
        dict(temperature=2.0, top_k=5),
    ],
    ids=["t1", "greedy", "top_p", "top_k"],
)
def test_schema_output_always_validates(engine: Engine, name: str, sampling: dict) -> None:
    schema = SCHEMAS[name]
    for seed in (0, 1):
        p = SamplingParams(max_new_tokens=MAX_NEW, n=3, seed=seed, response_format=_rf(schema), **sampling)
        for c in engine.generate(["x"], p):
            assert c.finish_reason == "stop", (c.text, len(c.token_ids))
            jsonschema.validate(json.loads(c.text), schema)
            assert c.text == engine.tokenizer.decode(c.token_ids)  # ended by the grammar, no end token
            assert max(c.token_ids) < engine.tokenizer.vocab_size


def test_properties_come_in_the_schemas_order(engine: Engine) -> None:
    """The grammar writes required properties in the schema's order (the order chat data teaches), and
    two schemas that differ only in that order are two grammars, not one cache entry."""

    def schema(keys: tuple[str, ...]) -> dict:
        props = {k: {"type": "string", "maxLength": 5} for k in keys}
        return {
            "type": "object",
            "properties": props,
            "required": sorted(keys),
            "additionalProperties": False,
        }

    for keys in (("town", "country"), ("country", "town")):
        p = SamplingParams(max_new_tokens=MAX_NEW, n=2, seed=0, response_format=_rf(schema(keys)))
        for c in engine.generate(["x"], p):
            assert tuple(json.loads(c.text)) == keys


def test_json_object_mode_parses(engine: Engine) -> None:
    # Free-form objects have unbounded strings, so a random model may run out of tokens ("length");
    # whatever finished with "stop" must be a JSON object.
    p = SamplingParams(
        max_new_tokens=1200, temperature=1.0, n=6, seed=1, response_format={"type": "json_object"}
    )
    out = engine.generate(["x"], p)
    stopped = [c for c in out if c.finish_reason == "stop"]
    assert len(stopped) >= 3
    for c in stopped:
        assert isinstance(json.loads(c.text), dict)
    for c in out:
        if c.finish_reason == "length":
            assert len(c.token_ids) == 1200


def test_bare_json_schema_shape_and_text_type() -> None:
    schema = {"type": "integer"}
    assert json_schema_of({"type": "json_schema", "schema": schema}) == schema
    assert (
        json_schema_of({"type": "json_schema", "json_schema": {"schema": schema, "strict": True}}) == schema
    )
    assert json_schema_of({"type": "json_object"}) == {"type": "object"}
    assert json_schema_of({"type": "text"}) is None and json_schema_of(None) is None


def test_running_out_of_tokens_is_length(engine: Engine) -> None:
    p = SamplingParams(max_new_tokens=3, temperature=0, response_format=_rf(SCHEMAS["nested"]))
    c = engine.generate(["x"], p)[0]
    assert c.finish_reason == "length" and len(c.token_ids) == 3
    with pytest.raises(json.JSONDecodeError):
        json.loads(c.text)


def test_mixed_rows_in_one_batch(engine: Engine) -> None:
    """Constrained and free rows share steps; the free row is exactly what it is alone."""
    free = SamplingParams(max_new_tokens=40, temperature=0, stop_token_ids=[])
    alone = engine.generate(["the quick"], free)[0].token_ids
    session = engine.start(max_batch=4)
    prompt = engine.tokenizer.encode("the quick")
    session.add(
        "schema",
        prompt,
        SamplingParams(
            max_new_tokens=MAX_NEW, temperature=1.0, seed=3, response_format=_rf(SCHEMAS["nested"])
        ),
    )
    session.add("free", prompt, free)
    session.add(
        "object",
        prompt,
        SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0, response_format={"type": "json_object"}),
    )
    session.add(
        "ints",
        prompt,
        SamplingParams(
            max_new_tokens=MAX_NEW, temperature=0.7, seed=4, response_format=_rf(SCHEMAS["integers"])
        ),
    )
    done = {}
    while session.active:
        for ev in session.step():
            if ev.finished:
                done[ev.request_id] = ev.completion
    assert done["free"].token_ids == alone
    jsonschema.validate(json.loads(done["schema"].text), SCHEMAS["nested"])
    jsonschema.validate(json.loads(done["ints"].text), SCHEMAS["integers"])
    if done["object"].finish_reason == "stop":
        assert isinstance(json.loads(done["object"].text), dict)


def test_grammar_stops_right_after_the_value(engine: Engine) -> None:
    p = SamplingParams(
        max_new_tokens=50, temperature=1.0, seed=0, n=4, response_format=_rf({"enum": ["yes", "no"]})
    )
    for c in engine.generate(["x"], p):
        assert c.finish_reason == "stop" and c.text in ('"yes"', '"no"')


def test_top_k_one_is_greedy_under_a_constraint(engine: Engine) -> None:
    rf = _rf(SCHEMAS["nested"])
    g = engine.generate(["x"], SamplingParams(max_new_tokens=MAX_NEW, temperature=0, response_format=rf))[0]
    k = engine.generate(
        ["x"], SamplingParams(max_new_tokens=MAX_NEW, temperature=1.3, top_k=1, seed=9, response_format=rf)
    )[0]
    assert g.token_ids == k.token_ids


@pytest.mark.parametrize(
    "response_format, message",
    [
        (_rf({"type": "foo"}), "unsupported JSON schema"),
        (_rf({"not": {"type": "string"}}), "unsupported JSON schema"),
        (_rf({"type": "string", "pattern": "(?<=a)b"}), "unsupported JSON schema"),
        (
            _rf(
                {
                    "type": "object",
                    "properties": {"a": {"type": "integer", "minimum": 5, "maximum": 1}},
                    "required": ["a"],
                }
            ),
            "unsatisfiable",
        ),
        (_rf({"$ref": "#/$defs/missing"}), "unsupported JSON schema"),
        ({"type": "json_schema"}, "needs a schema"),
        ({"type": "json_schema", "json_schema": {"schema": "not an object"}}, "needs a schema"),
        ({"type": "xml"}, "response_format.type"),
        ("json", "must be an object"),
    ],
)
def test_bad_schema_is_a_value_error(engine: Engine, response_format: object, message: str) -> None:
    p = SamplingParams(max_new_tokens=10, response_format=response_format)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        engine.generate(["x"], p)
    session = engine.start(max_batch=1)
    with pytest.raises(ValueError, match=message):
        session.add("r", [5, 6], p)
    assert session.active == 0 and session.free_slots == 1  # nothing was taken


def test_logprobs_under_a_constraint_are_the_models(engine: Engine) -> None:
    p = SamplingParams(
        max_new_tokens=MAX_NEW, temperature=0, logprobs=True, response_format=_rf(SCHEMAS["integers"])
    )
    c = engine.generate(["x"], p)[0]
    assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids)
    assert all(lp <= 0 for lp in c.logprobs)


def test_our_byte_level_tokens_map_correctly_into_the_grammar(engine: Engine) -> None:
    """Our own tokenization of valid JSON (multi-byte characters included) is accepted token by token,
    and special tokens / ids past the tokenizer are never allowed inside the value."""
    import numpy as np

    tok = engine.tokenizer
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}}}
    doc = json.dumps(
        {"name": "caf\u00e9 \u00fcber \u65e5\u672c \U0001f600", "n": 42},
        separators=(",", ":"),
        ensure_ascii=False,
    )
    ids = tok.encode(doc)
    assert tok.decode(ids) == doc
    m = engine._grammars().matcher(schema)
    V = engine.vocab_size
    words = (V + 31) // 32
    mask = np.zeros(words, dtype=np.int32)
    for t in ids:
        m.unsafe_compute_mask_ptr(mask.ctypes.data, words * 4)
        allowed = np.unpackbits(mask.view(np.uint8), bitorder="little")[:V]
        assert allowed[t], (t, tok.decode([t]))
        assert not allowed[tok.im_start_id] and not allowed[tok.pad_id]
        assert not allowed[tok.vocab_size :].any()
        assert m.consume_token(t)
    assert m.is_stopped()
