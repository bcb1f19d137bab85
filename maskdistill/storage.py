"""Local paths and URIs (s3://, gs://, file://, ...) resolved to pyarrow filesystems."""

from __future__ import annotations

import os

import pyarrow.fs as pafs


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and its path for `uri`; strings without a scheme are local paths."""
    if "://" in uri:
        filesystem, path = pafs.FileSystem.from_uri(uri)
        return filesystem, path
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
