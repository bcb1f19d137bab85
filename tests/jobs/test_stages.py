import argparse

import pytest

from jobs import pipeline
from maskdistill.config import load_config


def _args(**flags: str | None) -> argparse.Namespace:
    return argparse.Namespace(only=flags.get("only"), start=flags.get("start"), force=False)


def test_pretrain_runs_only_for_the_runs_own_backbone() -> None:
    random = load_config(None, ["backbone.weights=random"])
    own = load_config(None, ["backbone.weights=pretrain"])
    assert "pretrain" not in pipeline.needed(random)
    assert pipeline.needed(own)[:3] == ["data", "pretrain", "mine"]
    assert pipeline.needed(own)[-1] == "evaluate"


def test_from_and_only_select_stages_in_order() -> None:
    config = load_config(None, [])
    assert pipeline.selected(config, _args(start="segmenter")) == ["segmenter", "evaluate"]
    assert pipeline.selected(config, _args(only="cluster")) == ["cluster"]
    assert pipeline.selected(config, _args()) == pipeline.needed(config)
    with pytest.raises(SystemExit, match="'pretrain' is off"):
        pipeline.selected(config, _args(only="pretrain"))
