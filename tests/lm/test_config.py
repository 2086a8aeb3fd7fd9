"""Config loading: strict keys and types, precedence, presets."""

from __future__ import annotations

import pytest

from flatlm.lm.config import CONFIG_DIR, ConfigError, load_config, parse_override


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[train]\nsteps = 5\nlr_sceduler = 'cosine'\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.lr_sceduler'"):
        load_config(path=path)
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'"):
        load_config(overrides=["trian.steps=3"])


def test_wrong_type_is_named(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[train]\nsteps = 'many'\n")
    with pytest.raises(ConfigError, match=r"'train\.steps' must be int, got str"):
        load_config(path=path)
    with pytest.raises(ConfigError, match=r"'optim\.lr' must be float, got bool"):
        load_config(overrides={"optim.lr": True})
    with pytest.raises(ConfigError, match=r"'model' must be a section"):
        load_config(overrides={"model": 3})


def test_malformed_toml_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[train\nsteps = 5\n")
    with pytest.raises(ConfigError, match=r"malformed config file .*broken.toml"):
        load_config(path=path)


def test_yaml_and_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 7\n  batch_size: 3\noptim:\n  lr: 1\n")
    cfg = load_config(preset="quick", path=path, overrides=["train.steps=9", "optim.method=sam"])
    assert cfg.train.steps == 9  # --set beats the file
    assert cfg.train.batch_size == 3  # the file beats the preset
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)  # int widened to float
    assert cfg.optim.method == "sam"  # bare word -> string
    assert cfg.model.size == "micro"  # from the preset


def test_yaml_exponent_floats_are_floats(tmp_path):
    """YAML 1.1 reads ``3e-3`` (no dot) as a string; a config means the number."""
    path = tmp_path / "c.yaml"
    path.write_text(
        "optim:\n  lr: 3e-3\n  rho: 5E-2\n  method_kwargs:\n    gasam: {xi: 1e-12}\n"
        "train:\n  min_lr_ratio: 1.5e-1\n  wandb_project: '1e5'\n"
    )
    cfg = load_config(path=path)
    assert cfg.optim.lr == 3e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.rho == 5e-2 and cfg.train.min_lr_ratio == 0.15
    assert cfg.optim.method_kwargs == {"gasam": {"xi": 1e-12}}
    assert cfg.train.wandb_project == "1e5"  # a quoted string stays a string
    path.write_text("train:\n  steps: 1e3\n")  # a float where an int is wanted: still refused
    with pytest.raises(ConfigError, match=r"'train\.steps' must be int, got float"):
        load_config(path=path)


def test_optional_and_nested_values():
    cfg = load_config(overrides=["optim.rho=0.1", "optim.method_kwargs={gasam={alpha=0.5}}"])
    assert cfg.optim.rho == 0.1 and cfg.optim.method_kwargs == {"gasam": {"alpha": 0.5}}
    assert load_config(overrides=["optim.rho=none"]).optim.rho is None
    assert parse_override("compare.seeds=[1, 2]") == ("compare.seeds", [1, 2])
    with pytest.raises(ConfigError, match=r"section.key=value"):
        parse_override("train.steps")


def test_value_checks_name_the_key():
    with pytest.raises(ConfigError, match=r"'data.tokenizer'"):
        load_config(overrides={"data.tokenizer": "words"})
    with pytest.raises(ConfigError, match=r"unknown preset 'nope'.*quick"):
        load_config(preset="nope")


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.toml")))
def test_every_builtin_preset_loads(name):
    cfg = load_config(preset=name)
    assert cfg.train.steps > 0


def test_method_options_are_checked_when_the_config_loads():
    with pytest.raises(ConfigError, match=r"'optim\.method_kwargs\.gasam': gasam has no option"):
        load_config(overrides={"optim.method_kwargs": {"gasam": {"alpah": 1.0}}})
    with pytest.raises(ConfigError, match=r"name the table \[optim\.method_kwargs\.gasam\]"):
        load_config(overrides={"optim.method_kwargs": {"GA-SAM": {"alpha": 1.0}}})
    with pytest.raises(
        ConfigError, match=r"'compare\.methods\[1\]'.*option 'max_grad_norm' is set"
    ):
        load_config(overrides={"compare.methods": ["sam", "fsam:max_grad_norm=2"]})
    with pytest.raises(ConfigError, match=r"'compare\.seeds' must not repeat"):
        load_config(overrides={"compare.seeds": [0, 1, 0]})
    cfg = load_config(overrides={"optim.method_kwargs": {"gasam:alpha=-1": {"beta": 0.5}}})
    assert cfg.optim.method_kwargs == {"gasam:alpha=-1": {"beta": 0.5}}
    # a base's table completes the run's spec of that base: bSAM's N comes from the spec
    table = {"optim.method_kwargs": {"bsam": {"damping": 0.2}}}
    cfg = load_config(overrides={"optim.method": "bsam:num_data=64", **table})
    assert cfg.optim.method_kwargs == {"bsam": {"damping": 0.2}}
    with pytest.raises(ConfigError, match=r"'optim\.method_kwargs\.bsam'.*num_data"):
        load_config(overrides=table)  # and no spec gives N
    with pytest.raises(ConfigError, match=r"'optim\.method_kwargs\.bsam'.*damping"):
        load_config(
            overrides={
                "optim.method": "bsam:num_data=64",
                **{"optim.method_kwargs": {"bsam": {"damping": -1.0}}},
            }
        )
