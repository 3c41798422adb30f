"""gRPC adapter of the vault service.

Until issue #4 (encrypted artifacts) lands, every RPC of VaultService answers UNIMPLEMENTED
(reason NOT_IMPLEMENTED): nothing here pretends to work.
"""

from tensafe.api.vault.v1 import vault_pb2_grpc
from tensafe.runtime.registry import ServiceEnvironment


class VaultServicer(vault_pb2_grpc.VaultServiceServicer):
    def __init__(self, env: ServiceEnvironment) -> None:
        self.env = env


def create(env: ServiceEnvironment) -> VaultServicer:
    return VaultServicer(env)
