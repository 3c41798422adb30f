"""gRPC adapter of the inference service: tenant and request in (as plain values: the backend's name, the
sampling parameters checked by the shared rules), `Inference` called, chunks streamed out (a caller that goes
away cancels its generation); and `create`, which builds the service and its backends."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

from tensafe.api.common.v1 import common_pb2
from tensafe.api.inference.v1 import inference_pb2, inference_pb2_grpc
from tensafe.common import devices
from tensafe.runtime import context
from tensafe.runtime.errors import InvalidArgument
from tensafe.runtime.messages import enum_value
from tensafe.runtime.pagination import page_request
from tensafe.runtime.registry import ServiceEnvironment
from tensafe.runtime.vault_client import VaultClient

from .adapter import LoadedAdapter
from .backend import Backend
from .generation import sampling_from_proto
from .service import Inference

BACKEND_ENUM = {"hf": inference_pb2.BACKEND_HF, "vllm": inference_pb2.BACKEND_VLLM}
BACKEND_NAME = {v: k for k, v in BACKEND_ENUM.items()}


def backend_name(value: inference_pb2.Backend) -> str:
    """The backend a request names ("" for the server's default)."""
    if value and value not in BACKEND_NAME:
        raise InvalidArgument("backend", f"unknown backend {value}")
    return BACKEND_NAME.get(value, "")


def adapter_proto(a: LoadedAdapter) -> inference_pb2.Adapter:
    msg = inference_pb2.Adapter(
        adapter_id=a.adapter_id, tenant_id=a.tenant_id, artifact_id=a.artifact_id, base_model_ref=a.base_model_ref,
        backend=BACKEND_ENUM[a.backend], rank=a.rank, alpha=a.alpha, target_modules=a.target_modules)
    msg.load_time.FromNanoseconds(int(a.load_time * 1e9))
    return msg


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, inference: Inference) -> None:
        self.inference = inference

    def LoadAdapter(self, request: inference_pb2.LoadAdapterRequest,
                    ctx: grpc.ServicerContext) -> inference_pb2.LoadAdapterResponse:
        adapter = self.inference.load_adapter(context.current(), request.artifact_id, backend_name(request.backend),
                                              request.base_model_ref)
        return inference_pb2.LoadAdapterResponse(adapter=adapter_proto(adapter))

    def GetAdapter(self, request: inference_pb2.GetAdapterRequest,
                   ctx: grpc.ServicerContext) -> inference_pb2.GetAdapterResponse:
        adapter = self.inference.get(context.current_tenant(), request.adapter_id)
        return inference_pb2.GetAdapterResponse(adapter=adapter_proto(adapter))

    def ListAdapters(self, request: inference_pb2.ListAdaptersRequest,
                     ctx: grpc.ServicerContext) -> inference_pb2.ListAdaptersResponse:
        req = page_request("inference.ListAdapters", request.page_size, request.page_token, (float, str))
        page, token = req.page(self.inference.list(context.current_tenant(), req.after, req.limit),
                               key=lambda a: (a.load_time, a.adapter_id))
        return inference_pb2.ListAdaptersResponse(adapters=[adapter_proto(a) for a in page], next_page_token=token)

    def UnloadAdapter(self, request: inference_pb2.UnloadAdapterRequest,
                      ctx: grpc.ServicerContext) -> inference_pb2.UnloadAdapterResponse:
        self.inference.unload(context.current_tenant(), request.adapter_id)
        return inference_pb2.UnloadAdapterResponse()

    def Generate(self, request: inference_pb2.GenerateRequest,
                 ctx: grpc.ServicerContext) -> Iterator[inference_pb2.GenerateResponse]:
        sampling = sampling_from_proto(request.sampling)
        prompt_ids = [list(p.token_ids) for p in request.prompt_token_ids]
        cancelled = threading.Event()
        ctx.add_callback(cancelled.set)  # the client went away (or the call ended): stop generating
        try:
            chats = [[(m.role, m.content) for m in chat.messages] for chat in request.chats]
            generation = self.inference.generate(context.current_tenant(), request.adapter_id, request.model_ref,
                                                 backend_name(request.backend), list(request.prompts), prompt_ids,
                                                 sampling, cancelled, chats)
            for chunk in generation.chunks:
                yield inference_pb2.GenerateResponse(
                    prompt_index=chunk.prompt_index, sample_index=chunk.sample_index, text=chunk.text,
                    token_ids=chunk.token_ids, logprobs=chunk.logprobs,
                    finish_reason=enum_value(common_pb2.FinishReason, chunk.finish_reason),
                    prompt_tokens=generation.prompt_tokens[chunk.prompt_index] if chunk.finish_reason else 0)
        finally:
            cancelled.set()

    def GetCapabilities(self, request: inference_pb2.GetCapabilitiesRequest,
                        ctx: grpc.ServicerContext) -> inference_pb2.GetCapabilitiesResponse:
        return inference_pb2.GetCapabilitiesResponse(
            models=[inference_pb2.BaseModel(name=name) for name in self.inference.base_models()])


def _backends(env: ServiceEnvironment) -> dict[str, Callable[[], Backend]]:
    cfg = env.config

    def hf() -> Backend:
        from .hf_backend import HFBackend

        return HFBackend()

    def vllm() -> Backend:
        from .vllm_backend import VLLMBackend

        return VLLMBackend(cfg.vllm_gpu_memory_utilization, cfg.vllm_max_loras, cfg.vllm_max_lora_rank)

    return {"hf": hf, "vllm": vllm}


def create(env: ServiceEnvironment) -> InferenceServicer:
    devices.configure(env.config.device, env.config.dtype)  # a device this process cannot use stops the start
    model_dir = Path(env.config.model_dir) if env.config.model_dir else env.config.data_dir / "models"
    vault = VaultClient(env.peers, env.config.max_artifact_mb << 20)
    inference = Inference(model_dir, vault, env.config.inference_backend, _backends(env),
                          models=env.config.registered_models(), quota_adapters=env.config.quota_adapters,
                          max_sample_tokens=env.config.max_sample_tokens)
    env.closers.append(inference.shutdown)
    return InferenceServicer(inference)
