"""A trained model, read from a run directory or from an export folder. Ray-free.

A run directory holds `<stage>/model.pt` (`maskdistill.outputs.read_weights`), `config.yaml`,
the user's `names.yaml` (`maskdistill.names`) and, once evaluated, `evaluate/class_names.json`
(names matched on ground truth, used without names.yaml); an export folder (`maskdistill export`,
`maskdistill.export`) holds `<stage>/model.safetensors`, `config.json` and `class_names.json`.
`read_model` reads either, so `predict`, `serve` and the library's loaders take both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from safetensors.torch import load as load_safetensors
from torch import Tensor

from maskdistill import storage
from maskdistill.config import ExperimentConfig, validate_config
from maskdistill.names import NamesError, class_map_of, identity, names_uri, read_document
from maskdistill.outputs import CLASS_NAMES_FILE, MODEL_FILE, final_segmenter, read_weights
from maskdistill.rundir import RunDir
from maskdistill.stages import DETECTOR, SEGMENTER

FORMAT = "maskdistill-export"
FORMAT_VERSION = "1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
NAMES_FILE = "class_names.json"
RUN_CONFIG = "config.yaml"
STAGES = (SEGMENTER, DETECTOR)


@dataclass(frozen=True)
class LoadedModel:
    """One trained stage: the run's config (the architecture), strict-loadable state dict,
    label count (background included) and one name per label."""

    config: ExperimentConfig
    state: dict[str, Tensor]
    num_classes: int
    class_names: list[str]


def default_class_names(num_classes: int) -> list[str]:
    """Label names before any matching: "background", "cluster 0", "cluster 1", ..."""
    return ["background", *(f"cluster {k}" for k in range(num_classes - 1))]


def is_export(source: str) -> bool:
    """Whether `source` (path or URI) is an export folder (it has config.json)."""
    return storage.is_file(join(source, CONFIG_FILE))


def model_file(source: str, stage: str) -> str:
    """Where the run directory or export folder `source` keeps its trained `stage` weights."""
    return join(source, stage, WEIGHTS_FILE if is_export(source) else MODEL_FILE)


def has_model(source: str, stage: str) -> bool:
    """Whether the run directory or export folder `source` holds trained `stage` weights."""
    return storage.is_file(model_file(source, stage))


def read_config(source: str) -> ExperimentConfig:
    """The config of an export folder (config.json) or a run directory (config.yaml);
    FileNotFoundError naming `source` when it is neither."""
    if is_export(source):
        uri = join(source, CONFIG_FILE)
        return validate_config(json.loads(storage.read_bytes(uri)), source=uri)
    if storage.is_file(join(source, RUN_CONFIG)):
        return RunDir(source).read_config()
    raise FileNotFoundError(
        f"{source}: neither an export folder ({CONFIG_FILE}) nor a run directory ({RUN_CONFIG})"
    )


def read_model(
    source: str, stage: str, *, config: ExperimentConfig | None = None, folder: str | None = None
) -> LoadedModel:
    """The trained `stage` (segmenter or detector) of an export folder or a run directory, with
    `config` (the architecture) when given, else the source's own. In a run directory the
    weights are `<folder>/model.pt`, by default `served_folder`'s.

    FileNotFoundError naming the file when that stage has no weights there, or naming `source`
    when it is neither. Never creates anything at `source`.
    """
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r}: expected one of {STAGES}")
    config = config or read_config(source)
    if is_export(source):
        return _read_export(source, stage, config)
    return _read_run(source, stage, config, folder or served_folder(source, stage, config))


def served_folder(source: str, stage: str, config: ExperimentConfig) -> str:
    """The folder of a run's `stage` weights that predict, serve and export use: for the
    segmenter the last CRF self-training round's once it is trained (stage refine, S1), else
    `<stage>/`."""
    if stage == SEGMENTER:
        final = final_segmenter(config)
        if final != SEGMENTER and storage.is_file(join(source, final, MODEL_FILE)):
            return final
    return stage


def _read_export(source: str, stage: str, config: ExperimentConfig) -> LoadedModel:
    """`<stage>/model.safetensors` and class_names.json of an export folder."""
    uri = join(source, stage, WEIGHTS_FILE)
    if not storage.is_file(uri):
        raise FileNotFoundError(f"{uri}: no trained {stage} in this export")
    data = storage.read_bytes(uri)
    metadata = safetensors_metadata(data)
    if metadata.get("stage") != stage:
        raise ValueError(f"{uri}: holds stage {metadata.get('stage')!r}, not {stage!r}")
    saved = json.loads(storage.read_bytes(join(source, NAMES_FILE)))
    names = saved.get("clusters", saved["names"]) if stage == DETECTOR else saved["names"]
    return LoadedModel(config, load_safetensors(data), int(metadata["num_classes"]), list(names))


def _read_run(source: str, stage: str, config: ExperimentConfig, folder: str) -> LoadedModel:
    """`<folder>/model.pt` and the names of its `stage` labels (`run_names`)."""
    weights = read_weights(RunDir(source), folder)
    num_classes = int(weights["num_classes"])
    trained = weights.get("cluster_labels")
    names = run_names(source, stage, num_classes, trained)
    return LoadedModel(config, weights["model"], num_classes, names)


def run_names(
    source: str, stage: str, num_classes: int, trained: list[int] | None = None
) -> list[str]:
    """One name per label of a run's trained `stage`: from names.yaml (the detector's labels
    are 1 + cluster, the segmenter's one per group), else the evaluation's matched names, else
    "cluster k". `trained`: the cluster -> label map the segmenter learnt (None: 1 + cluster);
    NamesError when names.yaml now merges or backgrounds clusters differently."""
    clusters = len(trained) if stage == SEGMENTER and trained is not None else num_classes - 1
    document = read_document(source)
    classes = class_map_of(document, clusters, source=names_uri(source))
    if stage == SEGMENTER and list(classes.labels) != (trained or list(identity(clusters).labels)):
        raise NamesError(
            f"{names_uri(source)} merges or backgrounds clusters differently from the "
            f"trained segmenter ({num_classes} labels): run `maskdistill pipeline --config "
            f"{join(source, RUN_CONFIG)}` to retrain it, or undo that edit"
        )
    if document is not None:
        return classes.cluster_names if stage == DETECTOR else classes.class_names
    run = RunDir(source)
    if run.exists(*CLASS_NAMES_FILE):
        names = list(run.read_json(*CLASS_NAMES_FILE)["names"])
        if len(names) == num_classes:
            return names
    return default_class_names(num_classes)


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The string metadata in a safetensors file's header (its `__metadata__`, {} if none)."""
    size = int.from_bytes(data[:8], "little")  # the format: u64 header length, JSON header
    header = json.loads(data[8 : 8 + size])
    metadata: dict[str, str] = header.get("__metadata__", {})
    return metadata


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])
