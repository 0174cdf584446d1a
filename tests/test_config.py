from pathlib import Path

import pytest
import yaml

from gpt.config import ConfigError, load_run_config, model_config_from_dict, parse_overrides, run_config_from_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_run_config_loads(path):
    try:
        config = load_run_config(path)
    except ConfigError as e:  # a config for your own corpus says so, and loads once given one
        assert "data.path is required" in str(e)
        config = load_run_config(path, ["--data.path=corpus/"])
    assert config.model.embedding_dim % config.model.num_heads == 0


@pytest.mark.parametrize("path", sorted((CONFIGS / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_every_accelerate_config_is_valid(path):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(path))  # as `accelerate launch --config_file` reads it
    assert config.num_processes >= 1 and config.distributed_type is not None
    assert yaml.safe_load(path.read_text())["use_cpu"] is False  # use_cpu: true would start one process


def test_seed_config_is_the_seed_tutorials():
    config = load_run_config(CONFIGS / "shakespeare_char.yaml")
    m, t = config.model, config.train
    assert (m.block_size, m.embedding_dim, m.num_heads, m.num_layers) == (256, 512, 8, 8)  # the seed's shape
    assert (t.batch_size, t.learning_rate, t.eval_interval, t.eval_iters) == (128, 3e-4, 250, 50)
    # what a GPU user should run: bf16, dropout against overfitting the 1 MB text
    assert (m.dropout, t.max_iters, t.mixed_precision) == (0.2, 2500, "bf16")
    assert (t.checkpoint_interval, t.out_dir, t.seed) == (250, "runs/shakespeare_char", 1337)
    assert config.data.val_fraction == 0.1


def test_overrides_apply_with_types():
    config = load_run_config(CONFIGS / "tiny.yaml", ["--train.learning_rate=1e-3", "--model.dropout=0.1",
                                                     "--train.mixed_precision=no", "--train.compile=true",
                                                     "--data.path=some.txt"])
    assert config.train.learning_rate == 1e-3 and config.model.dropout == 0.1
    assert config.train.mixed_precision == "no" and config.train.compile is True
    assert config.data.path == "some.txt"


def _error(data, overrides=None) -> str:
    with pytest.raises(ConfigError) as e:
        run_config_from_dict(data, parse_overrides(overrides or []))
    message = str(e.value)
    assert "\n" not in message
    return message


def test_unknown_key_is_named_with_a_suggestion():
    assert "unknown key train.learning_rte (did you mean train.learning_rate?)" in _error(
        {"train": {"learning_rte": 1e-3}})


def test_unknown_section():
    assert "unknown section 'modle' (did you mean model?)" in _error({"modle": {}})


def test_wrong_type():
    assert "model.num_layers='four' should be int" in _error({"model": {"num_layers": "four"}})
    assert "train.compile=1 should be bool" in _error({"train": {"compile": 1}})


def test_impossible_values_name_the_fix():
    message = _error({"model": {"embedding_dim": 100, "num_heads": 8, "block_size": 0}})
    assert "model.embedding_dim=100 is not divisible by model.num_heads=8" in message
    assert "model.block_size=0 must be >= 1" in message  # several problems in one report


def test_vocab_size_comes_from_the_tokenizer():
    assert "model.vocab_size comes from the tokenizer" in _error({"model": {"vocab_size": 65}})


def test_bad_override_form():
    with pytest.raises(ConfigError, match="--section.key=value"):
        parse_overrides(["--max_iters=3"])


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {block_size: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "missing.yaml")


def test_saved_model_config_needs_vocab():
    with pytest.raises(ConfigError, match="vocab_size"):
        model_config_from_dict({"block_size": 8, "embedding_dim": 16, "num_heads": 2, "num_layers": 1})
