"""Configs: recipes load, overrides apply, and every mistake is a one-line error naming the key."""

import subprocess
import sys
from pathlib import Path

import pytest

from chatforge.config import ConfigError, RunConfig, load_config, to_dict


def test_default_recipe_loads_and_validates() -> None:
    cfg = load_config()
    assert isinstance(cfg, RunConfig)
    assert cfg.name == "cpu-demo"
    assert cfg.data.sources[0].kind == "world"


def test_overrides_are_parsed_as_yaml() -> None:
    cfg = load_config(
        "cpu-demo",
        ["pretrain.lr=3e-4", "pretrain.steps=7", "name=x", "pretrain.compile=true", "sample.prompts=[a, b]"],
    )
    assert cfg.pretrain.lr == 3e-4 and cfg.pretrain.steps == 7 and cfg.name == "x"
    assert cfg.pretrain.compile is True and cfg.sample.prompts == ["a", "b"]


def test_list_elements_can_be_overridden() -> None:
    cfg = load_config("cpu-demo", ["data.sources[0].n_docs=50", "data.sources.0.seed=3"])
    assert cfg.data.sources[0].n_docs == 50 and cfg.data.sources[0].seed == 3
    with pytest.raises(ConfigError, match=r"data.sources\[5\].seed: no list element \[5\]"):
        load_config("cpu-demo", ["data.sources[5].seed=1"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("pretrain.lrr=1", r"pretrain.lrr: unknown key \(did you mean 'lr'\?\)"),
        ("pretrain.lr=fast", r"pretrain.lr: expected a number, got 'fast'"),
        ("pretrain.steps=1.5", r"pretrain.steps: expected an integer"),
        ("pretrain.optimizer=sgd", r"pretrain.optimizer: must be 'adamw' or 'muon'"),
        ("model.num_key_value_heads=3", r"model.num_key_value_heads: must divide"),
        ("pretrain.seq_len=4096", r"pretrain.seq_len: 4096 exceeds model.max_position_embeddings"),
        ("data.sources=[{kind: csv}]", r"data.sources\[0\].kind: must be one of"),
        ("data.sources=[{kind: text}]", r"data.sources\[0\].path: required"),
        ("data.sources[0].zipf=-1", r"data.sources\[0\].zipf: must be in \[0.0, 10.0\], got -1"),
        ("data.sources[0].records=1", r"data.sources\[0\].records: must be in \[0.0, 0.9\], got 1"),
        ("data.sources[0].places=5000", r"data.sources\[0\].places: must be in \[2, 1000\]"),
        ("chat_data.sources[0].kinds=[poetry]", r"chat_data.sources\[0\].kinds: unknown kind 'poetry'"),
        ("grpo.kinds=[fact, poetry]", r"grpo.kinds: unknown kind 'poetry' \(known: fact, "),
        (
            "chat_data.sources=[{kind: openai, path: x.jsonl, kinds: [fact]}]",
            r"chat_data.sources\[0\].kinds: only a world source has kinds",
        ),
        ("nosuch.key=1", r"nosuch: unknown key"),
        ("pretrain=3", r"pretrain.steps|pretrain: expected a mapping"),
        ("pretrain.compile=maybe", r"pretrain.compile: expected true or false"),
        ("pretrain.lr=nan", r"pretrain.lr: expected a number, got 'nan'"),  # NaN passes range checks
        ("sft.grad_clip=.nan", r"sft.grad_clip: expected a number, got nan"),
        ("noequals", r"expected key=value"),
        ("name=", r"name: must name a run directory inside runs_dir, got ''"),  # was runs/ itself
        ("name=..", r"name: must name a run directory inside runs_dir, got '..'"),
        ("pretrain.log_every=0", r"pretrain.log_every: must be positive, got 0"),  # was ZeroDivisionError
        ("chat_data.sources[0].n=0", r"chat_data.sources\[0\].n: a world source needs at least one"),
        ("sft.ckpt_every=-1", r"sft.ckpt_every: must be 0 \(off\) or positive, got -1"),  # saved every step
        ("pretrain.eval_every=-5", r"pretrain.eval_every: must be 0 \(off\) or positive, got -5"),
        ("sft.dist_timeout_s=0", r"sft.dist_timeout_s: must be a positive number of seconds, got 0"),
        ("pretrain.dist_timeout_s=-60", r"pretrain.dist_timeout_s: must be a positive number of seconds"),
        ("serve.rate_limit_rpm=-5", r"serve.rate_limit_rpm: must be >= 0 \(0 = off\), got -5"),  # was "off"
    ],
)
def test_bad_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        load_config("cpu-demo", [override])
    assert "\n" not in str(e.value)


def test_unknown_recipe_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown recipe 'nope'.*cpu-demo"):
        load_config("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(lst)


def test_recipe_and_policy_files_that_are_not_utf8(tmp_path: Path) -> None:
    """Not UTF-8: a one-line error with the line (was a UnicodeDecodeError traceback); a BOM is fine."""
    from chatforge.errors import ChatforgeError
    from chatforge.safety.policy import load_deployment

    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: x\npretrain:\n  steps: 3  # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin\.yaml:3: not UTF-8 text \(byte 0xe9\); save it as UTF-8$"):
        load_config(latin)
    bom = tmp_path / "bom.yaml"
    bom.write_bytes(b"\xef\xbb\xbfname: caf\xc3\xa9\n")
    assert load_config(bom).name == "caf\u00e9"
    policy = tmp_path / "policy.yaml"
    policy.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ChatforgeError, match=r"policy\.yaml:1: not UTF-8 text"):
        load_deployment(policy)


def test_a_key_given_twice_is_refused_in_recipes_policies_and_set_values(tmp_path: Path) -> None:
    """yaml.safe_load kept the last of two equal keys: a recipe with two `sft:` sections (or `lr:` twice)
    ran with only the second, without a word."""
    from chatforge.errors import ChatforgeError
    from chatforge.safety.policy import load_deployment

    twice = tmp_path / "twice.yaml"
    twice.write_text("sft:\n  steps: 5\npretrain:\n  lr: 0.01\nsft:\n  lr: 0.002\n")
    with pytest.raises(ConfigError) as e:
        load_config(twice)
    assert str(e.value) == f"recipe {twice}:5: duplicate key 'sft' (first on line 1)"
    twice.write_text("pretrain:\n  lr: 0.01\n  steps: 3\n  lr: 0.02\n")  # nested, too
    with pytest.raises(ConfigError, match=r"twice\.yaml:4: duplicate key 'lr' \(first on line 2\)$"):
        load_config(twice)
    # YAML's merge key overriding a merged value is not a repeat
    merged = tmp_path / "merged.yaml"
    merged.write_text("pretrain: &t\n  lr: 0.01\n  steps: 3\nsft:\n  <<: *t\n  lr: 0.002\n")
    cfg = load_config(merged)
    assert (cfg.sft.steps, cfg.sft.lr, cfg.pretrain.lr) == (3, 0.002, 0.01)
    with pytest.raises(ConfigError, match=r"^--set .*: duplicate key 'n'$"):
        load_config(None, ["chat_data.sources[0]={kind: world, n: 5, n: 9}"])
    policy = tmp_path / "policy.yaml"
    policy.write_text("name: strict\ndecline_input: [violence]\nname: lenient\n")
    with pytest.raises(ChatforgeError) as e:
        load_deployment(policy)
    assert str(e.value) == f"{policy}:3: duplicate key 'name' (first on line 1)"


def test_every_shipped_recipe_is_valid() -> None:
    for recipe in sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml")):
        cfg = load_config(recipe)
        assert to_dict(cfg)["name"]


def test_cli_prints_one_line_error_not_a_traceback() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "chatforge.cli", "pretrain", "--set", "pretrain.lrr=1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    assert res.stderr.strip() == "chatforge pretrain: error: pretrain.lrr: unknown key (did you mean 'lr'?)"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["report", "--name", "nosuch"], "chatforge report: error: runs/nosuch: no such run directory"),
        (["redteam", "--name", "nosuch"], "chatforge redteam: error: runs/nosuch: none of safety.models"),
        (["eval", "--suite", "world", "--limit", "-3"], "chatforge eval: error: --limit -3: must be >= 0"),
    ],
)
def test_cli_commands_on_a_run_that_is_not_there(tmp_path: Path, argv: list[str], message: str) -> None:
    """``report`` used to crash with a FileNotFoundError traceback, ``redteam`` to print {} and exit 0
    after writing a suite into a new, empty run directory; ``--limit -3`` silently dropped 3 items."""
    res = subprocess.run(
        [sys.executable, "-m", "chatforge.cli", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert res.returncode == 2 and res.stderr.startswith(message), res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "runs").exists()


def test_a_saved_run_config_with_a_removed_setting_still_loads(tmp_path: Path) -> None:
    """Runs save their whole config; ppo.whiten_rewards (removed: nothing read it) is in every older run's
    config.yaml, which must still load for `chatforge serve --recipe runs/x/config.yaml`."""
    import yaml

    old = to_dict(RunConfig())
    old["ppo"]["whiten_rewards"] = False  # as every older run wrote it
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old))
    assert load_config(path).ppo.kl_coef == RunConfig().ppo.kl_coef
    old["ppo"]["whiten_rewards"] = True
    path.write_text(yaml.safe_dump(old))
    with pytest.raises(ConfigError, match=r"ppo\.whiten_rewards: removed: nothing ever read it"):
        load_config(path)


def test_a_recipe_extends_another_and_names_only_what_it_changes(tmp_path: Path) -> None:
    quick, demo = load_config("cpu-quick"), load_config("cpu-demo")
    assert quick.name == "cpu-quick" and quick.sft.steps == 1200
    assert quick.sft.lr == demo.sft.lr and quick.model == demo.model  # kept from cpu-demo
    assert quick.grpo.kinds == demo.grpo.kinds and quick.speedrun.rl == "grpo" and not quick.speedrun.safety

    (tmp_path / "sub").mkdir()
    parent = tmp_path / "parent.yaml"
    parent.write_text("name: p\nsft:\n  steps: 7\n  lr: 0.002\nevals:\n  models: [base, sft]\n")
    child = tmp_path / "sub" / "child.yaml"
    child.write_text("extends: ../parent.yaml\nname: c\nsft:\n  steps: 9\nevals:\n  models: [sft]\n")
    cfg = load_config(child, ["sft.lr=0.003"])
    assert (cfg.name, cfg.sft.steps, cfg.sft.lr, cfg.evals.models) == ("c", 9, 0.003, ["sft"])
    assert load_config(child).sft.lr == 0.002  # a section merges key by key; a list is replaced

    parent.write_text("extends: sub/child.yaml\n")
    with pytest.raises(
        ConfigError, match=r"extends itself \(.*child.yaml -> .*parent.yaml -> .*child.yaml\)"
    ):
        load_config(child)
    child.write_text("extends: nope\n")
    with pytest.raises(ConfigError, match=r"unknown recipe 'nope'"):
        load_config(child)
    child.write_text("extends: [cpu-demo]\n")
    with pytest.raises(ConfigError, match=r"extends: expected a recipe name or file"):
        load_config(child)
    child.write_text("extends: cpu-demo\nsft:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"sft.stepz: unknown key"):
        load_config(child)
