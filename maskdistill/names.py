"""What the pseudo classes are called: `names.yaml` in the run directory. Ray-free.

    clusters:
      0: "dog"
      1: "cat"
      2: "background"   # its pixels train as background
      3: 1              # merged into cluster 1: one class with it

Keys are the 0-based clusters of `cluster/<split>.parquet` and the gallery. A cluster left out
keeps its own class, named "cluster k". Names only change what `predict`, the service, exports
and pictures call a class, so editing them retrains nothing. Merges and background change the
segmenter's labels (Sec 3.3: one class per group of clusters, background pixels as label 0):
they enter the segmenter stage's hash (`grouping`), so `maskdistill pipeline` retrains the
segmenter from the stored pseudo labels; mining, clustering and the detector are reused.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import yaml

from maskdistill import storage
from maskdistill.data.base import IGNORE_INDEX

NAMES_YAML = "names.yaml"
BACKGROUND = "background"


class NamesError(ValueError):
    """A names.yaml that cannot be read as a class map; the message names file, key and value."""


@dataclass(frozen=True)
class ClassMap:
    """How K clusters become the segmenter's labels, and what each is called.

    `labels[k]`: the segmenter label of cluster k (0 background, 1.. one per group of merged
    clusters, in the order of each group's lowest cluster); `names[k]`: the name of its class
    ("background" for background clusters).
    """

    labels: tuple[int, ...]
    names: tuple[str, ...]

    @property
    def num_clusters(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        """The segmenter's outputs: background plus one per group."""
        return 1 + max(self.labels, default=0)

    @property
    def class_names(self) -> list[str]:
        """One name per segmenter label, "background" first."""
        names = [BACKGROUND] * self.num_classes
        for label, name in zip(self.labels, self.names, strict=True):
            if label:
                names[label] = name
        return names

    @property
    def cluster_names(self) -> list[str]:
        """One name per detector label (1 + cluster), "background" first."""
        return [BACKGROUND, *self.names]

    @property
    def is_identity(self) -> bool:
        """No merge and no background cluster: segmenter label = 1 + cluster."""
        return self.labels == tuple(range(1, self.num_clusters + 1))

    def lookup(self) -> np.ndarray:
        """uint8 [256]: pseudo-label value (0 background, 1 + cluster) -> segmenter label.

        IGNORE_INDEX stays ignored, and so does any value past the clusters.
        """
        table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
        table[0] = 0
        table[1 : 1 + self.num_clusters] = self.labels
        return table

    def groups(self) -> list[list[int]]:
        """The clusters of each segmenter label 1.., in label order."""
        groups: list[list[int]] = [[] for _ in range(self.num_classes - 1)]
        for cluster, label in enumerate(self.labels):
            if label:
                groups[label - 1].append(cluster)
        return groups


def identity(num_clusters: int) -> ClassMap:
    """Every cluster its own class, named "cluster k": a run without names.yaml."""
    return ClassMap(
        tuple(range(1, num_clusters + 1)), tuple(f"cluster {k}" for k in range(num_clusters))
    )


def parse_names(document: Any, num_clusters: int, *, source: str = NAMES_YAML) -> ClassMap:
    """The class map of a names.yaml document for a run with `num_clusters` clusters.

    NamesError naming `source`, the cluster and the value for an unknown cluster, a value that
    is not a name, "background" or a cluster number, a merge cycle, or no class left.
    """
    entries = _entries(document, source)
    for cluster in entries:
        if cluster >= num_clusters:
            raise NamesError(
                f"{source}: cluster {cluster}: no such cluster (this run has {num_clusters}: "
                f"0-{num_clusters - 1})"
            )
    roots = {k: _root(k, entries, source) for k in range(num_clusters)}
    for cluster, target in entries.items():
        if isinstance(target, int) and target >= num_clusters:
            raise NamesError(
                f"{source}: cluster {cluster}: merges into {target}, which is no cluster "
                f"(this run has {num_clusters}: 0-{num_clusters - 1})"
            )
    kept = sorted({root for root in roots.values() if root is not None})
    if not kept:
        raise NamesError(f"{source}: every cluster is background: no class left to train")
    label_of = {root: i + 1 for i, root in enumerate(kept)}
    labels, names = [], []
    for cluster in range(num_clusters):
        root = roots[cluster]
        labels.append(0 if root is None else label_of[root])
        names.append(BACKGROUND if root is None else _name_of(root, entries))
    return ClassMap(tuple(labels), tuple(names))


def grouping(document: Any, *, source: str = NAMES_YAML) -> dict[str, Any]:
    """What of a names.yaml decides the segmenter's labels: its background clusters and its
    groups of merged clusters ({} when it only names). Needs no cluster count, so a stage's
    hash can take it before the cluster stage ran."""
    entries = _entries(document, source)
    members = {*entries, *(t for t in entries.values() if isinstance(t, int))}
    roots = {k: _root(k, entries, source) for k in members}
    background = sorted(k for k, root in roots.items() if root is None)
    merged: dict[int, list[int]] = {}
    for cluster, root in sorted(roots.items()):
        if root is not None:
            merged.setdefault(root, []).append(cluster)
    groups = [group for group in merged.values() if len(group) > 1]
    found: dict[str, Any] = {}
    if background:
        found["background"] = background
    if groups:
        found["merged"] = groups
    return found


def _entries(document: Any, source: str) -> dict[int, str | int | None]:
    """Cluster -> a name, a cluster number (merge) or None (background), checked."""
    if document is None:
        return {}
    clusters = document.get("clusters") if isinstance(document, Mapping) else None
    if not isinstance(document, Mapping) or not isinstance(clusters, Mapping | None):
        raise NamesError(f"{source}: expected a mapping `clusters:` of cluster number to name")
    unknown = sorted(set(document) - {"clusters"})
    if unknown:
        raise NamesError(f"{source}: unknown key {unknown[0]!r}; expected only 'clusters'")
    entries: dict[int, str | int | None] = {}
    for key, value in (clusters or {}).items():
        if isinstance(key, bool) or not isinstance(key, int) or key < 0:
            raise NamesError(f"{source}: key {key!r}: expected a cluster number (0, 1, ...)")
        entries[key] = _target(key, value, source)
    return entries


def _target(cluster: int, value: Any, source: str) -> str | int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value.strip():
        return None if value.strip().lower() == BACKGROUND else value.strip()
    raise NamesError(
        f"{source}: cluster {cluster}: {value!r} is not a name, 'background' or the number of "
        "the cluster to merge into"
    )


def _root(cluster: int, entries: Mapping[int, str | int | None], source: str) -> int | None:
    """The cluster whose class `cluster` belongs to after following merges; None: background."""
    seen = [cluster]
    while True:
        target = entries.get(seen[-1], "")
        if target is None:
            return None
        if not isinstance(target, int) or target == seen[-1]:
            return seen[-1]
        if target in seen:
            cycle = " -> ".join(str(k) for k in [*seen[seen.index(target) :], target])
            raise NamesError(f"{source}: clusters merge in a cycle: {cycle}")
        seen.append(target)


def _name_of(root: int, entries: Mapping[int, str | int | None]) -> str:
    name = entries.get(root)
    return name if isinstance(name, str) else f"cluster {root}"


def names_uri(run_dir: str) -> str:
    return f"{run_dir.rstrip('/')}/{NAMES_YAML}"


def read_document(run_dir: str) -> Any:
    """The parsed names.yaml of a run (None when it has none); NamesError for bad YAML."""
    uri = names_uri(run_dir)
    if not storage.is_file(uri):
        return None
    try:
        return yaml.safe_load(storage.read_bytes(uri))
    except yaml.YAMLError as err:
        raise NamesError(f"{uri}: not valid YAML: {err}") from None


def class_map_of(document: Any, num_clusters: int, *, source: str = NAMES_YAML) -> ClassMap:
    """`parse_names` of a names.yaml document, every cluster its own class for None."""
    if document is None:
        return identity(num_clusters)
    return parse_names(document, num_clusters, source=source)


def read_class_map(run_dir: str, num_clusters: int) -> ClassMap:
    """The run's class map: its names.yaml, else every cluster its own class."""
    return class_map_of(read_document(run_dir), num_clusters, source=names_uri(run_dir))


def run_grouping(run_dir: str) -> dict[str, Any]:
    """`grouping` of the run's names.yaml ({} without one)."""
    return grouping(read_document(run_dir), source=names_uri(run_dir))


def initial_names(
    sizes: Sequence[int], matched: Sequence[str | None] | None = None, *, how: str = ""
) -> str:
    """The text of a first names.yaml: each cluster its matched class name (`matched[k]`, from
    ground truth) or "cluster k", with its size as a comment and how to edit it on top."""
    total = max(1, sum(sizes))
    lines = [
        "# What each pseudo class (cluster) of this run is called. Look at the gallery",
        "# (cluster/gallery/index.html), then write for each cluster one of:",
        '#   a name               3: "dog"',
        '#   background           3: "background"   (its pixels train as background)',
        "#   another cluster      3: 5              (merged into cluster 5: one class)",
        "# Names alone retrain nothing: predict, serve and export read them when they load.",
        "# Merges and background change the segmenter's labels: `maskdistill pipeline` then",
        "# retrains the segmenter from the stored pseudo labels (nothing is mined again).",
    ]
    if how:
        lines.append(f"# Initial names: {how}.")
    lines.append("clusters:")
    for cluster, size in enumerate(sizes):
        name = matched[cluster] if matched and matched[cluster] else f"cluster {cluster}"
        lines.append(f"  {cluster}: {json.dumps(name)}  # {size} masks, {100 * size / total:.1f}%")
    return "\n".join(lines) + "\n"
