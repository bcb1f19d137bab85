"""The segmentation service: a Ray Serve deployment with a FastAPI ingress over one run directory.

    maskdistill serve runs/demo --port 8000          # local: Ray in-process, Ctrl-C stops
    serve deploy serve/config.yaml                   # a cluster: import path serve.app:app_builder

Each replica loads the segmenter and the class names of a run directory or an export folder
(`Segmenter.load`), the distilled Mask R-CNN too when there is one (`POST /instances`),
on its GPU when it was given one (`serve.num_gpus`). Concurrent requests are batched by
`@serve.batch` on `segment_batch`; the response header X-Batch-Size tells how many requests
shared the call (those of one padded size one forward pass, `Segmenter`). Settings come from the
run's `config.yaml` `serve:` section, each key overridable in the builder's args (or `--set
key=value`).
"""

import argparse
import asyncio
import hmac
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import numpy as np
import pyarrow.fs as pafs
import ray
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException

from maskdistill import storage
from maskdistill.cocoformat import instance_results
from maskdistill.config import (
    ConfigError,
    ServeConfig,
    add_set_arg,
    apply_override,
    validate_config,
)
from maskdistill.inference import Detector, Segmenter
from maskdistill.release import has_model, model_file, read_config
from maskdistill.stages import DETECTOR, SEGMENTER
from serve.codec import (
    ApiError,
    Format,
    InstanceFormat,
    class_list,
    class_table,
    instance_table,
    label_png,
    overlay_png,
)
from serve.codec import read_image as decode_upload
from serve.page import page_html
from serve.upload import IMAGE_FIELD, image_bytes

APP_NAME = "maskdistill"
logger = logging.getLogger("ray.serve")


class ErrorBody(BaseModel):
    error: str


class ClassInfo(BaseModel):
    label: int
    name: str
    color: list[int]


class Classes(BaseModel):
    classes: list[ClassInfo]


api = FastAPI(
    title="MaskDistill segmentation",
    version="1",
    description="Semantic segmentation by a MaskDistill segmenter (label 0 is background). "
    "POST an image to /segment; GET /classes for the label names and overlay colours.",
)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(HTTPBearer(auto_error=False))]
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in (
        (400, "undecodable image or malformed multipart body"),
        (401, "bearer token missing or wrong (when auth is on)"),
        (413, "body over max_body_bytes or image over max_pixels"),
        (415, "Content-Type is neither image/* nor multipart/form-data"),
        (422, "bad query parameter, or a form without the image field"),
    )
}
_IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [IMAGE_FIELD],
                    "properties": {IMAGE_FIELD: {"type": "string", "format": "binary"}},
                }
            },
        },
    }
}


def _error(status: int, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


@api.exception_handler(ApiError)
async def _api_error(request: Request, err: ApiError) -> JSONResponse:
    return _error(err.status, err.message)


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
    problems = [
        f"{'.'.join(str(part) for part in e['loc'])}: {e['msg']} (got {e.get('input')!r})"
        for e in err.errors()
    ]
    return _error(422, "; ".join(problems))


@api.exception_handler(HTTPException)
async def _http_error(request: Request, err: HTTPException) -> JSONResponse:
    return _error(err.status_code, str(err.detail))


@api.exception_handler(Exception)
async def _internal(request: Request, err: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return _error(500, f"internal error: {type(err).__name__}")


def bearer_token(env_var: str | None) -> str | None:
    """The token a replica accepts: None without auth; fails closed when the variable is unset."""
    if env_var is None:
        return None
    token = os.environ.get(env_var, "")
    if not token:
        raise ConfigError(f"serve.auth_token_env={env_var!r}: that variable is unset or empty")
    return token


# Ray Serve pickles the routes by value when decorating: what they call is defined above.
@serve.ingress(api)
class SegmentationService:
    """One replica: the run's segmenter behind the HTTP routes, requests batched together."""

    def __init__(self, run_dir: str, config: dict[str, Any]) -> None:
        self.config = ServeConfig.model_validate(config)
        self.token = bearer_token(self.config.auth_token_env)
        device = "cuda" if ray.get_gpu_ids() else "cpu"
        self.segmenter = Segmenter.load(
            run_dir,
            device=device,
            max_side=self.config.max_side,
            pad_multiple=self.config.pad_multiple,
        )
        self.detector: Detector | None = None
        if has_model(run_dir, DETECTOR):
            self.detector = Detector.load(run_dir, device=device, max_side=self.config.max_side)
        # @serve.batch's typing hides the setters its handler has
        self.segment_batch.set_max_batch_size(self.config.max_batch_size)  # type: ignore[attr-defined]
        self.segment_batch.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)  # type: ignore[attr-defined]

    @serve.batch
    async def segment_batch(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, int]]:
        """Label maps of the images that arrived together, each with the batch's size."""
        labels = await asyncio.to_thread(self.segmenter.segment, images)
        return [(label_map, len(images)) for label_map in labels]

    def authorize(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        if self.token is None:
            return
        given = b"" if credentials is None else credentials.credentials.encode()
        if not hmac.compare_digest(given, self.token.encode()):
            raise ApiError(401, "missing or wrong bearer token (Authorization: Bearer <token>)")

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page(self) -> HTMLResponse:
        """The page to try the model in a browser (serve/page/index.html; no auth: the page asks
        for the token and sends it with each request)."""
        return HTMLResponse(page_html())

    @api.get("/healthz")
    def healthz(self) -> dict[str, str]:
        """Liveness: 200 once the replica has loaded its model (no auth)."""
        return {"status": "ok"}

    @api.get("/classes", response_model=Classes, responses={401: _ERRORS[401]})
    def classes(self, credentials: Credentials) -> Classes:
        """Every label: its name and the colour the overlay paints it."""
        self.authorize(credentials)
        names = self.segmenter.class_names
        return Classes(classes=[ClassInfo(**row) for row in class_list(names)])

    @api.post(
        "/segment",
        response_class=Response,
        responses={
            200: {
                "description": "png: 1-channel class indices; overlay: colour PNG; json: "
                "{width, height, classes: [{label, name, pixels, box: [x0, y0, x1, y1]}]}",
                "content": {"image/png": {}, "application/json": {}},
            },
            **_ERRORS,
        },
        openapi_extra=_IMAGE_BODY,
    )
    async def segment(
        self,
        request: Request,
        credentials: Credentials,
        format: Annotated[Format, Query(description="png, json or overlay")] = "png",
        alpha: Annotated[float, Query(ge=0.0, le=1.0, description="overlay opacity")] = 0.5,
    ) -> Response:
        """Segment one image sent as the raw body (image/*) or the multipart field `image`."""
        self.authorize(credentials)
        data = await image_bytes(request, max_body_bytes=self.config.max_body_bytes)
        image = await asyncio.to_thread(decode_upload, data, max_pixels=self.config.max_pixels)
        labels, batch_size = await self.segment_batch(image)
        headers = {"X-Batch-Size": str(batch_size)}
        if format == "json":
            table = class_table(labels, self.segmenter.class_names)
            return JSONResponse(table, headers=headers)
        if format == "overlay":
            body = await asyncio.to_thread(overlay_png, image, labels, alpha=alpha)
        else:
            num_classes = self.segmenter.num_classes
            body = await asyncio.to_thread(label_png, labels, num_classes=num_classes)
        return Response(body, media_type="image/png", headers=headers)

    @api.post(
        "/instances",
        responses={
            200: {
                "description": "json: {width, height, tau, instances: [{label, name, score, "
                "box: [x0, y0, x1, y1], segmentation: COCO RLE}]}; coco: a COCO results list",
                "content": {"application/json": {}},
            },
            404: {"model": ErrorBody, "description": "the run has no trained detector"},
            **_ERRORS,
        },
        openapi_extra=_IMAGE_BODY,
    )
    async def instances(
        self,
        request: Request,
        credentials: Credentials,
        format: Annotated[InstanceFormat, Query(description="json or coco")] = "json",
        tau: Annotated[
            float | None,
            Query(ge=0.0, lt=1.0, description="keep scores > tau (default: the run's tau)"),
        ] = None,
        image_id: Annotated[int, Query(ge=0, description="image_id of the COCO results")] = 0,
    ) -> JSONResponse:
        """The distilled Mask R-CNN's confident instances (Sec 3.3) in one uploaded image."""
        self.authorize(credentials)
        if self.detector is None:
            raise ApiError(404, "this run has no trained detector (detector/model.pt)")
        data = await image_bytes(request, max_body_bytes=self.config.max_body_bytes)
        image = await asyncio.to_thread(decode_upload, data, max_pixels=self.config.max_pixels)
        (found,) = await asyncio.to_thread(self.detector.instances, [image], tau=tau)
        if format == "coco":
            return JSONResponse(instance_results(image_id, found))
        height, width = image.shape[:2]
        used = self.detector.tau if tau is None else tau
        return JSONResponse(instance_table(found, width=width, height=height, tau=used))


def serve_config(
    run_dir: str, overrides: Mapping[str, Any] | None = None
) -> tuple[str, ServeConfig]:
    """The run's URI and its `serve:` settings with `overrides` (ServeConfig keys) applied.

    Checks here, before any replica starts, that the run has a trained segmenter.
    """
    fs, root = storage.resolve(run_dir)
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    uri = storage.absolute(run_dir)  # valid on every node
    raw = read_config(uri).model_dump(mode="json")
    raw["serve"].update(overrides or {})
    config = validate_config(raw, source=f"{uri}'s config with serve overrides")
    if not has_model(uri, SEGMENTER):
        raise FileNotFoundError(f"{model_file(uri, SEGMENTER)}: no trained segmenter")
    return uri, config.serve


def build_app(run_uri: str, config: ServeConfig) -> Application:
    """The deployment with its replicas, GPUs and batch limits taken from `config`."""
    deployment = serve.deployment(
        name="Segmenter",
        autoscaling_config={
            "min_replicas": config.min_replicas,
            "initial_replicas": max(1, config.min_replicas),  # load the model before serving
            "max_replicas": config.max_replicas,
            "target_ongoing_requests": config.max_batch_size,
        },
        max_ongoing_requests=2 * config.max_batch_size,
        ray_actor_options={"num_gpus": config.num_gpus},
    )(SegmentationService)
    return deployment.bind(run_uri, config.model_dump())


def app_builder(args: dict[str, Any]) -> Application:
    """The import path `serve.app:app_builder`: args {"run_dir": ..., ServeConfig keys}."""
    settings = dict(args)
    run_dir = settings.pop("run_dir", None)
    if not run_dir:
        raise ConfigError("serve.app:app_builder needs args.run_dir (a trained run directory)")
    return build_app(*serve_config(str(run_dir), settings))


def start(
    run_dir: str,
    *,
    port: int | None = None,
    host: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> str:
    """Serve `run_dir` on this Ray cluster (ray.init done by the caller); returns the base URL.

    `port`, `host` and `overrides` (ServeConfig keys) take precedence over the run's config.
    """
    return run_app(*serve_config(run_dir, _with_address(overrides or {}, port, host)))


def _with_address(
    settings: Mapping[str, Any], port: int | None, host: str | None
) -> dict[str, Any]:
    """`settings` with the port and host given explicitly (None: the run's config decides)."""
    given = {"port": port, "host": host}
    return {**settings, **{k: v for k, v in given.items() if v is not None}}


def run_app(run_uri: str, config: ServeConfig) -> str:
    """Start Serve's HTTP proxy on config.host:port, deploy the app, return its base URL."""
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_app(run_uri, config), name=APP_NAME, route_prefix="/")
    shown = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
    return f"http://{shown}:{config.port}"


def stop() -> None:
    """Shut Serve down (the app, its replicas and the HTTP proxy); Ray keeps running."""
    serve.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    """`maskdistill serve RUN_DIR`: Ray in-process (or RAY_ADDRESS), serve until Ctrl-C."""
    parser = argparse.ArgumentParser(prog="maskdistill serve", description=__doc__)
    parser.add_argument("run_dir", help="run directory or export folder (path or URI)")
    parser.add_argument("--host", help="interface to listen on (serve.host)")
    parser.add_argument("--port", type=int, help="HTTP port (serve.port)")
    add_set_arg(parser, "a serve setting, e.g. --set max_batch_size=4")
    args = parser.parse_args(argv)
    settings: dict[str, Any] = {}
    try:
        for item in args.overrides:
            apply_override(settings, item)
        run_uri, config = serve_config(args.run_dir, _with_address(settings, args.port, args.host))
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not ray.is_initialized():  # RAY_ADDRESS joins a cluster; else Ray starts in-process
        ray.init()
    url = run_app(run_uri, config)
    print(f"serving {args.run_dir} at {url} (docs: {url}/docs); Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
