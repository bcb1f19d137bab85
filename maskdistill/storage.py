"""Local paths and URIs (s3://, gs://, file://, ...) resolved to pyarrow filesystems."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow as pa
import pyarrow.fs as pafs

WRITE_BUFFER = 1 << 20  # bytes gathered before each write: Parquet writes pages piecemeal


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and its path for `uri`; strings without a scheme are local paths."""
    if "://" in uri:
        filesystem, path = pafs.FileSystem.from_uri(uri)
        return filesystem, path
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def absolute(uri: str) -> str:
    """`uri` as every process can use it: a URI as is, a local path made absolute."""
    return uri if "://" in uri else resolve(uri)[1]


def is_file(uri: str) -> bool:
    """Whether `uri` names an existing file (not a folder)."""
    filesystem, path = resolve(uri)
    return bool(filesystem.get_file_info(path).type == pafs.FileType.File)


def is_local(uri: str) -> bool:
    """Whether `uri` is on the local filesystem (a path or file://), where files can be
    appended to and tools can write in place; told by the scheme alone (no filesystem made)."""
    return "://" not in uri or uri.startswith("file://")


def read_bytes(uri: str) -> bytes:
    """The bytes of the file at `uri`; FileNotFoundError naming it when there is none."""
    filesystem, path = resolve(uri)
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(f"no such file: {uri!r}")
    with filesystem.open_input_file(path) as f:
        return bytes(f.read())


def open_input(uri: str) -> pa.NativeFile:
    """A random-access file at `uri` (Parquet footers and row groups are read by range)."""
    filesystem, path = resolve(uri)
    return filesystem.open_input_file(path)


def write_bytes(uri: str, data: bytes) -> None:
    """Write atomically: a reader sees the old file or the whole new one, never a part."""
    with atomic_output(uri) as f:
        f.write(data)


@contextmanager
def atomic_output(uri: str) -> Iterator[pa.NativeFile]:
    """A stream to write `uri` piece by piece, atomically: it goes to a partial file beside
    `uri`, moved over it when the block ends; deleted instead when the block raises."""
    filesystem, path = resolve(uri)
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    partial = f"{path}.partial-{uuid.uuid4().hex[:8]}"
    try:
        with filesystem.open_output_stream(partial, buffer_size=WRITE_BUFFER) as f:
            yield f
    except BaseException:
        filesystem.delete_file(partial)
        raise
    filesystem.move(partial, path)


def append_bytes(uri: str, data: bytes) -> None:
    """Append to a local file (created when missing). Object stores have no append and a rewrite
    grows with the square of the file: write a new object per chunk there instead."""
    if not is_local(uri):
        raise ValueError(f"{uri}: object stores cannot append; write parts instead")
    path = resolve(uri)[1]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "ab") as f:
        f.write(data)


def list_files(uri: str) -> list[str]:
    """Names of the files directly in the folder `uri`, sorted; empty when it does not exist."""
    filesystem, path = resolve(uri)
    if filesystem.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    entries = filesystem.get_file_info(pafs.FileSelector(path))
    return sorted(e.base_name for e in entries if e.type == pafs.FileType.File)


def list_tree(uri: str) -> set[str]:
    """Paths (relative to `uri`, with `/`) of every file under the folder `uri`, recursively."""
    filesystem, path = resolve(uri)
    if filesystem.get_file_info(path).type == pafs.FileType.NotFound:
        return set()
    entries = filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
    base = path.rstrip("/") + "/"
    return {e.path.removeprefix(base) for e in entries if e.type == pafs.FileType.File}


def delete_file(uri: str) -> None:
    filesystem, path = resolve(uri)
    filesystem.delete_file(path)


def move_tree(src_uri: str, dst_uri: str) -> None:
    """Move the folder `src_uri` to `dst_uri` (a rename where the filesystem has one; object
    stores copy each file, then delete the source)."""
    filesystem, src = resolve(src_uri)
    _, dst = resolve(dst_uri)
    filesystem.create_dir(dst.rsplit("/", 1)[0], recursive=True)
    if isinstance(filesystem, pafs.LocalFileSystem):
        filesystem.move(src, dst)
        return
    for relative in sorted(list_tree(src_uri)):
        filesystem.create_dir(f"{dst}/{relative}".rsplit("/", 1)[0], recursive=True)
        filesystem.copy_file(f"{src}/{relative}", f"{dst}/{relative}")
    filesystem.delete_dir(src)


def copy_tree(src_uri: str, dst_uri: str, *, last: str | None = None) -> int:
    """Copy every file under the folder `src_uri` to the same place under `dst_uri` (one
    filesystem); the file named `last` (e.g. a manifest that marks the folder complete) is copied
    after all others. Returns the number of files copied."""
    filesystem, src = resolve(src_uri)
    _, dst = resolve(dst_uri)
    names = sorted(list_tree(src_uri), key=lambda name: (name == last, name))
    for relative in names:
        filesystem.create_dir(f"{dst}/{relative}".rsplit("/", 1)[0], recursive=True)
        filesystem.copy_file(f"{src}/{relative}", f"{dst}/{relative}")
    return len(names)
