"""gRPC adapter of the ledger service.

Until issue #5 (audit ledger) lands, every RPC of LedgerService answers UNIMPLEMENTED
(reason NOT_IMPLEMENTED): nothing here pretends to work.
"""

from tensafe.api.ledger.v1 import ledger_pb2_grpc
from tensafe.runtime.registry import ServiceEnvironment


class LedgerServicer(ledger_pb2_grpc.LedgerServiceServicer):
    def __init__(self, env: ServiceEnvironment) -> None:
        self.env = env


def create(env: ServiceEnvironment) -> LedgerServicer:
    return LedgerServicer(env)
