"""The uploaded image's bytes: a raw `image/*` body or the multipart field `image`.

The body limit holds whether or not the client declares Content-Length: a declared size over
it is refused before reading, and reading stops at the first byte past it.
"""

from __future__ import annotations

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.types import Message

from serve.codec import ApiError

IMAGE_FIELD = "image"
MULTIPART = "multipart/form-data"
# multipart parts that may carry an image; clients often send no type or a generic one
_GENERIC_PART_TYPES = ("", "application/octet-stream")


async def image_bytes(request: Request, *, max_body_bytes: int) -> bytes:
    """415 for other content types, 413 over `max_body_bytes`, 422 for a form without `image`."""
    media = media_type(request.headers.get("content-type", ""))
    if media.startswith("image/"):
        return await read_body(request, limit=max_body_bytes)
    if media == MULTIPART:
        return await _form_image(request, max_body_bytes)
    raise ApiError(
        415,
        f"unsupported Content-Type {media or '(none)'!r}: send the image as the raw body "
        f"(image/png, image/jpeg, ...) or as the {MULTIPART} field {IMAGE_FIELD!r}",
    )


def media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


async def read_body(request: Request, *, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"body of {declared} bytes exceeds max_body_bytes={limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"body exceeds max_body_bytes={limit}")
        chunks.append(chunk)
    return b"".join(chunks)


async def _form_image(request: Request, max_body_bytes: int) -> bytes:
    body = await read_body(request, limit=max_body_bytes)
    try:
        form = await _replay(request, body).form()
    except Exception as err:  # starlette reports malformed multipart in several exception types
        raise ApiError(400, f"malformed {MULTIPART} body: {err}") from err
    try:
        part = form.get(IMAGE_FIELD)
        if not isinstance(part, UploadFile):
            raise ApiError(422, f"{MULTIPART} body needs a file field {IMAGE_FIELD!r}")
        part_type = media_type(part.content_type or "")
        if not (part_type.startswith("image/") or part_type in _GENERIC_PART_TYPES):
            raise ApiError(415, f"field {IMAGE_FIELD!r} has unsupported type {part_type!r}")
        return await part.read()
    finally:
        await form.close()


def _replay(request: Request, body: bytes) -> Request:
    """A copy of `request` whose body is the already-read `body`."""

    async def receive() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(request.scope, receive)
