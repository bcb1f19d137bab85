"""`maskdistill export`: safetensors round trip, metadata, model card, TorchScript and ONNX parity
at sizes other than the export's, and the command's answers to bad input."""

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open

from maskdistill import cli, export
from maskdistill.export import ExportReport, export_run
from maskdistill.inference import build_model
from maskdistill.release import is_export, read_model, safetensors_metadata
from maskdistill.rundir import RunDir
from maskdistill.stages import DETECTOR, SEGMENTER
from tests.runs import NUM_CLASSES, write_run

NAMES = ["background", "disc", "ring", "cluster 2", "bar"]
METRICS = {
    "mined masks, clustered": {"miou": 0.39, "iou": [0.9, 0.2, None], "mapping": [0, 1, -1]},
    "+ DeepLab-v3": {"miou": 0.458, "iou": [0.9, 0.3, None], "mapping": [0, 1, -1]},
    "mask AP": {"+ Mask R-CNN multi class-agnostic": {"AP": 0.1, "AP50": 0.25, "AP75": 0.05}},
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An evaluated run with a segmenter and a detector."""
    run_dir = write_run(tmp_path_factory.mktemp("run"), detector=True)
    run = RunDir(str(run_dir))
    run.write_json({"names": NAMES}, "evaluate", "class_names.json")
    run.write_json(METRICS, "evaluate", "metrics.json")
    return run_dir


@pytest.fixture(scope="module")
def exported(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ExportReport:
    out = tmp_path_factory.mktemp("export") / "release"
    return export_run(str(run_dir), str(out), torchscript=True)


def _front_matter(card: str) -> dict[str, Any]:
    assert card.startswith("---\n")
    meta: dict[str, Any] = yaml.safe_load(card.split("---\n")[1])
    return meta


def _max_diff(got: Any, want: torch.Tensor) -> float:
    got = torch.as_tensor(np.asarray(got))
    assert tuple(got.shape) == tuple(want.shape)
    return float((got.double() - want.double()).abs().max()) if want.numel() else 0.0


def test_export_round_trip_gives_the_runs_weights_names_and_config(
    run_dir: Path, exported: ExportReport
) -> None:
    assert is_export(exported.out) and not is_export(str(run_dir))
    for stage in (SEGMENTER, DETECTOR):
        run, release = read_model(str(run_dir), stage), read_model(exported.out, stage)
        assert release.state.keys() == run.state.keys()
        assert all(torch.equal(release.state[k], v) for k, v in run.state.items())
        assert release.class_names == run.class_names == NAMES
        assert release.num_classes == run.num_classes == NUM_CLASSES
        assert release.config == run.config
        build_model(release, stage)  # strict load of the released state


def test_weights_carry_their_stage_arch_and_label_count(exported: ExportReport) -> None:
    path = Path(exported.out, SEGMENTER, "model.safetensors")
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    assert metadata == {
        "format": "maskdistill-export",
        "format_version": "1",
        "stage": SEGMENTER,
        "arch": "deeplabv3_resnet18_os8",
        "num_classes": str(NUM_CLASSES),
    }
    assert safetensors_metadata(path.read_bytes()) == metadata
    detector = safetensors_metadata(Path(exported.out, DETECTOR, "model.safetensors").read_bytes())
    assert (detector["stage"], detector["arch"]) == (DETECTOR, "maskrcnn_resnet18_fpn")


def test_model_card_front_matter_holds_the_evaluation(exported: ExportReport) -> None:
    card = Path(exported.out, "README.md").read_text()
    meta = _front_matter(card)
    assert (meta["library_name"], meta["pipeline_tag"], meta["license"]) == (
        "maskdistill",
        "image-segmentation",
        "apache-2.0",
    )
    (result,) = meta["model-index"][0]["results"]
    values = {m["name"]: (m["type"], m["value"]) for m in result["metrics"]}
    assert values["mIoU + DeepLab-v3"] == ("mean_iou", 45.8)
    assert values["mask AP50 + Mask R-CNN multi class-agnostic"] == ("mask_ap50", 25.0)
    assert result["dataset"]["split"] == "val"
    assert "| mIoU + DeepLab-v3 | 45.8 |" in card
    assert "Hungarian matching of clusters" in card
    assert "detector torchscript masks" in card  # the parity figures


def test_moco_init_makes_the_card_non_commercial(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "run", "segmenter.init=moco", "segmenter.init_path=/x/moco.pth")
    report = export_run(str(run_dir), str(tmp_path / "out"))
    card = Path(report.out, "README.md").read_text()
    meta = _front_matter(card)
    assert meta["license"] == "cc-by-nc-4.0"
    assert "model-index" not in meta and "not evaluated" in card
    assert report.files == [
        "segmenter/model.safetensors",
        "config.json",
        "class_names.json",
        "README.md",
    ]


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:RCNN always returns")
def test_torchscript_matches_the_eager_models_at_a_new_size(exported: ExportReport) -> None:
    assert exported.parity and max(exported.parity.values()) <= export.TOLERANCE
    segmenter = build_model(read_model(exported.out, SEGMENTER), SEGMENTER)
    scripted = torch.jit.load(str(Path(exported.out, SEGMENTER, "model.torchscript.pt")))
    image = torch.randn(2, 3, 40, 88)
    with torch.no_grad():
        assert _max_diff(scripted(image), segmenter(image)["out"]) <= 1e-4
    detector = build_model(read_model(exported.out, DETECTOR), DETECTOR)
    scripted = torch.jit.load(str(Path(exported.out, DETECTOR, "model.torchscript.pt")))
    image = torch.rand(3, 56, 90)
    with torch.no_grad():
        want, got = detector([image])[0], scripted([image])[1][0]
    assert want["masks"].shape[-2:] == (56, 90)
    assert all(_max_diff(got[k], want[k]) <= 1e-4 for k in ("scores", "labels"))
    assert _max_diff(got["masks"], want["masks"]) <= export.MASK_TOLERANCE
    assert _max_diff(got["boxes"], want["boxes"]) <= 1e-4 * 90  # the image's longer side


@pytest.mark.slow
def test_onnx_matches_the_eager_models_at_a_new_size(run_dir: Path, tmp_path: Path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    report = export_run(str(run_dir), str(tmp_path / "out"), onnx=True)
    assert {"segmenter onnx logits", "detector onnx masks"} <= report.parity.keys()
    segmenter = build_model(read_model(report.out, SEGMENTER), SEGMENTER)
    session = onnxruntime.InferenceSession(str(tmp_path / "out" / SEGMENTER / "model.onnx"))
    image = torch.randn(2, 3, 40, 88)
    (logits,) = session.run(["logits"], {"image": image.numpy()})
    with torch.no_grad():
        assert _max_diff(logits, segmenter(image)["out"]) <= 1e-4
    detector = build_model(read_model(report.out, DETECTOR), DETECTOR)
    session = onnxruntime.InferenceSession(str(tmp_path / "out" / DETECTOR / "model.onnx"))
    image = torch.rand(3, 56, 90)
    got = dict(zip(export.DETECTIONS, session.run(None, {"image": image.numpy()}), strict=True))
    with torch.no_grad():
        want = detector([image])[0]
    assert want["masks"].shape[-2:] == (56, 90)
    assert all(_max_diff(got[k], want[k]) <= 1e-4 for k in ("scores", "labels"))
    assert _max_diff(got["masks"], want["masks"]) <= export.MASK_TOLERANCE
    assert _max_diff(got["boxes"], want["boxes"]) <= 1e-4 * 90  # the image's longer side


def test_read_model_names_what_is_missing_and_reads_uris(tmp_path: Path) -> None:
    nowhere = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="neither an export folder"):
        read_model(str(nowhere), SEGMENTER)
    assert not nowhere.exists()
    out = (tmp_path / "out").as_uri()
    export_run(str(write_run(tmp_path / "run")), out)
    assert is_export(out) and read_model(out, SEGMENTER).num_classes == NUM_CLASSES
    with pytest.raises(FileNotFoundError, match="detector/model.safetensors"):
        read_model(out, DETECTOR)


def test_cli_refuses_bad_input_with_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = str(tmp_path / "out")
    assert cli.main(["export", str(tmp_path / "nothing"), out]) == 2
    assert "not a run directory" in capsys.readouterr().err
    run_dir = write_run(tmp_path / "run")
    (run_dir / "segmenter" / "model.pt").unlink()
    assert cli.main(["export", str(run_dir), out]) == 2
    assert "no trained segmenter" in capsys.readouterr().err
    assert cli.main(["export", str(write_run(run_dir)), str(run_dir), "--overwrite"]) == 2
    assert "a run directory" in capsys.readouterr().err
    monkeypatch.setattr(export, "ONNX_PACKAGES", ("no_such_onnx_package",))
    assert cli.main(["export", str(run_dir), out, "--onnx"]) == 2
    assert "pip install 'maskdistill[export]'" in capsys.readouterr().err
    assert not Path(out).exists()


def test_cli_overwrite_replaces_only_the_exports_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, out = str(write_run(tmp_path / "run")), tmp_path / "out"
    assert cli.main(["export", run_dir, str(out)]) == 0
    printed = capsys.readouterr().out
    assert "segmenter/model.safetensors" in printed and "README.md" in printed
    (out / "segmenter" / "model.onnx").write_bytes(b"from an earlier export")
    (out / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    assert cli.main(["export", run_dir, str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert cli.main(["export", run_dir, str(out), "--overwrite"]) == 0
    assert not (out / "segmenter" / "model.onnx").exists()
    assert (out / ".gitattributes").exists() and (out / "README.md").exists()


def test_cli_fails_with_exit_code_1_when_parity_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export, "TOLERANCE", -1.0)
    out = tmp_path / "out"
    assert cli.main(["export", str(write_run(tmp_path / "run")), str(out), "--torchscript"]) == 1
    assert "segmenter torchscript logits: max abs diff" in capsys.readouterr().err
    assert not (out / SEGMENTER / "model.torchscript.pt").exists()


def test_an_export_carries_the_names_of_names_yaml_for_each_model(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "run", detector=True)  # 4 clusters, not evaluated
    (run_dir / "names.yaml").write_text('clusters:\n  1: "ring"\n')
    report = export_run(str(run_dir), str(tmp_path / "release"))
    want = ["background", "cluster 0", "ring", "cluster 2", "cluster 3"]
    for stage in (SEGMENTER, DETECTOR):
        assert read_model(report.out, stage).class_names == want
    card = (tmp_path / "release" / "README.md").read_text()
    assert "names.yaml" in card
    (run_dir / "names.yaml").write_text('clusters:\n  1: "ring"\n  3: 1\n')
    with pytest.raises(ValueError, match="differently from the trained segmenter"):
        export_run(str(run_dir), str(tmp_path / "again"))
