"""gRPC adapter of the he service: messages in and out, the logic in service.py, the maths in compute.py."""

from __future__ import annotations

import grpc

from tensafe.api.he.v1 import he_pb2, he_pb2_grpc
from tensafe.runtime import context
from tensafe.runtime.adapter_artifact import AdapterArtifact, read_adapter_artifact
from tensafe.runtime.errors import InvalidArgument
from tensafe.runtime.messages import timestamp
from tensafe.runtime.pagination import page_request
from tensafe.runtime.registry import ServiceEnvironment

from .compute import Counts
from .service import ComputeResult, HeLimits, HeService, TokensResult, check_params
from .store import AdapterRecord, ContextRecord, HeStore

_PACKINGS = {he_pb2.PACKING_COLUMN: "column", he_pb2.PACKING_REPLICATED: "replicated"}


def context_proto(r: ContextRecord) -> he_pb2.HeContext:
    params = he_pb2.HeSchemeParams(scheme=he_pb2.HE_SCHEME_CKKS, poly_modulus_degree=r.poly_modulus_degree,
                                   coeff_mod_bit_sizes=list(r.coeff_mod_bit_sizes),
                                   global_scale=float(2 ** r.scale_bits), security_level=r.security_level)
    return he_pb2.HeContext(key_id=r.key_id, tenant_id=r.tenant_id, params=params, size_bytes=len(r.public_context),
                            sha256=r.sha256, has_relin_keys=r.has_relin_keys, has_galois_keys=False,
                            slot_count=r.poly_modulus_degree // 2, create_time=timestamp(r.created_at))


def counts_proto(c: Counts) -> he_pb2.OperationCounts:
    return he_pb2.OperationCounts(plaintext_multiplies=c.plaintext_multiplies, additions=c.additions,
                                  rotations=c.rotations, multiplicative_depth=c.multiplicative_depth,
                                  rescales=c.rescales, encryptions=c.encryptions,
                                  prepared_encryptions=c.prepared_encryptions)


class HeServicer(he_pb2_grpc.HeServiceServicer):
    def __init__(self, service: HeService) -> None:
        self.service = service

    def _adapter_proto(self, record: AdapterRecord) -> he_pb2.HeAdapter:
        msg = he_pb2.HeAdapter(adapter_id=record.adapter_id, tenant_id=record.tenant_id,
                               artifact_id=record.artifact_id, key_id=record.key_id,
                               create_time=timestamp(record.created_at))
        for layer in self.service.layer_info(record.tenant_id, record.adapter_id):
            msg.layers.add(name=layer.name, in_features=layer.in_features, out_features=layer.out_features,
                           rank=layer.rank, alpha=layer.alpha, scaling=layer.scaling)
        return msg

    # -- contexts ---------------------------------------------------------------------------------------
    def RegisterContext(self, request: he_pb2.RegisterContextRequest,
                        ctx: grpc.ServicerContext) -> he_pb2.RegisterContextResponse:
        p = request.params
        if p.scheme not in (he_pb2.HE_SCHEME_CKKS,):
            raise InvalidArgument("params.scheme", "must be HE_SCHEME_CKKS")
        params = check_params("ckks", p.poly_modulus_degree, list(p.coeff_mod_bit_sizes), p.global_scale,
                              p.security_level)
        record = self.service.register_context(context.current_tenant(), request.key_id, request.public_context,
                                               params)
        return he_pb2.RegisterContextResponse(context=context_proto(record))

    def GetContext(self, request: he_pb2.GetContextRequest, ctx: grpc.ServicerContext) -> he_pb2.GetContextResponse:
        return he_pb2.GetContextResponse(context=context_proto(
            self.service.get_context(context.current_tenant(), request.key_id)))

    def ListContexts(self, request: he_pb2.ListContextsRequest,
                     ctx: grpc.ServicerContext) -> he_pb2.ListContextsResponse:
        req = page_request("he.ListContexts", request.page_size, request.page_token, (float, str))
        records, token = req.page(self.service.list_contexts(context.current_tenant(), req.after, req.limit),
                                  key=lambda r: (r.created_at, r.key_id))
        return he_pb2.ListContextsResponse(contexts=[context_proto(r) for r in records], next_page_token=token)

    def DeleteContext(self, request: he_pb2.DeleteContextRequest,
                      ctx: grpc.ServicerContext) -> he_pb2.DeleteContextResponse:
        self.service.delete_context(context.current_tenant(), request.key_id)
        return he_pb2.DeleteContextResponse()

    # -- adapters ---------------------------------------------------------------------------------------
    def LoadAdapter(self, request: he_pb2.LoadAdapterRequest, ctx: grpc.ServicerContext) -> he_pb2.LoadAdapterResponse:
        record, _ = self.service.load_adapter(context.current_tenant(), request.artifact_id, request.key_id,
                                              list(request.layers))
        return he_pb2.LoadAdapterResponse(adapter=self._adapter_proto(record))

    def GetAdapter(self, request: he_pb2.GetAdapterRequest, ctx: grpc.ServicerContext) -> he_pb2.GetAdapterResponse:
        return he_pb2.GetAdapterResponse(adapter=self._adapter_proto(
            self.service.get_adapter(context.current_tenant(), request.adapter_id)))

    def ListAdapters(self, request: he_pb2.ListAdaptersRequest,
                     ctx: grpc.ServicerContext) -> he_pb2.ListAdaptersResponse:
        req = page_request("he.ListAdapters", request.page_size, request.page_token, (float, str))
        records, token = req.page(self.service.list_adapters(context.current_tenant(), req.after, req.limit),
                                  key=lambda r: (r.created_at, r.adapter_id))
        return he_pb2.ListAdaptersResponse(adapters=[self._adapter_proto(r) for r in records],
                                           next_page_token=token)

    def UnloadAdapter(self, request: he_pb2.UnloadAdapterRequest,
                      ctx: grpc.ServicerContext) -> he_pb2.UnloadAdapterResponse:
        self.service.unload_adapter(context.current_tenant(), request.adapter_id)
        return he_pb2.UnloadAdapterResponse()

    # -- compute ----------------------------------------------------------------------------------------
    def AppendInput(self, request: he_pb2.AppendInputRequest, ctx: grpc.ServicerContext) -> he_pb2.AppendInputResponse:
        comp, counts, timings = self.service.append_input(
            context.current_tenant(), request.computation_id, request.adapter_id, list(request.layers),
            request.num_tokens, request.offset, list(request.ciphertexts))
        return he_pb2.AppendInputResponse(computation_id=comp.computation_id, received=comp.received,
                                          complete=comp.complete, counts=counts_proto(counts),
                                          timings=he_pb2.ComputeTimings(**timings))

    def ComputeDelta(self, request: he_pb2.ComputeDeltaRequest,
                     ctx: grpc.ServicerContext) -> he_pb2.ComputeDeltaResponse:
        packing = _PACKINGS.get(request.packing)
        if packing is None:
            raise InvalidArgument("packing", "must be PACKING_COLUMN or PACKING_REPLICATED")
        result: ComputeResult = self.service.compute_delta(
            context.current_tenant(), request.adapter_id, list(request.layers), packing, list(request.ciphertexts),
            request.num_tokens, request.computation_id,
            [(li.layer, list(li.ciphertexts)) for li in request.layer_inputs], request.output_offset,
            request.output_count)
        resp = he_pb2.ComputeDeltaResponse(counts=counts_proto(result.counts),
                                           timings=he_pb2.ComputeTimings(**result.timings),
                                           computation_id=result.computation_id)
        for d in result.deltas:
            resp.deltas.add(layer=d.layer, ciphertexts=d.ciphertexts, counts=counts_proto(d.counts),
                            block_size=d.block_size, output_offset=d.output_offset, round=d.round)
        return resp

    def ComputeTokens(self, request: he_pb2.ComputeTokensRequest,
                      ctx: grpc.ServicerContext) -> he_pb2.ComputeTokensResponse:
        result: TokensResult = self.service.compute_tokens(
            context.current_tenant(), request.adapter_id, list(request.layers), list(request.ciphertexts),
            request.computation_id)
        lay = result.layout
        resp = he_pb2.ComputeTokensResponse(computation_id=result.computation_id, round=result.round,
                                            counts=counts_proto(result.counts),
                                            timings=he_pb2.ComputeTimings(**result.timings))
        two = [he_pb2.TokenLayerSpan(layer=ly.name, first_block=start, blocks=span)
               for ly, start, span in zip(lay.layers, lay.starts, lay.spans, strict=True)]
        if result.round == 1:
            resp.block_size, resp.blocks_per_ciphertext = lay.block, lay.per
            resp.spans.extend(he_pb2.TokenLayerSpan(layer=ly.name, first_block=row, blocks=ly.rank)
                              for ly, row in zip(lay.layers, lay.rows, strict=True))
            resp.round_two_block_size = lay.block2
            resp.round_two_spans.extend(two)
        else:
            resp.block_size, resp.blocks_per_ciphertext = lay.block2, lay.per2
            resp.spans.extend(two)
        for cts in result.tokens:
            resp.tokens.add(ciphertexts=cts)
        return resp


def create(env: ServiceEnvironment) -> HeServicer:
    from tensafe.runtime.vault_client import VaultClient

    vault = VaultClient(env.peers, env.config.max_artifact_mb << 20)

    def read_artifact(artifact_id: str) -> AdapterArtifact:
        _, data = vault.get(context.current(), artifact_id)
        return read_adapter_artifact(data, vault.max_artifact_bytes)

    cfg = env.config
    limits = HeLimits(computations=cfg.quota_he_computations, max_rank=cfg.he_max_rank, max_dim=cfg.he_max_dim,
                      max_layers=cfg.he_max_layers)
    service = HeService(HeStore(env.db), read_artifact, cfg.max_message_mb << 20, limits=limits)
    env.closers.append(service.close)
    return HeServicer(service)
