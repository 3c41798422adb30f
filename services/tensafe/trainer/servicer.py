"""gRPC adapter of the trainer service.

Until issue #3 (training sessions) lands, every RPC of TrainerService answers UNIMPLEMENTED
(reason NOT_IMPLEMENTED): nothing here pretends to work.
"""

from tensafe.api.trainer.v1 import trainer_pb2_grpc
from tensafe.runtime.registry import ServiceEnvironment


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, env: ServiceEnvironment) -> None:
        self.env = env


def create(env: ServiceEnvironment) -> TrainerServicer:
    return TrainerServicer(env)
