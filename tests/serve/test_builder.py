"""Settings, the application builder, serve/config.yaml and `maskdistill serve`, without Ray."""

import importlib
from pathlib import Path

import pytest
import ray
import yaml
from ray.serve.schema import ServeDeploySchema

from maskdistill.cli import main as cli_main
from maskdistill.config import ConfigError
from maskdistill.export import export_run
from serve import app
from tests.runs import write_run

CONFIG_YAML = Path(app.__file__).with_name("config.yaml")


def test_run_settings_with_overrides(trained_run: Path) -> None:
    uri, config = app.serve_config(str(trained_run), {"max_pixels": 123, "num_gpus": 0.5})
    assert uri == str(trained_run)
    assert (config.max_batch_size, config.max_replicas) == (4, 1)  # the run's config.yaml
    assert (config.max_pixels, config.num_gpus) == (123, 0.5)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (
            {"max_batch_sise": 2},
            "serve.max_batch_sise: unknown key (did you mean 'max_batch_size'?)",
        ),
        ({"max_batch_size": 0}, "serve.max_batch_size = 0"),
        ({"min_replicas": 3}, "min_replicas=3 must be <= max_replicas=1"),
    ],
)
def test_bad_settings_name_the_key(
    trained_run: Path, overrides: dict[str, object], fragment: str
) -> None:
    with pytest.raises(ConfigError, match="with serve overrides") as caught:
        app.serve_config(str(trained_run), overrides)
    assert fragment in str(caught.value)


def test_an_export_folder_is_served_like_its_run(trained_run: Path, tmp_path: Path) -> None:
    exported = export_run(str(trained_run), str(tmp_path / "export")).out
    uri, config = app.serve_config(exported, {"max_pixels": 123})
    assert uri == exported and (config.max_batch_size, config.max_pixels) == (4, 123)
    (tmp_path / "export" / "segmenter" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors: no trained segmenter"):
        app.serve_config(exported)


def test_missing_run_or_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        app.serve_config(str(tmp_path / "nowhere"))
    assert not (tmp_path / "nowhere").exists()
    run = write_run(tmp_path / "run")
    (run / "segmenter" / "model.pt").unlink()
    with pytest.raises(FileNotFoundError, match="segmenter/model.pt: no trained segmenter"):
        app.serve_config(str(run))


def test_builder_sets_replicas_gpus_and_batching(trained_run: Path) -> None:
    application = app.app_builder(
        {"run_dir": str(trained_run), "min_replicas": 0, "max_replicas": 3, "num_gpus": 1}
    )
    deployment = application._bound_deployment
    scaling = deployment._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.initial_replicas, scaling.max_replicas) == (0, 1, 3)
    assert scaling.target_ongoing_requests == 4  # the run's max_batch_size
    assert deployment.max_ongoing_requests == 8
    assert deployment.ray_actor_options["num_gpus"] == 1
    run_dir, settings = deployment.init_args
    assert run_dir == str(trained_run) and settings["max_batch_size"] == 4
    with pytest.raises(ConfigError, match="args.run_dir"):
        app.app_builder({"max_batch_size": 2})


def test_deploy_config_is_valid_and_imports_the_builder() -> None:
    raw = yaml.safe_load(CONFIG_YAML.read_text())
    schema = ServeDeploySchema.model_validate(raw)
    (application,) = schema.applications
    module, attribute = application.import_path.split(":")
    assert getattr(importlib.import_module(module), attribute) is app.app_builder
    assert application.route_prefix == "/" and "run_dir" in application.args


def test_bearer_token_fails_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    assert app.bearer_token(None) is None
    monkeypatch.setenv("SERVE_TEST_TOKEN", "abc")
    assert app.bearer_token("SERVE_TEST_TOKEN") == "abc"
    monkeypatch.setenv("SERVE_TEST_TOKEN", "")
    with pytest.raises(ConfigError, match="SERVE_TEST_TOKEN"):
        app.bearer_token("SERVE_TEST_TOKEN")


def test_cli_refuses_bad_runs_before_starting_ray(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["serve", str(tmp_path / "nowhere")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    assert cli_main(["serve", str(trained_run), "--set", "max_batch_size=0"]) == 2
    assert "serve.max_batch_size = 0" in capsys.readouterr().err
    assert cli_main(["serve", str(trained_run), "--port", "70000"]) == 2
    assert "serve.port = 70000" in capsys.readouterr().err
    assert not ray.is_initialized()
