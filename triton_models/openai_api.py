"""The OpenAI-compatible API: `/v1/models`, `/v1/images/generations`, `/v1/images/edits` and `/v1/videos`.

Clients that speak OpenAI's Images and Videos APIs (the official SDKs, LiteLLM, curl) reach the served
methods through it. The HTTP guard (`http_guard.py`) serves it on the published HTTP port beside KServe v2's
`/v2`, with the guard's protections; this ASGI app runs in the guard's process and calls the method models
over Triton's gRPC port with the async tritonclient, so a request here is the same request a `/v2` client
sends (the same checks, limits, queue and core).

A request's `model` names a method (``sdedit``) or a family's (``sd.sdedit``); the method's other
parameters go in the body under the CLI's names (what the SDKs send as `extra_body`). `size` is ``WxH``,
`n` runs that many requests (seeds `seed`, `seed+1`, ...), images come back as `b64_json` (or `url`: a
``data:`` URL) in `output_format` png, jpeg or webp. `stream` with `partial_images` sends latent previews as
`*.partial_image` events, then the `*.completed` one. Videos are jobs kept in this process (the newest
`MAX_VIDEO_JOBS`): create, poll, download the MP4, delete. A client that hangs up cancels its request.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import io
import json
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ti2i.client.registry import METHODS, STREAM_SUFFIX, Method
from ti2i.client.remote import _infer_inputs, request_tensors
from ti2i.errors import InvalidInputError, ModelNotFoundError, ServerUnavailableError, Ti2iError
from ti2i.families import split_served_name
from ti2i.triton_models.method_io import STREAM_OUTPUTS, image_bytes

MAX_IMAGES = 10  # `n`, as OpenAI's limit
MAX_PARTIAL_IMAGES = 3
MAX_VIDEO_JOBS = 32  # finished jobs beyond these are forgotten, oldest first
DISCONNECT_POLL_S = 0.1
IMAGE_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
# OpenAI's fields that mean nothing for these methods: accepted and ignored, as their defaults are
IGNORED = {"quality", "background", "moderation", "style", "user", "input_fidelity"}


class ApiError(Exception):
    """An error in OpenAI's shape: its HTTP status, type and the parameter at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.kind = status, param, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": None}}


def api_error(err: Exception) -> ApiError:
    """An error as the OpenAI error it is: a client's fault 400, an unknown model 404, a full server 503."""
    if isinstance(err, ApiError):
        return err
    if isinstance(err, HTTPException):  # Starlette's own: an unknown path, a refused form
        return ApiError(err.status_code, str(err.detail))
    if isinstance(err, ModelNotFoundError):
        return ApiError(404, str(err), "model")
    if isinstance(err, InvalidInputError):
        return ApiError(400, str(err))
    if isinstance(err, ServerUnavailableError):
        return ApiError(503, str(err), kind="server_error")
    return ApiError(500, f"{type(err).__name__}: {err}", kind="server_error")


# --- what is served ---------------------------------------------------------------------------------------

def served_methods(repository: Path) -> dict[str, str]:
    """{model id: served method model} of the repository: each family's ``family.method``, and the plain
    method name where one family serves it."""
    by_id: dict[str, str] = {}
    plain: dict[str, list[str]] = {}
    for config in sorted(repository.glob("*/config.pbtxt")):
        name = config.parent.name
        method = split_served_name(name)[1]
        if method not in METHODS:
            continue
        by_id[name] = name
        plain.setdefault(method, []).append(name)
    for method, names in plain.items():
        if len(names) == 1:
            by_id[method] = names[0]
    return by_id


def resolve_model(repository: Path, model: str | None, output: str, default: str) -> tuple[str, Method]:
    """(the served method model, its record) that `model` names, for an `output` (image or video) endpoint."""
    served = served_methods(repository)
    name = model or default
    if name not in served:
        known = ", ".join(sorted(i for i in served if METHODS[split_served_name(i)[1]].output == output))
        raise ModelNotFoundError(f"model {name!r} is not served here (served {output} models: {known or 'none'})")
    method = METHODS[split_served_name(served[name])[1]]
    if method.output != output:
        raise ApiError(400, f"model {name!r} makes {method.output}s, not {output}s: use the "
                            f"{'videos' if method.output == 'video' else 'images'} endpoint", "model")
    return served[name], method


# --- request parsing ---------------------------------------------------------------------------------------

@dataclass
class ImageRequest:
    model: str
    method: Method
    values: dict[str, Any]  # the method's inputs (images as file bytes), under the CLI's names
    n: int = 1
    response_format: str = "b64_json"
    output_format: str = "png"
    output_compression: int | None = None
    stream: bool = False
    partial_images: int = 0


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no", ""):
        return False
    raise ApiError(400, f"{name} must be true or false, got {value!r}", name)


def _integer(value: Any, name: str, low: int, high: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ApiError(400, f"{name} must be an integer in [{low}, {high}], got {value!r}", name) from None
    if not low <= number <= high or (isinstance(value, float) and not value.is_integer()):
        raise ApiError(400, f"{name} must be an integer in [{low}, {high}], got {value!r}", name)
    return number


def _size(value: Any) -> tuple[int, int] | None:
    """(width, height) of ``WxH``; None for ``auto`` (the method's default)."""
    if value is None or value == "auto":
        return None
    width, sep, height = str(value).lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit() or not int(width) or not int(height):
        raise ApiError(400, f"size must be WIDTHxHEIGHT (such as 512x512) or auto, got {value!r}", "size")
    return int(width), int(height)


def _typed(method: Method, name: str, value: Any) -> Any:
    """A body field as the method parameter's kind (a form sends every field as text)."""
    param = next((p for p in method.params if p.name == name), None)
    if param is None or not isinstance(value, str):
        return value
    if param.kind is bool:
        return _flag(value, name)
    try:
        return param.kind(value)
    except ValueError:
        raise InvalidInputError(f"{name} must be {param.allowed()}, got {value!r}") from None


def method_values(method: Method, fields: Mapping[str, Any], files: Mapping[str, bytes]) -> dict[str, Any]:
    """The method's inputs from the body's fields and files (checked by `request_tensors`)."""
    values = {name: _typed(method, name, value) for name, value in fields.items() if value is not None}
    size = _size(values.pop("size", None))
    if size is not None:
        values["width"], values["height"] = size
    if "prompt" in values and "prompt" not in {p.name for p in method.params}:
        values.pop("prompt")  # the SDKs' required prompt, for a method without one (svd)
    for name in method.images:
        if name not in files:
            raise ApiError(400, f"{method.name} needs the {name!r} file", name)
        values[name] = files[name]
    for name in method.optional_images:
        if name in files:
            values[name] = files[name]
    extra = set(files) - set(method.all_images)
    if extra:
        raise ApiError(400, f"{method.name} takes no {', '.join(sorted(extra))} file", sorted(extra)[0])
    request_tensors(method, **values)  # every name known, every value of its kind: one clear error otherwise
    return values


def image_request(repository: Path, fields: dict[str, Any], files: dict[str, bytes], default: str) -> ImageRequest:
    fields = {k: v for k, v in fields.items() if k not in IGNORED}
    model, method = resolve_model(repository, fields.pop("model", None), "image", default)
    request = ImageRequest(model, method, {})
    request.n = _integer(fields.pop("n", 1), "n", 1, MAX_IMAGES)
    request.response_format = str(fields.pop("response_format", None) or "b64_json")
    if request.response_format not in ("b64_json", "url"):
        raise ApiError(400, f"response_format must be b64_json or url, got {request.response_format!r}",
                       "response_format")
    request.output_format = str(fields.pop("output_format", None) or "png").lower()
    if request.output_format not in IMAGE_FORMATS:
        raise ApiError(400, f"output_format must be one of {', '.join(IMAGE_FORMATS)}, got "
                            f"{request.output_format!r}", "output_format")
    compression = fields.pop("output_compression", None)
    if compression is not None:
        request.output_compression = _integer(compression, "output_compression", 0, 100)
    request.stream = _flag(fields.pop("stream", False), "stream")
    request.partial_images = _integer(fields.pop("partial_images", 0), "partial_images", 0, MAX_PARTIAL_IMAGES)
    request.values = method_values(method, fields, files)
    return request


def seeds(values: Mapping[str, Any], n: int) -> list[int | None]:
    """Each image's seed: `seed`, `seed+1`, ...; without one, the method's default for one image and fresh
    random seeds for several (else all would be the same)."""
    seed = values.get("seed")
    if seed is not None:
        return [int(seed) + i for i in range(n)]
    return [None] if n == 1 else [secrets.randbelow(2**31) for _ in range(n)]


def encode_image(pixels: np.ndarray, fmt: str, compression: int | None = None) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    options = {} if compression is None or fmt == "png" else {"quality": max(compression, 1)}
    Image.fromarray(pixels).save(buffer, format=IMAGE_FORMATS[fmt], **options)
    return buffer.getvalue()


NO_USAGE = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
            "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}}  # no tokens are billed here


def size_text(pixels: np.ndarray) -> str:
    """``WxH`` of uint8 [H, W, 3] pixels."""
    return f"{pixels.shape[1]}x{pixels.shape[0]}"


def image_entry(data: bytes, request: ImageRequest) -> dict[str, str]:
    text = base64.b64encode(data).decode()
    if request.response_format == "url":
        return {"url": f"data:image/{request.output_format};base64,{text}"}
    return {"b64_json": text}


# --- the calls to Triton ---------------------------------------------------------------------------------

class Triton:
    """The method models over Triton's gRPC port (one channel, opened at the first call, in the app's loop)."""

    def __init__(self, grpc_address: str):
        self.address = grpc_address
        self._client: Any = None

    def _get(self) -> Any:
        if self._client is None:
            import tritonclient.grpc.aio as grpcclient

            from ti2i.client.runners import grpc_channel_args

            self._client = grpcclient.InferenceServerClient(self.address,
                                                            channel_args=grpc_channel_args(grpcclient, self.address))
        return self._client

    async def run(self, model: str, method: Method, values: dict[str, Any]) -> np.ndarray:
        """One request to the method model: its pixels."""
        import tritonclient.grpc.aio as grpcclient
        from tritonclient.utils import InferenceServerException

        from ti2i.client.runners import _translate

        try:
            result = await self._get().infer(model, _infer_inputs(grpcclient, request_tensors(method, **values)),
                                             outputs=[grpcclient.InferRequestedOutput("pixels")])
        except InferenceServerException as err:
            raise _translate(err, method.name) from None
        return np.array(result.as_numpy("pixels"), copy=True)

    async def stream(self, model: str, method: Method, values: dict[str, Any], output: str = "pixels",
                     fmt: str | None = None, preview_every: int = 0) -> AsyncIterator[dict[str, np.ndarray]]:
        """The streaming twin's responses: progress (`stage`, `step`, `steps`, a `preview` every
        `preview_every` steps), then the result's `output`."""
        import tritonclient.grpc.aio as grpcclient
        from tritonclient.utils import InferenceServerException

        from ti2i.client.runners import _translate

        tensors = request_tensors(method, **values, **({"format": fmt} if fmt else {}))
        if preview_every:
            tensors["preview_every"] = np.array([preview_every], dtype=np.int64)
        inputs = _infer_inputs(grpcclient, tensors)
        wanted = [grpcclient.InferRequestedOutput(n) for n in (output, *STREAM_OUTPUTS)]

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield {"model_name": model + STREAM_SUFFIX, "inputs": inputs, "outputs": wanted}

        responses = self._get().stream_infer(requests())
        try:
            async for result, error in responses:
                if error is not None:
                    raise _translate(error, method.name)
                out = {n: np.array(result.as_numpy(n), copy=True) for n in (output, *STREAM_OUTPUTS)
                       if result.as_numpy(n) is not None}
                yield out
                if output in out:
                    return
        except InferenceServerException as err:
            raise _translate(err, method.name) from None
        finally:
            responses.cancel()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


# --- video jobs ----------------------------------------------------------------------------------------

@dataclass
class VideoJob:
    id: str
    model: str
    prompt: str | None
    size: str
    seconds: str
    created_at: int = field(default_factory=lambda: int(time.time()))
    status: str = "queued"
    progress: int = 0
    completed_at: int | None = None
    error: dict[str, str] | None = None
    content: bytes | None = None
    task: asyncio.Task | None = None

    def view(self) -> dict[str, Any]:
        return {"id": self.id, "object": "video", "model": self.model, "status": self.status,
                "progress": self.progress, "created_at": self.created_at, "completed_at": self.completed_at,
                "expires_at": None, "prompt": self.prompt, "size": self.size, "seconds": self.seconds,
                "remixed_from_video_id": None, "error": self.error}


class VideoJobs:
    """The video jobs of this process, the newest `MAX_VIDEO_JOBS` (unfinished ones are never forgotten: a
    create beyond that many running is refused)."""

    def __init__(self) -> None:
        self.jobs: OrderedDict[str, VideoJob] = OrderedDict()

    def add(self, job: VideoJob) -> None:
        while len(self.jobs) >= MAX_VIDEO_JOBS:
            finished = next((k for k, j in self.jobs.items() if j.status in ("completed", "failed")), None)
            if finished is None:
                raise ApiError(429, f"{MAX_VIDEO_JOBS} video jobs are running: try again later",
                               kind="rate_limit_error")
            del self.jobs[finished]
        self.jobs[job.id] = job

    def get(self, video_id: str) -> VideoJob:
        job = self.jobs.get(video_id)
        if job is None:
            raise ApiError(404, f"no video {video_id!r} (it may have been deleted or forgotten)", "video_id")
        return job

    def delete(self, video_id: str) -> VideoJob:
        job = self.get(video_id)
        if job.task is not None and not job.task.done():
            job.task.cancel()
        del self.jobs[video_id]
        return job


# --- the app -------------------------------------------------------------------------------------------

class BearerKey:
    """ASGI middleware: every request sends ``Authorization: Bearer <key>``, else 401 in OpenAI's shape."""

    def __init__(self, app: Any, key: str):
        self.app = app
        self.expected = f"Bearer {key}".encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            sent = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(sent, self.expected):
                refusal = ApiError(401, "a valid API key is needed (Authorization: Bearer KEY)",
                                   kind="authentication_error")
                await JSONResponse(refusal.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(repository: Path, grpc_address: str, api_key: str | None = None) -> Any:
    """The ASGI app (FastAPI) serving `/v1` for the models in `repository`, calling Triton at `grpc_address`;
    with `api_key`, every request must send ``Authorization: Bearer <api_key>``."""
    triton = Triton(grpc_address)
    videos = VideoJobs()
    app = FastAPI(title="ti2i OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
    app.router.add_event_handler("shutdown", triton.close)

    if api_key is not None:
        app.add_middleware(BearerKey, key=api_key)

    async def openai_error(request: Request, err: Exception) -> Any:  # OpenAI's error shape, never a traceback
        failure = api_error(err)
        return JSONResponse(failure.body(), status_code=failure.status)

    # the expected ones by class (no traceback logged), an unknown path or bad form, then anything else
    for kind in (ApiError, Ti2iError, HTTPException, Exception):
        app.add_exception_handler(kind, openai_error)

    async def until_disconnected(request: Request, work: Any) -> Any:
        """`work` (a coroutine), cancelled when the client hangs up (its Triton requests are cancelled too)."""
        task = asyncio.ensure_future(work)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    task.cancel()
                    raise ApiError(499, "the client closed the request")
        finally:
            if not task.done():
                task.cancel()

    async def body(request: Request) -> tuple[dict[str, Any], dict[str, bytes]]:
        """(fields, files) of a JSON or multipart body; a list field (``image[]``) gives one file or value."""
        kind = request.headers.get("content-type", "")
        if kind.startswith("multipart/form-data") or kind.startswith("application/x-www-form-urlencoded"):
            fields: dict[str, Any] = {}
            files: dict[str, bytes] = {}
            async with request.form(max_files=8, max_fields=200) as form:
                for key, value in form.multi_items():
                    name = key[:-2] if key.endswith("[]") else key
                    if hasattr(value, "read"):
                        if name in files:
                            raise ApiError(400, f"one {name!r} file only", name)
                        files[name] = await value.read()
                    else:
                        fields[name] = value
            return fields, files
        try:
            fields = json.loads(await request.body() or b"{}")
        except ValueError as err:
            raise ApiError(400, f"the body is not JSON: {err}") from None
        if not isinstance(fields, dict):
            raise ApiError(400, "the body must be a JSON object")
        files = {}
        for name in ("image", "mask", "input_reference"):
            value = fields.pop(name, None)
            if isinstance(value, dict):  # OpenAI's {"image_url": ...} reference
                value = value.get("image_url")
            if value is not None:
                files[name] = image_bytes(value, name)
        return fields, files

    def model_entry(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "ti2i"}

    @app.get("/v1/models")
    async def models() -> Any:
        return {"object": "list", "data": [model_entry(name) for name in sorted(served_methods(repository))]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> Any:
        if model not in served_methods(repository):
            raise ModelNotFoundError(f"model {model!r} is not served here")
        return model_entry(model)

    async def images(request: Request, default: str, event: str) -> Any:
        fields, files = await body(request)
        req = image_request(repository, fields, files, default)
        created = int(time.time())

        def with_seed(seed: int | None) -> dict[str, Any]:
            return {**req.values, **({"seed": seed} if seed is not None else {})}

        if not req.stream:
            runs = (triton.run(req.model, req.method, with_seed(seed)) for seed in seeds(req.values, req.n))
            images = await until_disconnected(request, asyncio.gather(*runs))
            return {"created": created, "background": "opaque", "output_format": req.output_format,
                    "quality": "auto", "size": size_text(images[0]),
                    "data": [image_entry(encode_image(p, req.output_format, req.output_compression), req)
                             for p in images]}
        if req.n != 1:
            raise ApiError(400, "stream takes n=1", "n")
        steps = int(req.values.get("steps") or req.method.param("steps").default or 1)
        every = max(steps // (req.partial_images + 1), 1) if req.partial_images else 0

        def sse(kind: str, pixels: np.ndarray, **extra: Any) -> bytes:
            data = encode_image(pixels, req.output_format, req.output_compression)
            payload = {"type": f"{event}.{kind}", "b64_json": base64.b64encode(data).decode(),
                       "created_at": int(time.time()), "size": size_text(pixels), "quality": "auto",
                       "background": "opaque", "output_format": req.output_format, **extra}
            return f"event: {payload['type']}\ndata: {json.dumps(payload)}\n\n".encode()

        async def events() -> AsyncIterator[bytes]:
            index = 0
            try:
                async for out in triton.stream(req.model, req.method, with_seed(seeds(req.values, 1)[0]),
                                               preview_every=every):
                    if "pixels" in out:
                        yield sse("completed", out["pixels"], usage=NO_USAGE)
                        return
                    if "preview" in out and index < req.partial_images:
                        yield sse("partial_image", out["preview"], partial_image_index=index)
                        index += 1
            except Exception as err:  # the stream has begun: the error is its last event
                failure = api_error(err)
                yield f"event: error\ndata: {json.dumps({'type': 'error', **failure.body()})}\n\n".encode()

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/images/generations")
    async def generations(request: Request) -> Any:
        return await images(request, "txt2img", "image_generation")

    @app.post("/v1/images/edits")
    async def edits(request: Request) -> Any:
        return await images(request, "sdedit", "image_edit")

    async def run_video(job: VideoJob, served: str, method: Method, values: dict[str, Any]) -> None:
        job.status = "in_progress"
        try:
            async for out in triton.stream(served, method, values, output="encoded", fmt="mp4"):
                if "encoded" in out:
                    job.content = bytes(out["encoded"].reshape(-1)[0])
                elif "step" in out and "steps" in out:
                    job.progress = min(99, int(100 * int(out["step"][0]) / max(int(out["steps"][0]), 1)))
            if job.content is None:
                raise ServerUnavailableError(f"{method.name}: the stream ended without a result")
            job.status, job.progress = "completed", 100
        except asyncio.CancelledError:
            raise
        except Exception as err:  # the job's failure is its state, read by the client's poll
            failure = api_error(err)
            job.status, job.error = "failed", {"code": failure.kind, "message": str(failure)}
        job.completed_at = int(time.time())

    @app.post("/v1/videos")
    async def create_video(request: Request) -> Any:
        fields, files = await body(request)
        fields = {k: v for k, v in fields.items() if k not in IGNORED}
        served, method = resolve_model(repository, fields.pop("model", None), "video", "svd")
        if "input_reference" in files:
            files["image"] = files.pop("input_reference")
        seconds = fields.pop("seconds", None)
        fps = fields.get("fps") or method.param("fps").default
        if seconds is not None and fields.get("frames") is None:
            try:
                fields["frames"] = max(int(round(float(seconds) * float(fps))), 1)
            except (TypeError, ValueError):
                raise ApiError(400, f"seconds must be a number, got {seconds!r}", "seconds") from None
        values = method_values(method, fields, files)
        frames = values.get("frames") or method.param("frames").default
        length = f"{float(frames) / float(fps):g}" if frames and fps else "auto"  # else the model's default
        job = VideoJob(f"video_{uuid.uuid4().hex}", served, fields.get("prompt"), str(fields.get("size") or "auto"),
                       length)
        videos.add(job)
        job.task = asyncio.ensure_future(run_video(job, served, method, values))
        return job.view()

    @app.get("/v1/videos")
    async def list_videos() -> Any:
        data = [job.view() for job in reversed(videos.jobs.values())]
        return {"object": "list", "data": data, "has_more": False,
                "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}

    @app.get("/v1/videos/{video_id}")
    async def get_video(video_id: str) -> Any:
        job = videos.get(video_id)
        headers = {"openai-poll-after-ms": "200"} if job.status in ("queued", "in_progress") else {}
        return JSONResponse(job.view(), headers=headers)

    @app.get("/v1/videos/{video_id}/content")
    async def video_content(video_id: str, variant: str = "video") -> Any:
        job = videos.get(video_id)
        if variant != "video":
            raise ApiError(400, f"variant {variant!r} is not kept: only the video", "variant")
        if job.status != "completed" or job.content is None:
            raise ApiError(409 if job.status != "failed" else 400,
                           f"video {video_id!r} is {job.status}: its content is not ready", "video_id")
        return Response(job.content, media_type="video/mp4")

    @app.delete("/v1/videos/{video_id}")
    async def delete_video(video_id: str) -> Any:
        job = videos.delete(video_id)
        return {"id": job.id, "object": "video.deleted", "deleted": True}

    return app


async def serve(app: Any, port: int, started: asyncio.Event | None = None) -> None:
    """Serve `app` on loopback `port` (the guard forwards `/v1` to it) in the running loop."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on",
                            timeout_keep_alive=30, access_log=False,
                            timeout_graceful_shutdown=10)
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]  # the guard's loop owns them
    task = asyncio.ensure_future(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.02)
    if started is not None:
        started.set()
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        if task.done():  # uvicorn itself stopped
            return
        server.should_exit = True  # we are stopped: uvicorn's own shutdown, so no task of it outlives the loop
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise
