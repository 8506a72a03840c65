"""Config parsing: one source, validated, errors name the key and the value."""

from pathlib import Path

import pytest

from protocol.config import ConfigError, RunConfig, load_config, parse_config, parse_overrides

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "conf").glob("*.toml")), ids=lambda p: p.name)
def test_every_conf_file_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)


def test_default_file_equals_builtin_defaults():
    assert load_config(ROOT / "conf" / "default.toml") == RunConfig()


@pytest.mark.parametrize(
    "key,value,fragment",
    [
        ("replay.buffer-size", -3, "`replay.buffer-size` must be > 0, got -3"),
        ("replay.mix-ratio", 1.5, "`replay.mix-ratio` must be in (0, 1), got 1.5"),
        ("lora.rank", 0, "`lora.rank` must be > 0, got 0"),
        ("lora.rank", "eight", "`lora.rank` must be an integer, got 'eight'"),
        ("lora.dropout", 1.0, "`lora.dropout` must be in [0, 1)"),
        ("train.device", "tpu", "`train.device` must be one of auto, cpu, cuda"),
        ("data.tasks", [], "`data.tasks` must be a non-empty list"),
        ("data.image-size", 48, "`data.image-size` must be 32 or 64, got 48"),
        ("model.text-hidden", 130, "divisible by model.text-heads"),
        ("model.base-path", "/no/such/ckpt", "`model.base-path` must be an existing local"),
        ("replay.policy", "fifo", "`replay.policy` must be one of balanced-reservoir"),
        ("dmole.budget-fraction", 0.0, "`dmole.budget-fraction` must be in (0, 1], got 0.0"),
        ("dmole.router", "gate", "`dmole.router` must be one of autoencoder, oracle, none"),
        ("dmole.allocation", "random", "`dmole.allocation` must be one of gradient, uniform"),
    ],
)
def test_bad_values_name_key_and_value(key, value, fragment):
    with pytest.raises(ConfigError) as e:
        parse_config({key: value})
    assert fragment in str(e.value)


def test_unknown_key_lists_known_keys():
    with pytest.raises(ConfigError) as e:
        parse_config({"lora.rnak": 4})
    assert "unknown config key `lora.rnak`" in str(e.value)
    assert "lora.rank" in str(e.value)


def test_nested_and_dotted_keys_are_the_same():
    a = parse_config({"replay": {"buffer-size": 10}})
    b = parse_config({"replay.buffer-size": 10})
    assert a == b and a.replay.buffer_size == 10


def test_cli_strings_are_coerced():
    cfg = parse_config(parse_overrides(["lora.rank=4", "train.lr=0.01", "data.tasks=color,arith"]))
    assert cfg.lora.rank == 4 and cfg.train.lr == 0.01 and cfg.data.tasks == ("color", "arith")


def test_flat_round_trip():
    cfg = load_config(ROOT / "conf" / "tiny.toml")
    assert parse_config(cfg.to_flat()) == cfg


def test_frozen():
    cfg = RunConfig()
    with pytest.raises(AttributeError):
        cfg.lora.rank = 3  # type: ignore[misc]


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["lora.rank"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[lora\nrank = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_replay_policy_names_match_the_edge_registry():
    from edge.replay import REPLAY_POLICIES
    from protocol.config import REPLAY_POLICY_NAMES

    assert set(REPLAY_POLICY_NAMES) == set(REPLAY_POLICIES)


def test_publishing_bundles_needs_an_existing_signing_key(tmp_path):
    from protocol.app_config import split_run_config

    with pytest.raises(ConfigError, match="app.signing-key"):
        split_run_config({"app.registry-dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="is not a file"):
        split_run_config({"app.registry-dir": str(tmp_path), "app.signing-key": str(tmp_path / "k")})
    (tmp_path / "k").write_text("x")
    _, app = split_run_config({"app.registry-dir": str(tmp_path), "app.signing-key": str(tmp_path / "k")})
    assert app.registry_dir == str(tmp_path)


def test_local_epochs_scale_steps_with_the_shard_and_are_capped():
    from protocol.config import FederationConfig

    fixed = FederationConfig(local_steps=80, local_epochs=0)
    assert fixed.steps_for(34, 32) == fixed.steps_for(347, 32) == 80
    fed = FederationConfig(local_steps=300, local_epochs=12)
    assert fed.steps_for(34, 32) == 13 and fed.steps_for(347, 32) == 131
    assert FederationConfig(local_steps=50, local_epochs=12).steps_for(347, 32) == 50
    with pytest.raises(ConfigError, match="local-epochs"):
        parse_config({"federation.local-epochs": -1})
    assert parse_config({"federation.client-lr": 0.01}).federation.client_lr == 0.01
    with pytest.raises(ConfigError, match="client-lr"):
        parse_config({"federation.client-lr": 0})
    assert parse_config({"federation.server-lr": 2.5}).federation.server_lr == 2.5
    assert parse_config({"federation.client-optimizer": "keep"}).federation.client_optimizer == "keep"
    with pytest.raises(ConfigError, match="client-optimizer.*reset, keep"):
        parse_config({"federation.client-optimizer": "adam"})
    assert parse_config({"federation.client-sampling": "size"}).federation.client_sampling == "size"
    with pytest.raises(ConfigError, match="client-sampling.*uniform, size"):
        parse_config({"federation.client-sampling": "weighted"})
    for bad in (0, -1.0, 17, float("nan")):
        with pytest.raises(ConfigError, match="server-lr"):
            parse_config({"federation.server-lr": bad})
