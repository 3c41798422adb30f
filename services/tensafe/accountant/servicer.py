"""gRPC adapter of the accountant service.

Until issue #6 (privacy accounting) lands, every RPC of AccountantService answers UNIMPLEMENTED
(reason NOT_IMPLEMENTED): nothing here pretends to work.
"""

from tensafe.api.accountant.v1 import accountant_pb2_grpc
from tensafe.runtime.registry import ServiceEnvironment


class AccountantServicer(accountant_pb2_grpc.AccountantServiceServicer):
    def __init__(self, env: ServiceEnvironment) -> None:
        self.env = env


def create(env: ServiceEnvironment) -> AccountantServicer:
    return AccountantServicer(env)
