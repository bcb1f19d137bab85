"""`maskdistill report RUN_DIR`: the run's Tables 1-3 beside the paper's values.

    maskdistill report runs/pascal          # prints the tables, writes runs/pascal/report.md

Reads `evaluate/metrics.json` (the run's values, one evaluation) and, when `maskdistill repeat`
has run, `repeats/summary.json` (mean ± std over seeds). Table 3's paper columns are PASCAL's
or COCO20k's by the run's `data.kind` (`coco`: COCO20k, anything else: PASCAL). A row the run
did not produce shows `-` (e.g. the +CRF rows without `self_training` / `evaluation.crf`, the
probe without `evaluation.linear_probe`). All values are percentages. Ray-free.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from maskdistill.config import ConfigError
from maskdistill.evaluate import (
    CRF,
    CRF_EVAL,
    DETECTOR,
    MASK_AP_SET,
    MINED,
    PROBE,
    PROBE_CRF,
    SEGMENTER,
    SELECTION,
    SELF_TRAINED,
)
from maskdistill.outputs import METRICS_FILE
from maskdistill.repeats import REPEATS, SEPARATOR, SUMMARY_JSON
from maskdistill.rundir import RunDir, check_run_dir

REPORT_FILE = "report.md"
SUMMARY_FILE = (REPEATS, SUMMARY_JSON)
PASCAL, COCO20K = "PASCAL", "COCO20k"
SINGLE_AGNOSTIC = "class-agnostic single"


@dataclass(frozen=True)
class PaperRow:
    """A row of one of the paper's tables, its values (%), and the run's row that answers it:
    a row name of metrics.json (its "miou") or, for Table 3, a "mask AP" entry (its AP50, AP
    and AP75)."""

    table: str
    label: str
    values: tuple[float | None, ...]
    run_row: str


# The paper's numbers (maskdistill-paper.txt), one row per line. Run rows: maskdistill.evaluate's
# names; in Table 3 MaskDistill is the initial masks ("mined ..."), MaskDistill† the Mask R-CNN
# candidates ("detector ..."). Table 2's +CRF comes from CRF iterations (S1): the self-trained
# segmenter with a CRF at evaluation, or, without self-training, the segmenter with the CRF.
PAPER = (
    PaperRow("Table 1", "Self-sup. vision transformer (Sec 3.2)", (39.0,), MINED),
    PaperRow("Table 1", "+ Mask R-CNN (Sec 3.2)", (42.0,), DETECTOR),
    PaperRow("Table 1", "+ Segmentation model (Sec 3.3)", (45.8,), SEGMENTER),
    PaperRow("Table 2a", "MaskDistill", (58.7,), PROBE),
    PaperRow("Table 2a", "MaskDistill+CRF", (62.8,), PROBE_CRF),
    PaperRow("Table 2b", "MaskDistill", (45.8,), SEGMENTER),
    PaperRow("Table 2b", "MaskDistill+CRF (self-training, CRF at evaluation)", (48.9,), CRF_EVAL),
    PaperRow("Table 2b", "MaskDistill+CRF (CRF at evaluation only)", (48.9,), CRF),
    PaperRow("Table 2b", "self-training, no CRF at evaluation", (None,), SELF_TRAINED),
    PaperRow("Table 3a", "MaskDistill", (12.8, 4.8, 0.3), "mined multi class-agnostic"),
    PaperRow("Table 3a", "MaskDistill†", (24.3, 9.9, 6.9), "detector multi class-agnostic"),
    PaperRow("Table 3b", "MaskDistill", (3.1, 1.3, 0.5), "mined multi class-agnostic"),
    PaperRow("Table 3b", "MaskDistill†", (6.8, 2.9, 2.1), "detector multi class-agnostic"),
    PaperRow("Table 3c", "MaskDistill", (24.0, 9.5, 6.4), "mined single semantic"),
    PaperRow("Table 3c", "MaskDistill†", (32.8, 14.7, 11.8), "detector single semantic"),
    PaperRow("Table 3d", "MaskDistill", (9.9, 4.1, 3.1), "mined single semantic"),
    PaperRow("Table 3d", "MaskDistill†", (14.6, 6.6, 5.5), "detector single semantic"),
    PaperRow("Table 3e", "MaskDistill", (15.7, 6.1, 4.0), "mined multi semantic"),
    PaperRow("Table 3e", "MaskDistill†", (24.8, 10.7, 8.0), "detector multi semantic"),
    PaperRow("Table 3f", "MaskDistill", (4.1, 1.7, 1.4), "mined multi semantic"),
    PaperRow("Table 3f", "MaskDistill†", (7.7, 3.5, 2.9), "detector multi semantic"),
    # the run's fourth setting, which the paper does not report
    PaperRow(SINGLE_AGNOSTIC, "MaskDistill", (None,) * 3, "mined single class-agnostic"),
    PaperRow(SINGLE_AGNOSTIC, "MaskDistill†", (None,) * 3, "detector single class-agnostic"),
)
TITLES = {
    "Table 1": "Table 1: component analysis, PASCAL val, clustering (mIoU %)",
    "Table 2a": "Table 2 (a): linear classifier, PASCAL val (mIoU %)",
    "Table 2b": "Table 2 (b): clustering, PASCAL val (mIoU %)",
    "Table 3a": "Table 3 (a): class-agnostic, multi, PASCAL (mask AP %)",
    "Table 3b": "Table 3 (b): class-agnostic, multi, COCO20k (mask AP %)",
    "Table 3c": "Table 3 (c): semantic, single, PASCAL (mask AP %)",
    "Table 3d": "Table 3 (d): semantic, single, COCO20k (mask AP %)",
    "Table 3e": "Table 3 (e): semantic, multi, PASCAL (mask AP %)",
    "Table 3f": "Table 3 (f): semantic, multi, COCO20k (mask AP %)",
    SINGLE_AGNOSTIC: "Class-agnostic, single (mask AP %; not in the paper)",
}
TABLES = {  # what the report prints per data set of Table 3
    PASCAL: (
        "Table 1",
        "Table 2a",
        "Table 2b",
        "Table 3a",
        "Table 3c",
        "Table 3e",
        SINGLE_AGNOSTIC,
    ),
    COCO20K: (
        "Table 1",
        "Table 2a",
        "Table 2b",
        "Table 3b",
        "Table 3d",
        "Table 3f",
        SINGLE_AGNOSTIC,
    ),
}
AP_NAMES = ("AP50", "AP", "AP75")


def table3_dataset(kind: str) -> str:
    """The paper's Table 3 columns that fit `data.kind`: COCO20k for coco, else PASCAL."""
    return COCO20K if kind == "coco" else PASCAL


def metric_paths(row: PaperRow) -> list[tuple[str, ...]]:
    """Where the run's values of `row` are in metrics.json, one path per value."""
    if row.table.startswith("Table 3") or row.table == SINGLE_AGNOSTIC:
        return [("mask AP", row.run_row, name) for name in AP_NAMES]
    return [(row.run_row, "miou")]


def lookup(tree: Any, path: Sequence[str]) -> Any:
    """`tree[path[0]][path[1]]...`, None where a key is missing."""
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def run_value(metrics: dict[str, Any], path: Sequence[str]) -> str:
    """The run's value in % (one decimal), '-' where it has none."""
    value = lookup(metrics, path)
    return "-" if value is None else f"{100 * float(value):.1f}"


def repeat_value(summary: dict[str, Any], path: Sequence[str]) -> str:
    """'mean ± std' in % over the seeds of `maskdistill repeat` (its summary's flattened
    metric names), the mean alone for one seed, '-' where no seed has the value."""
    leaf = summary.get("metrics", {}).get(SEPARATOR.join(path))
    if leaf is None:
        return "-"
    mean = f"{100 * float(leaf['mean']):.1f}"
    return mean if leaf.get("std") is None else f"{mean} ± {100 * float(leaf['std']):.1f}"


def render(table: str, metrics: dict[str, Any], summary: dict[str, Any] | None) -> str:
    """One of the paper's tables as markdown: per value the paper's, the run's and, with a
    repeats summary, its mean ± std."""
    rows = [row for row in PAPER if row.table == table]
    columns = AP_NAMES if len(rows[0].values) == 3 else ("mIoU",)
    kinds = ["paper", "run"] + (["repeats"] if summary is not None else [])
    head = ["row", "metrics.json"] + [f"{c} {k}" for c in columns for k in kinds]
    lines = [
        f"### {TITLES[table]}",
        "",
        _line(head),
        _line(["---"] * 2 + ["---:"] * (len(head) - 2)),
    ]
    for row in rows:
        cells = [row.label, row.run_row]
        for paper, path in zip(row.values, metric_paths(row), strict=True):
            cells += ["-" if paper is None else f"{paper:.1f}", run_value(metrics, path)]
            if summary is not None:
                cells.append(repeat_value(summary, path))
        lines.append(_line(cells))
    return "\n".join(lines)


def _line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def report(metrics: dict[str, Any], summary: dict[str, Any] | None, kind: str) -> str:
    """The paper's Tables 1, 2 and 3 (PASCAL's or COCO20k's by `kind`) beside the run's values."""
    tables = [render(table, metrics, summary) for table in TABLES[table3_dataset(kind)]]
    if MASK_AP_SET in metrics:
        where = metrics[MASK_AP_SET]
        tables.insert(0, f"mask AP on split {where['split']} ({where['images']} images)")
    if SELECTION in metrics:
        tables.insert(0, f"note: the segmenter's rows: {metrics[SELECTION]['note']}")
    if summary is not None:
        seeds = ", ".join(str(seed) for seed in summary.get("seeds", []))
        tables.insert(0, f"repeats: mean ± std (ddof=1) over seeds {seeds}")
    return "\n\n".join(tables) + "\n"


def write_report(run_dir: str) -> str:
    """Read the run's metrics (and repeats), write `report.md` into it; the markdown."""
    check_run_dir(run_dir)
    run = RunDir(run_dir)
    summary = run.read_json(*SUMMARY_FILE) if run.exists(*SUMMARY_FILE) else None
    if not run.exists(*METRICS_FILE) and summary is None:
        raise FileNotFoundError(
            f"{run.uri_of(*METRICS_FILE)}: the run has not been evaluated yet "
            "(`maskdistill pipeline` runs the evaluate stage)"
        )
    metrics = run.read_json(*METRICS_FILE) if run.exists(*METRICS_FILE) else {}
    kind = run.read_config().data.kind
    text = f"# {run.uri} beside the paper\n\n" + report(metrics, summary, kind)
    run.write_bytes(text.encode(), REPORT_FILE)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="maskdistill report",
        description="The run's Tables 1-3 beside the paper's values; writes RUN_DIR/report.md.",
    )
    parser.add_argument("run_dir", help="run directory (local path or URI)")
    args = parser.parse_args(argv)
    try:
        text = write_report(args.run_dir)
    except (FileNotFoundError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(text, end="")
    return 0
