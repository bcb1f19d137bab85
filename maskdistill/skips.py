"""A stage's skipped inputs (unreadable images) at any scale: the manifest keeps the count per
reason and a few examples of each, the full list of (image_id, reason) goes to a Parquet file
beside it (`<stage>/skipped.parquet`), spilled to a local temporary file while the stage runs,
so neither the driver's memory nor the manifest grows with the number of skips."""

from __future__ import annotations

import io
import tempfile
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from maskdistill import storage

SKIPPED_FILE = "skipped.parquet"
SKIPPED_SCHEMA = pa.schema([("image_id", pa.string()), ("reason", pa.string())])
SAMPLE_PER_REASON = 5  # examples per reason in the manifest: enough to find the broken files
MAX_REASONS = 20  # reasons counted apart; more go under OTHER, so the manifest stays small
OTHER = "other reasons"
SPILL_ROWS = 4096  # entries held in memory before they go to the temporary file
COPY_BYTES = 1 << 20  # the spill goes to the run directory in pieces of this size


def reason_kind(reason: str) -> str:
    """The reason without its file-specific details (after the first colon): the counts' key."""
    return reason.split(":")[0]


class StageSkips:
    """Skipped inputs in the order they were added: `total`, `counts` per reason kind, `sample`
    (the first SAMPLE_PER_REASON of each kind) and, for the entries added in this process, a
    spill that `write` turns into the stage's Parquet file. `len()` is the total."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.sample: list[dict[str, str]] = []
        self._pending: list[dict[str, str]] = []
        self._spill: IO[bytes] | None = None
        self._writer: pq.ParquetWriter | None = None

    def __len__(self) -> int:
        return self.total

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __repr__(self) -> str:
        return f"StageSkips(total={self.total}, counts={self.counts})"

    def __eq__(self, other: object) -> bool:
        """Equal records (a manifest read back equals the one written)."""
        return isinstance(other, StageSkips) and self.summary() == other.summary()

    __hash__ = None  # type: ignore[assignment]

    def add(self, image_id: str, reason: str) -> None:
        self._note(image_id, reason)
        self._pending.append({"image_id": image_id, "reason": reason})
        if len(self._pending) >= SPILL_ROWS:
            self._flush()

    def _note(self, image_id: str, reason: str) -> None:
        kind = reason_kind(reason)
        if kind not in self.counts and len(self.counts) >= MAX_REASONS:
            kind = OTHER
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if self.counts[kind] <= SAMPLE_PER_REASON:
            self.sample.append({"image_id": image_id, "reason": reason})

    def _flush(self) -> None:
        if self._writer is None:
            # lives until `write` closes it (or is collected): deleted then, never left behind
            self._spill = tempfile.TemporaryFile()  # noqa: SIM115
            self._writer = pq.ParquetWriter(self._spill, SKIPPED_SCHEMA)
        self._writer.write_table(pa.Table.from_pylist(self._pending, schema=SKIPPED_SCHEMA))
        self._pending.clear()

    def write(self, uri: str) -> bool:
        """Write the entries added in this process to the Parquet file `uri` (atomically, copied
        from the spill in chunks); False, writing nothing, when there are none (nothing skipped,
        or a log read from a manifest, whose entries are in its file already)."""
        if self._writer is None and not self._pending:
            return False
        if self._pending:
            self._flush()
        assert self._writer is not None and self._spill is not None
        self._writer.close()
        self._spill.seek(0)
        with storage.atomic_output(uri) as out:
            while chunk := self._spill.read(COPY_BYTES):
                out.write(chunk)
        self._spill.close()
        self._writer = self._spill = None
        return True

    def summary(self) -> dict[str, Any]:
        """What the manifest keeps: a size bounded by MAX_REASONS and SAMPLE_PER_REASON."""
        return {
            "total": self.total,
            "counts": self.counts,
            "sample": self.sample,
            "file": SKIPPED_FILE if self.total else None,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any] | list[dict[str, str]]) -> StageSkips:
        """The log of a manifest's `skipped` record: its summary, or the whole list of entries
        that manifests kept before skipped.parquet (counted and sampled here)."""
        log = cls()
        if isinstance(record, list):
            for entry in record:
                log._note(entry["image_id"], entry["reason"])
            return log
        log.counts, log.sample = record["counts"], record["sample"]  # the total: their sum
        return log


def read_skipped_file(uri: str) -> list[dict[str, str]]:
    """Every entry of a skipped.parquet file, in the order the stage skipped them."""
    return pq.read_table(io.BytesIO(storage.read_bytes(uri)), schema=SKIPPED_SCHEMA).to_pylist()
