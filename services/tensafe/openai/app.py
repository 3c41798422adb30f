"""The HTTP side of the OpenAI-compatible front: routes, the bearer key, bodies parsed against the bounded
models (``schemas``), errors in OpenAI's shape, one audit entry per call. The logic is ``service.py``.

Every error is ``{"error": {"message", "type", "param", "code"}}`` with the HTTP status of the gRPC code
(``runtime.http_edge.HTTP_STATUS``): a bad field is 400 naming it in ``param``, a model the caller does not
have (another tenant's adapter included) 404 ``model_not_found``, a missing or bad key 401.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any, TypeVar

import anyio
import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tensafe.runtime.errors import InvalidArgument, NotFound, TensafeError
from tensafe.runtime.http_edge import EdgeCaller, Failure, HttpEdge, domain_failure, grpc_failure, request_id

from .schemas import MAX_BODY_BYTES, ChatCompletionRequest, CompletionRequest
from .service import Generation, OpenAIService, chat_body, completion_body, new_id, openai_param, stream_events

log = logging.getLogger("tensafe.openai")

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 409: "conflict_error", 413: "invalid_request_error",
               429: "rate_limit_error"}


class ApiError(Exception):
    """An error answered in OpenAI's shape; ``failure`` is what the audit entry records."""

    def __init__(self, failure: Failure, param: str | None = None, code: str | None = None,
                 status: int | None = None) -> None:
        super().__init__(failure.message)
        self.failure = failure
        self.param = param
        self.code = code
        self.status = status or failure.status

    def response(self, request: str) -> JSONResponse:
        kind = ERROR_TYPES.get(self.status, "api_error" if self.status < 500 else "server_error")
        code = self.code or self.failure.reason.lower()
        return JSONResponse({"error": {"message": self.failure.message, "type": kind, "param": self.param,
                                       "code": code}}, status_code=self.status, headers={"x-request-id": request})


def invalid(param: str | None, message: str, code: str = "invalid_value", status: int | None = None) -> ApiError:
    exc = InvalidArgument(param or "body", message)
    return ApiError(domain_failure(exc), param, code, status)


# Error types that only say the input is not one member of a union (``stop``: a string, or a list of them):
# when the input failed another member for a real reason, that reason is the one reported.
_TYPE_MISMATCH = {"string_type", "int_type", "int_parsing", "list_type", "none_required", "dict_type", "float_type",
                  "bool_type", "model_type", "int_from_float", "is_instance_of"}


def _loc(loc: tuple[int | str, ...]) -> str | None:
    """A pydantic error location as OpenAI names the parameter: ``messages[0].content`` (the names of
    union members, ``constrained-str`` or ``list[int]``, left out: they are not fields)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not part.isidentifier() or part in ("str", "int", "list", "float", "bool", "dict"):
            continue
        else:
            out += ("." if out else "") + part
    return out or None


def validation_error(exc: ValidationError) -> ApiError:
    errors = exc.errors(include_url=False)
    first = next((e for e in errors if e["type"] not in _TYPE_MISMATCH), errors[0])
    param = _loc(tuple(first["loc"]))
    if first["type"] == "extra_forbidden":
        return invalid(param, f"{param}: is not a parameter TenSafe accepts", "unknown_parameter")
    message = first["msg"].removeprefix("Value error, ")
    return invalid(param, f"{param}: {message}" if param else message)


async def _body(request: Request) -> bytes:
    """The request body, refused (413) past MAX_BODY_BYTES while it arrives."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise invalid(None, f"the request body is larger than {MAX_BODY_BYTES} bytes", "request_too_large", 413)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise invalid(None, f"the request body is larger than {MAX_BODY_BYTES} bytes", "request_too_large", 413)
        chunks.append(chunk)
    return b"".join(chunks)


M = TypeVar("M", bound=BaseModel)


def _parse(model: type[M], body: bytes) -> M:
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise invalid(None, "the request body is not JSON", "invalid_json") from None
    if not isinstance(parsed, dict):
        raise invalid(None, "the request body must be a JSON object", "invalid_json")
    try:
        return model.model_validate(parsed)
    except ValidationError as exc:
        raise validation_error(exc) from None


def from_grpc(err: grpc.RpcError, chat: bool) -> ApiError:
    failure = grpc_failure(err)
    param = openai_param(failure.field, chat)
    if failure.field and param and failure.message.startswith(failure.field + ":"):  # the name the caller used
        failure = replace(failure, message=param + failure.message[len(failure.field):])
    if failure.code == grpc.StatusCode.NOT_FOUND:
        return ApiError(failure, "model", "model_not_found")
    return ApiError(failure, param)


class _Limiter:
    """Threads for generations (each waits on its gRPC stream), apart from the pool that serves the short calls
    (keys, model lists), so that generations cannot starve them: at most TENSAFE_MAX_STREAMS, as the server
    allows (made on first use: a limiter belongs to the event loop)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._limiter: anyio.CapacityLimiter | None = None

    def get(self) -> anyio.CapacityLimiter:
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.size)
        return self._limiter


def create_app(edge: HttpEdge) -> FastAPI:
    """The FastAPI app of the OpenAI-compatible front on ``edge``."""
    service = OpenAIService(edge)
    generations = _Limiter(edge.config.max_streams)
    app = FastAPI(title="TenSafe OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        """A path or method this API does not have, in OpenAI's error shape."""
        code = {404: grpc.StatusCode.NOT_FOUND, 405: grpc.StatusCode.UNIMPLEMENTED}.get(exc.status_code,
                                                                                         grpc.StatusCode.UNKNOWN)
        message = f"{request.method} {request.url.path[:200]}: {exc.detail}"
        return ApiError(Failure(code, "UNKNOWN_ROUTE", message), None, "unknown_url", exc.status_code).response(
            request_id(request.headers.get("x-request-id")))

    async def handle(request: Request, action: str, work: Callable[[EdgeCaller, bytes], Awaitable[Response]],
                     resource: str = "") -> Response:
        """Authenticate, run ``work``; audit the outcome (a streamed response audits when its stream ends)."""
        rid = request_id(request.headers.get("x-request-id"))
        caller: EdgeCaller | None = None
        body = b""
        try:
            body = await _body(request) if request.method == "POST" else b""
            caller = await anyio.to_thread.run_sync(edge.authenticate, request.headers.get("authorization"), rid)
            response = await work(caller, body)
        except (ApiError, TensafeError) as exc:
            err = exc if isinstance(exc, ApiError) else ApiError(domain_failure(exc))
            edge.record(action, caller, rid, err.failure, getattr(request.state, "resource", resource), body)
            return err.response(rid)
        response.headers["x-request-id"] = rid
        if not isinstance(response, StreamingResponse):  # a stream is audited when it ends (_streamed)
            edge.record(action, caller, rid, None, getattr(request.state, "resource", resource), body)
        return response

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        async def work(caller: EdgeCaller, _body: bytes) -> Response:
            try:
                data = await anyio.to_thread.run_sync(service.list_models, caller)
            except grpc.RpcError as err:
                raise from_grpc(err, False) from None
            return JSONResponse({"object": "list", "data": data})
        return await handle(request, "openai.ListModels", work)

    @app.get("/v1/models/{model:path}")
    async def retrieve_model(request: Request, model: str) -> Response:
        async def work(caller: EdgeCaller, _body: bytes) -> Response:
            try:
                found = await anyio.to_thread.run_sync(service.retrieve_model, caller, model)
            except grpc.RpcError as err:
                raise from_grpc(err, False) from None
            if found is None:
                raise ApiError(domain_failure(NotFound("model", model)), "model", "model_not_found")
            return JSONResponse(found)
        return await handle(request, "openai.RetrieveModel", work, resource=model[:128])

    def generation_route(action: str, model_cls: type[CompletionRequest] | type[ChatCompletionRequest]
                         ) -> Callable[[Request], Awaitable[Response]]:
        chat = model_cls is ChatCompletionRequest

        async def route(request: Request) -> Response:
            async def work(caller: EdgeCaller, body: bytes) -> Response:
                req = _parse(model_cls, body)
                request.state.resource = req.model[:128]
                try:
                    gen = await anyio.to_thread.run_sync(service.start, caller, req, limiter=generations.get())
                except grpc.RpcError as err:
                    raise from_grpc(err, chat) from None
                completion_id, created = new_id(chat)
                details = {"model": req.model[:128], "choices": str(len(gen.choices)), "stream": str(req.stream)}
                if req.stream:
                    return StreamingResponse(
                        _streamed(edge, action, caller, body, gen, completion_id, created, details,
                                  generations.get()),
                        media_type="text/event-stream", headers={"cache-control": "no-cache"})
                try:
                    await anyio.to_thread.run_sync(gen.run, limiter=generations.get())
                except grpc.RpcError as err:
                    raise from_grpc(err, chat) from None
                return JSONResponse((chat_body if chat else completion_body)(gen, completion_id, created))

            return await handle(request, action, work)

        return route

    app.add_api_route("/v1/completions", generation_route("openai.CreateCompletion", CompletionRequest),
                      methods=["POST"])
    app.add_api_route("/v1/chat/completions",
                      generation_route("openai.CreateChatCompletion", ChatCompletionRequest), methods=["POST"])
    return app


async def _streamed(edge: HttpEdge, action: str, caller: EdgeCaller, body: bytes, gen: Generation,
                    completion_id: str, created: int, details: dict[str, str],
                    limiter: anyio.CapacityLimiter) -> AsyncIterator[str]:
    """The events of a streamed generation; a failure mid-stream is sent as an ``error`` event (OpenAI's
    clients raise it), and the audit entry is written when the stream ends, however it ends."""
    events = stream_events(gen, completion_id, created)
    failure: Failure | None = None
    done = object()
    try:
        while True:
            item: Any = await anyio.to_thread.run_sync(next, events, done, limiter=limiter)
            if item is done:
                break
            yield item
    except grpc.RpcError as err:
        failure = grpc_failure(err)
        chat = "chat" in action.lower()
        api = from_grpc(err, chat)
        yield "data: " + json.dumps({"error": {"message": failure.message, "type": "server_error",
                                               "param": api.param, "code": api.code or failure.reason.lower()}}) \
            + "\n\n"
    except BaseException:
        failure = Failure(grpc.StatusCode.CANCELLED, "CANCELLED", "the client went away")
        gen.cancel()
        raise
    finally:
        details = {**details, "completion_tokens": str(gen.completion_tokens)}
        edge.record(action, caller, caller.request_id, failure, gen.request.model[:128], body, details)
