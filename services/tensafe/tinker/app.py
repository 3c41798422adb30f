"""The HTTP routes of the Tinker-compatible API (the ``tinker`` client's ``/api/v1/...``), on FastAPI.

Each route authenticates the caller (``X-API-Key: tml-<TenSafe API key>``: the client insists on the ``tml-``
prefix), records one audit entry for the call (``tinker.<Route>``), and hands plain values to
:class:`~tensafe.tinker.service.Gateway`. Errors are the client's: 400 with the field named for bad input (not
retried), 401/403/404 as they are, 408 for a future not done yet within the long poll (the client polls again),
410 for a future that has expired. A failed op is a 200 ``RequestFailedResponse`` (``error`` + ``category``),
which the client raises as ``RequestFailedError``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from tensafe.runtime.errors import InvalidArgument, TensafeError
from tensafe.runtime.http_edge import EdgeCaller, Failure, HttpEdge, domain_failure, request_id
from tg_tinker.errors import TGTinkerError

from . import wire
from .service import Box, Gateway, Outcome, check_id

log = logging.getLogger("tensafe.tinker")

PROTO = "application/x-protobuf"
KEY_PREFIX = "tml-"
MAX_BODY = 64 * 1024 * 1024
MAX_JSON = 4 * 1024 * 1024
LONG_POLL_SECONDS = 20.0
# The client's feature flags: what this server supports (no JWT exchange, no zstd bodies, no server-side custom
# losses, per-request future polling).
CLIENT_CONFIG = {"pjwt_auth_enabled": False, "credential_default_source": "api_key", "use_pyqwest_transport": False,
                 "proto_compress_fwdbwd": False, "parallel_fwdbwd_chunks": True, "sample_use_retrieve_futures": False,
                 "custom_loss_server_side": False, "sample_join_sampling_session": False,
                 "fwdbwd_max_chunk_len": 256, "sample_no_retries": False}


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, "detail": message, **extra}, status_code=status,
                        headers={"x-should-retry": "false"} if 400 <= status < 500 else None)


def sdk_failure(exc: TGTinkerError) -> Failure:
    """A failed call to the services (through tg_tinker) as the edge shows it: its gRPC code kept."""
    code = next((c for c in grpc.StatusCode if c.name == exc.code), grpc.StatusCode.INTERNAL)
    return Failure(code, exc.code, exc.message, getattr(exc, "field", None))


def future_json(box: Box, **extra: Any) -> dict[str, Any]:
    return {"request_id": box.request_id, **extra}


def build_app(edge: HttpEdge, gateway: Gateway) -> FastAPI:
    app = FastAPI(title="TenSafe Tinker-compatible API", docs_url=None, redoc_url=None, openapi_url=None)

    async def caller_of(request: Request) -> EdgeCaller:
        rid = request_id(request.headers.get("x-request-id"))
        key = request.headers.get("x-api-key", "")
        if key.startswith(KEY_PREFIX):
            key = key[len(KEY_PREFIX):]
        return await run_in_threadpool(edge.authenticate, f"Bearer {key}" if key else None, rid)

    async def handle(request: Request, action: str, fn: Callable[[EdgeCaller, Any], Awaitable[Response] | Response],
                     *, body: str = "json", auth: bool = True) -> Response:
        caller: EdgeCaller | None = None
        raw = b""
        rid = request_id(request.headers.get("x-request-id"))
        try:
            raw = await request.body()
            if len(raw) > (MAX_BODY if body == "proto" else MAX_JSON):
                raise InvalidArgument("body", "is too large")
            if auth:
                caller = await caller_of(request)
            if body == "json":
                import json

                try:
                    payload = json.loads(raw) if raw else {}
                except ValueError:
                    raise InvalidArgument("body", "is not JSON") from None
                if not isinstance(payload, dict):
                    raise InvalidArgument("body", "must be a JSON object")
            else:
                payload = raw
            result = fn(caller, payload)  # type: ignore[arg-type]
            response = await result if asyncio.iscoroutine(result) else result
            assert isinstance(response, Response)
        except (TensafeError, TGTinkerError) as exc:
            failure = domain_failure(exc) if isinstance(exc, TensafeError) else sdk_failure(exc)
            edge.record(action, caller, caller.request_id if caller else rid, failure, body=raw)
            msg = failure.message + (f" (field {failure.field})" if failure.field else "")
            return _error(failure.status, f"{failure.code.name}: {msg}", field=failure.field, reason=failure.reason)
        except Exception as exc:  # a bug: answered (and logged), so that the caller sees it
            log.exception("%s failed", action)
            failure = Failure(grpc.StatusCode.INTERNAL, "INTERNAL", f"{type(exc).__name__}: {exc}")
            edge.record(action, caller, caller.request_id if caller else rid, failure, body=raw)
            return _error(500, f"INTERNAL: {failure.message}")
        edge.record(action, caller, caller.request_id if caller else rid, body=raw)
        return response

    def blocking(fn: Callable[..., Any]) -> Callable[[EdgeCaller, Any], Awaitable[Response]]:
        async def run(caller: EdgeCaller, payload: Any) -> Response:
            out = await run_in_threadpool(fn, caller, payload)
            return out if isinstance(out, Response) else JSONResponse(out)
        return run

    # -- client setup, health, telemetry -----------------------------------------------------------
    @app.get("/api/v1/healthz")
    async def healthz() -> Response:
        return JSONResponse({"status": "ok"})

    @app.post("/api/v1/client/config")
    async def client_config(request: Request) -> Response:
        return await handle(request, "tinker.ClientConfig", lambda c, p: JSONResponse(CLIENT_CONFIG))

    @app.post("/api/v1/client/dynamic_config")
    async def dynamic_config(request: Request) -> Response:
        return JSONResponse({"refresh_interval_sec": 300, "sample_cancel_enabled": False})

    @app.post("/api/v1/telemetry")
    async def telemetry(request: Request) -> Response:
        return JSONResponse({"status": "accepted"})  # the client's own diagnostics: not kept

    @app.get("/api/v1/get_server_capabilities")
    async def capabilities(request: Request) -> Response:
        return await handle(request, "tinker.GetServerCapabilities",
                            lambda c, p: JSONResponse({"supported_models": gateway.capabilities()}))

    # -- sessions ------------------------------------------------------------------------------------
    @app.post("/api/v1/create_session")
    async def create_session(request: Request) -> Response:
        return await handle(request, "tinker.CreateSession", lambda c, p: JSONResponse(
            {"type": "create_session", "session_id": gateway.create_session(c)}))

    @app.post("/api/v1/session_heartbeat")
    async def heartbeat(request: Request) -> Response:
        def beat(c: EdgeCaller, p: dict[str, Any]) -> Response:
            alive = gateway.heartbeat(c, p.get("session_id"))  # type: ignore[arg-type]
            return JSONResponse({"type": "session_heartbeat"}) if alive else _error(410, "session finished")
        return await handle(request, "tinker.SessionHeartbeat", beat)

    @app.post("/api/v1/sessions/{session_id}/finish")
    async def finish(session_id: str, request: Request) -> Response:
        return await handle(request, "tinker.FinishSession",
                            lambda c, p: (gateway.finish_session(c, session_id), JSONResponse({}))[1])

    # -- models ---------------------------------------------------------------------------------------
    @app.post("/api/v1/create_model")
    async def create_model(request: Request) -> Response:
        def create(c: EdgeCaller, p: dict[str, Any]) -> Response:
            seq = p.get("model_seq_id")
            if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
                raise InvalidArgument("model_seq_id", "must be an integer >= 0")
            lora = p.get("lora_config")
            if not isinstance(lora, dict):
                raise InvalidArgument("lora_config", "is required (TenSafe trains LoRA adapters)")
            opt = (p.get("optimizer_config") or {}).get("type", "adamw")
            if opt != "adamw":
                raise InvalidArgument("optimizer_config.type", f"only adamw is supported, not {opt!r}")
            box = gateway.create_model(c, p.get("session_id"), seq, p.get("base_model"), lora,  # type: ignore[arg-type]
                                       lora.get("seed"))
            return JSONResponse(future_json(box, model_id=f"{p.get('session_id')}:train:{seq}"))
        return await handle(request, "tinker.CreateModel", blocking(create))

    @app.post("/api/v1/get_info")
    async def get_info(request: Request) -> Response:
        return await handle(request, "tinker.GetInfo",
                            lambda c, p: JSONResponse(gateway.get_info(c, p.get("model_id"))))

    @app.post("/api/v1/forward_backward")
    async def forward_backward(request: Request) -> Response:
        def run(c: EdgeCaller, body: bytes) -> Response:
            if request.headers.get("content-encoding"):
                raise InvalidArgument("content-encoding", "compressed bodies are not supported")
            call = wire.decode_forward_backward(body)
            box = gateway.forward_backward(c, call)
            return JSONResponse(future_json(box, model_id=call.model_id))
        return await handle(request, "tinker.ForwardBackward", blocking(run), body="proto")

    @app.post("/api/v1/optim_step")
    async def optim_step(request: Request) -> Response:
        def run(c: EdgeCaller, p: dict[str, Any]) -> Response:
            adam = p.get("adam_params")
            if not isinstance(adam, dict):
                raise InvalidArgument("adam_params", "required: only Adam(W) steps are supported")
            box = gateway.optim_step(c, p.get("model_id"), p.get("seq_id"), adam)  # type: ignore[arg-type]
            return JSONResponse(future_json(box, model_id=p.get("model_id")))
        return await handle(request, "tinker.OptimStep", blocking(run))

    def save(for_sampler: bool) -> Callable[[EdgeCaller, dict[str, Any]], Response]:
        def run(c: EdgeCaller, p: dict[str, Any]) -> Response:
            box = gateway.save_weights(c, p.get("model_id"), p.get("seq_id"), p.get("path"),  # type: ignore[arg-type]
                                       for_sampler, p.get("sampling_session_seq_id"))
            return JSONResponse(future_json(box, model_id=p.get("model_id")))
        return run

    @app.post("/api/v1/save_weights")
    async def save_weights(request: Request) -> Response:
        return await handle(request, "tinker.SaveWeights", blocking(save(False)))

    @app.post("/api/v1/save_weights_for_sampler")
    async def save_weights_for_sampler(request: Request) -> Response:
        return await handle(request, "tinker.SaveWeightsForSampler", blocking(save(True)))

    @app.post("/api/v1/load_weights")
    async def load_weights(request: Request) -> Response:
        def run(c: EdgeCaller, p: dict[str, Any]) -> Response:
            box = gateway.load_weights(c, p)
            return JSONResponse(future_json(box))
        return await handle(request, "tinker.LoadWeights", blocking(run))

    # -- futures ----------------------------------------------------------------------------------------
    @app.post("/api/v1/retrieve_future")
    async def retrieve_future(request: Request) -> Response:
        async def run(c: EdgeCaller, p: dict[str, Any]) -> Response:
            rid = check_id(p.get("request_id"), "request_id")
            box = gateway.futures.get(c.tenant_id, rid)
            if box is None:
                return _error(410, f"future {rid} has expired")
            try:
                outcome: Outcome = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(box.future)),
                                                          LONG_POLL_SECONDS)
            except TimeoutError:
                return JSONResponse({"type": "try_again", "request_id": rid, "queue_state": "active"},
                                    status_code=408)
            if outcome.error is not None:
                return JSONResponse({"error": outcome.error, "category": outcome.category})
            if outcome.proto is not None:
                return Response(outcome.proto, media_type=PROTO)
            return JSONResponse(outcome.json)
        return await handle(request, "tinker.RetrieveFuture", run)

    @app.post("/api/v1/cancel_future")
    async def cancel_future(request: Request) -> Response:
        return await handle(request, "tinker.CancelFuture", lambda c, p: JSONResponse({}))

    # -- sampling ----------------------------------------------------------------------------------------
    @app.post("/api/v1/create_sampling_session")
    async def create_sampling_session(request: Request) -> Response:
        def run(c: EdgeCaller, p: dict[str, Any]) -> Response:
            seq = p.get("sampling_session_seq_id")
            if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
                raise InvalidArgument("sampling_session_seq_id", "must be an integer >= 0")
            sid = gateway.create_sampling_session(c, p.get("session_id"), seq, p.get("model_path"),  # type: ignore[arg-type]
                                                  p.get("base_model"))
            return JSONResponse({"type": "create_sampling_session", "sampling_session_id": sid})
        return await handle(request, "tinker.CreateSamplingSession", blocking(run))

    @app.get("/api/v1/samplers/{sampler_id}")
    async def get_sampler(sampler_id: str, request: Request) -> Response:
        return await handle(request, "tinker.GetSampler",
                            lambda c, p: JSONResponse(gateway.sampler_info(c, sampler_id)))

    @app.post("/api/v1/asample")
    async def asample(request: Request) -> Response:
        def run(c: EdgeCaller, p: dict[str, Any]) -> Response:
            box, seq_ids = gateway.sample(c, p)
            return JSONResponse(future_json(box, sample_sequence_ids=seq_ids))
        return await handle(request, "tinker.Sample", blocking(run))

    # -- checkpoints ---------------------------------------------------------------------------------------
    @app.get("/api/v1/training_runs/{run}/checkpoints")
    async def list_checkpoints(run: str, request: Request) -> Response:
        def run_(c: EdgeCaller, p: Any) -> Response:
            cps = gateway.list_checkpoints(c, run)
            return JSONResponse({"checkpoints": cps, "cursor": None})
        return await handle(request, "tinker.ListCheckpoints", blocking(run_))

    @app.delete("/api/v1/training_runs/{run}/checkpoints/{checkpoint_id:path}")
    async def delete_checkpoint(run: str, checkpoint_id: str, request: Request) -> Response:
        def run_(c: EdgeCaller, p: Any) -> Response:
            gateway.delete_checkpoint(c, run, checkpoint_id)
            return JSONResponse({})
        return await handle(request, "tinker.DeleteCheckpoint", blocking(run_))

    return app
