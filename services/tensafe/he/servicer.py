"""gRPC adapter of the he service.

Until issue #7 (HE-LoRA) lands, every RPC of HeService answers UNIMPLEMENTED
(reason NOT_IMPLEMENTED): nothing here pretends to work.
"""

from tensafe.api.he.v1 import he_pb2_grpc
from tensafe.runtime.registry import ServiceEnvironment


class HeServicer(he_pb2_grpc.HeServiceServicer):
    def __init__(self, env: ServiceEnvironment) -> None:
        self.env = env


def create(env: ServiceEnvironment) -> HeServicer:
    return HeServicer(env)
