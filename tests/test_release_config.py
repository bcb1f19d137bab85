"""configs/pascal_release.yaml: loads, and differs from configs/pascal.yaml in exactly the rows of
docs/differences.md whose last two columns differ; every keyed row matches the configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from maskdistill.config import ExperimentConfig, load_config, validate_config
from maskdistill.stages import stage_hashes

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "docs" / "differences.md"
COLUMNS = ("key", "default", "pascal.yaml", "pascal_release.yaml")
IDENTITY = {"name", "run_dir"}  # what every config names differently


def table_rows() -> dict[str, dict[str, Any]]:
    """Config key -> {column: YAML value} of each keyed row of the table."""
    lines = [line for line in TABLE.read_text().splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows: dict[str, dict[str, Any]] = {}
    for line in lines[2:]:
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
        if cells["key"] == "-":
            continue
        values = {name: yaml.safe_load(cells[name].strip("`")) for name in COLUMNS[1:]}
        rows[cells["key"].strip("`")] = values
    return rows


def leaves(config: ExperimentConfig) -> dict[str, Any]:
    """Dotted key -> value of every leaf of the config (a null section is one leaf)."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for name, child in node.items():
                walk(child, f"{prefix}.{name}" if prefix else name)
        else:
            out[prefix] = node

    walk(config.model_dump(mode="json"), "")
    return out


def value_at(config: ExperimentConfig, key: str) -> Any:
    node: Any = config.model_dump(mode="json")
    for part in key.split("."):
        node = node[part]
    return node


@pytest.fixture(scope="module")
def configs() -> dict[str, ExperimentConfig]:
    return {
        "default": ExperimentConfig(),
        "pascal.yaml": load_config(ROOT / "configs" / "pascal.yaml"),
        "pascal_release.yaml": load_config(ROOT / "configs" / "pascal_release.yaml"),
    }


def test_every_keyed_row_matches_the_default_and_both_configs(
    configs: dict[str, ExperimentConfig],
) -> None:
    rows = table_rows()
    assert len(rows) >= 15
    for key, values in rows.items():
        for column, expected in values.items():
            assert value_at(configs[column], key) == expected, f"{key} in {column}"


def test_the_configs_differ_in_exactly_the_documented_rows(
    configs: dict[str, ExperimentConfig],
) -> None:
    paper, release = leaves(configs["pascal.yaml"]), leaves(configs["pascal_release.yaml"])
    differing = {
        key for key in paper.keys() | release.keys() if paper.get(key) != release.get(key)
    } - IDENTITY
    documented = {
        key for key, v in table_rows().items() if v["pascal.yaml"] != v["pascal_release.yaml"]
    }
    # a whole section set in one config (clustering.backbone) differs leaf by leaf
    covered = {
        next((d for d in documented if k == d or k.startswith(d + ".")), k) for k in differing
    }
    assert covered == documented
    assert documented == {
        "mining.cls_heads",
        "clustering.backbone",
        "clustering.crop",
        "clustering.whiten",
        "detector.train_batch_norm",
        "segmenter.frozen_stages",
        "segmenter.augment",
        "segmenter.select",
    }


def test_old_whiten_booleans_still_load() -> None:
    assert validate_config({"clustering": {"whiten": True}}).clustering.whiten == "pca"
    assert validate_config({"clustering": {"whiten": False}}).clustering.whiten == "none"
    assert validate_config({"clustering": {"whiten": "std"}}).clustering.whiten == "std"


def test_release_switches_reach_the_stages_that_use_them(
    configs: dict[str, ExperimentConfig],
) -> None:
    paper, release = configs["pascal.yaml"], configs["pascal_release.yaml"]
    same_run = release.model_copy(update={"name": paper.name, "run_dir": paper.run_dir})
    before, after = stage_hashes(paper), stage_hashes(same_run)
    # the clustering ViT, crop and heads change the mine stage, and so every later one
    assert all(before[s] != after[s] for s in after if s not in ("data", "pretrain"))
    assert before["data"] == after["data"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"clustering": {"crop": "full"}}, "clustering.crop = 'full'"),
        ({"segmenter": {"augment": "crop"}}, "'scale_rotate_crop', 'fixed_resize'"),
        ({"segmenter": {"select": "best"}}, "'last', 'best_on_val'"),
        ({"segmenter": {"frozen_stages": 6}}, "segmenter.frozen_stages = 6"),
        ({"detector": {"arch": "maskrcnn_resnet101_c4"}}, "'maskrcnn_resnet50_c4'"),
        (
            {"clustering": {"backbone": {"arch": "vit_small_patch8_224", "weights": "pretrain"}}},
            "clustering.backbone.weights='pretrain' is not supported",
        ),
    ],
)
def test_bad_release_switches_name_the_key_and_what_it_allows(
    override: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=None) as err:
        validate_config(override)
    assert message in str(err.value)
