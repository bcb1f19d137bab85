from pathlib import Path

import pytest
import yaml

from maskdistill.config import ConfigError, ExperimentConfig, apply_override, load_config

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))


def test_defaults_follow_the_paper() -> None:
    config = load_config()
    assert config.mining.top_k == 0.4  # Sec 4.1, Fig 4
    assert config.mining.short_side == 640
    assert config.pseudo_labels.tau == 0.9  # Sec 4.1
    assert config.segmenter.hard_pixel_fraction == 0.2  # Eq 4, Sec 4.1
    assert config.segmenter.epochs == 45 and config.segmenter.schedule.milestones == [40]
    assert config.detector.max_iters == 24_000  # A.1
    assert config.detector.schedule.milestones == [20_000, 22_000]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path) -> None:
    assert isinstance(load_config(path), ExperimentConfig)


def test_yaml_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("mining:\n  top_k: 0.3\ndata:\n  synthetic:\n    num_classes: 4\n")
    config = load_config(path, ["mining.top_k=0.25", "data.synthetic.image_size=[64, 96]"])
    assert config.mining.top_k == 0.25
    assert config.data.synthetic.num_classes == 4
    assert config.data.synthetic.image_size == (64, 96)
    assert config.mining.cls_heads is None
    assert load_config(None, ["mining.cls_heads=[0, 2]"]).mining.cls_heads == [0, 2]


def test_unknown_key_names_key_and_allowed_keys() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["mining.topk=0.3"])
    message = str(err.value)
    assert "mining.topk: unknown key" in message
    assert "did you mean 'top_k'" in message
    assert "seed_component" in message  # the allowed keys are listed


def test_unknown_top_level_section() -> None:
    with pytest.raises(ConfigError, match=r"minning: unknown key.*did you mean 'mining'"):
        load_config(None, ["minning.top_k=0.3"])


def test_wrong_type_names_key_and_value() -> None:
    with pytest.raises(ConfigError, match=r"mining.top_k = 'lots': Input should be a valid number"):
        load_config(None, ["mining.top_k=lots"])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("mining.top_k=1.5", r"mining.top_k = 1.5: .*allowed: > 0.0 and <= 1.0"),
        ("pseudo_labels.tau=1.0", r"pseudo_labels.tau = 1.0: .*allowed: >= 0.0 and < 1.0"),
        ("serve.port=70000", r"serve.port = 70000: .*<= 65535"),
        ("data.kind=vocc", r"data.kind = 'vocc': .*allowed: 'synthetic', 'folder', 'voc', 'coco'"),
        ("segmenter.output_stride=4", r"segmenter.output_stride = 4: .*allowed: 8, 16"),
        ("evaluation.mined_score=two", r"evaluation.mined_score = 'two': .*'attention', 'one'"),
        ("detector.train_splits=[]", r"detector.train_splits = \[\]: .*at least 1 item"),
    ],
)
def test_out_of_range_names_allowed_values(override: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [override])


def test_cross_field_rules() -> None:
    with pytest.raises(ConfigError, match="min_objects=5 must be <= max_objects=4"):
        load_config(None, ["data.synthetic.min_objects=5"])
    with pytest.raises(ConfigError, match="data.root is required for data.kind='voc'"):
        load_config(None, ["data.kind=voc"])


def test_every_error_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["mining.top_k=2", "serve.port=0", "bogus=1"])
    assert {"mining.top_k", "serve.port", "bogus"} <= {
        line.strip().split(" ")[0].rstrip(":") for line in str(err.value).splitlines()[1:]
    }


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found: .*missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml: top level must be a mapping"):
        load_config(bad)


def test_malformed_override() -> None:
    with pytest.raises(ConfigError, match="must look like key.path=value"):
        load_config(None, ["mining.top_k"])
    raw: dict = {"mining": 3}
    with pytest.raises(ConfigError, match="mining is not a section"):
        apply_override(raw, "mining.top_k=0.2")


def test_yaml_round_trip() -> None:
    config = load_config(None, ["mining.top_k=0.3"])
    again = ExperimentConfig.model_validate(yaml.safe_load(config.to_yaml()))
    assert again == config


def test_science_is_the_flat_values_without_resources() -> None:
    config = load_config(None, ["mining.top_k=0.3", "mining.resources.concurrency=8"])
    science = config.science("mining", "clustering.feature")
    assert science["mining.top_k"] == 0.3 and science["clustering.feature"] == "crop"
    assert science["mining.cls_heads"] is None and science["mining.shard_size"] == 1000
    assert not [key for key in science if "resources" in key]
    assert set(science) == {
        "mining.source",
        "mining.top_k",
        "mining.cls_heads",
        "mining.seed_component",
        "mining.short_side",
        "mining.shard_size",
        "mining.precision",
        "clustering.feature",
    }


def test_a_moved_resource_key_says_where_it_went() -> None:
    with pytest.raises(
        ConfigError,
        match=r"detector.num_workers: unknown key \(did you mean "
        r"'resources.num_workers'\?\)",
    ):
        load_config(None, ["detector.num_workers=2"])
    with pytest.raises(ConfigError, match="multiple of resources.num_workers=3"):
        load_config(None, ["detector.resources.num_workers=3"])
