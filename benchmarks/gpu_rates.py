"""Gather the rows of benchmarks/gpu.sh's outputs into one rates.json for pipeline_time.py.

    python benchmarks/gpu_rates.py OUT_DIR          # writes OUT_DIR/rates.json, prints it

Reads OUT_DIR/<name>.txt of each benchmark (rows `<row> <images/s>`) and OUT_DIR/gpu.txt (the
device). `rows` keeps every row of every file; `rates` holds the per-stage rates that
pipeline_time.py projects with, each from the row that is the stage as users run it:
`stage` (else `+data`) of the training benchmarks, `e2e-ray` (else `e2e-plain`, `e2e`) of
mining.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROW = re.compile(r"^(\S+)\s+(\d+(?:\.\d+)?)\s*$")
# rate name in pipeline_time.py <- (output file, rows to try, first present wins)
SOURCES = {
    "segmenter_train/fp32": ("segmenter_fp32", ("stage", "+data")),
    "segmenter_train/bf16": ("segmenter_bf16", ("stage", "+data")),
    "detector_train/fp32": ("detector_fp32", ("stage", "+data")),
    "detector_train/bf16": ("detector_bf16", ("stage", "+data")),
    "mine": ("mine_bf16", ("e2e-ray", "e2e-plain", "e2e")),
}


def rows_of(text: str) -> dict[str, float]:
    """`<row> <number>` lines of a benchmark's output (headers and notes are skipped)."""
    return {m.group(1): float(m.group(2)) for m in map(ROW.match, text.splitlines()) if m}


def collect(out: Path) -> dict[str, object]:
    rows = {path.stem: rows_of(path.read_text()) for path in sorted(out.glob("*.txt"))}
    rows = {name: found for name, found in rows.items() if found}
    rates = {}
    for rate, (name, choices) in SOURCES.items():
        found = rows.get(name, {})
        row = next((c for c in choices if c in found), None)
        if row is not None:
            rates[rate] = {"value": found[row], "source": f"{name}.txt row {row}"}
    gpu = out / "gpu.txt"
    device = gpu.read_text().strip().splitlines()[0] if gpu.exists() else "unknown device"
    return {"device": device, "rates": rates, "rows": rows}


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    out = Path(sys.argv[1])
    text = json.dumps(collect(out), indent=1)
    (out / "rates.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
