"""gRPC adapter of the inference service.

Until issue #8 (inference) lands, every RPC of InferenceService answers UNIMPLEMENTED
(reason NOT_IMPLEMENTED): nothing here pretends to work.
"""

from tensafe.api.inference.v1 import inference_pb2_grpc
from tensafe.runtime.registry import ServiceEnvironment


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, env: ServiceEnvironment) -> None:
        self.env = env


def create(env: ServiceEnvironment) -> InferenceServicer:
    return InferenceServicer(env)
