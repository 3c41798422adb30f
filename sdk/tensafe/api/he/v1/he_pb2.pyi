import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HeScheme(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HE_SCHEME_UNSPECIFIED: _ClassVar[HeScheme]
    HE_SCHEME_CKKS: _ClassVar[HeScheme]

class Packing(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PACKING_UNSPECIFIED: _ClassVar[Packing]
    PACKING_COLUMN: _ClassVar[Packing]
    PACKING_REPLICATED: _ClassVar[Packing]
HE_SCHEME_UNSPECIFIED: HeScheme
HE_SCHEME_CKKS: HeScheme
PACKING_UNSPECIFIED: Packing
PACKING_COLUMN: Packing
PACKING_REPLICATED: Packing

class HeSchemeParams(_message.Message):
    __slots__ = ("scheme", "poly_modulus_degree", "coeff_mod_bit_sizes", "global_scale", "security_level")
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    POLY_MODULUS_DEGREE_FIELD_NUMBER: _ClassVar[int]
    COEFF_MOD_BIT_SIZES_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_SCALE_FIELD_NUMBER: _ClassVar[int]
    SECURITY_LEVEL_FIELD_NUMBER: _ClassVar[int]
    scheme: HeScheme
    poly_modulus_degree: int
    coeff_mod_bit_sizes: _containers.RepeatedScalarFieldContainer[int]
    global_scale: float
    security_level: int
    def __init__(self, scheme: _Optional[_Union[HeScheme, str]] = ..., poly_modulus_degree: _Optional[int] = ..., coeff_mod_bit_sizes: _Optional[_Iterable[int]] = ..., global_scale: _Optional[float] = ..., security_level: _Optional[int] = ...) -> None: ...

class HeContext(_message.Message):
    __slots__ = ("key_id", "tenant_id", "params", "size_bytes", "sha256", "has_relin_keys", "has_galois_keys", "slot_count", "create_time")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    HAS_RELIN_KEYS_FIELD_NUMBER: _ClassVar[int]
    HAS_GALOIS_KEYS_FIELD_NUMBER: _ClassVar[int]
    SLOT_COUNT_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    tenant_id: str
    params: HeSchemeParams
    size_bytes: int
    sha256: bytes
    has_relin_keys: bool
    has_galois_keys: bool
    slot_count: int
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, key_id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., params: _Optional[_Union[HeSchemeParams, _Mapping]] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[bytes] = ..., has_relin_keys: _Optional[bool] = ..., has_galois_keys: _Optional[bool] = ..., slot_count: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class LayerInfo(_message.Message):
    __slots__ = ("name", "in_features", "out_features", "rank", "alpha", "scaling")
    NAME_FIELD_NUMBER: _ClassVar[int]
    IN_FEATURES_FIELD_NUMBER: _ClassVar[int]
    OUT_FEATURES_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    SCALING_FIELD_NUMBER: _ClassVar[int]
    name: str
    in_features: int
    out_features: int
    rank: int
    alpha: float
    scaling: float
    def __init__(self, name: _Optional[str] = ..., in_features: _Optional[int] = ..., out_features: _Optional[int] = ..., rank: _Optional[int] = ..., alpha: _Optional[float] = ..., scaling: _Optional[float] = ...) -> None: ...

class HeAdapter(_message.Message):
    __slots__ = ("adapter_id", "tenant_id", "artifact_id", "key_id", "layers", "create_time")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    tenant_id: str
    artifact_id: str
    key_id: str
    layers: _containers.RepeatedCompositeFieldContainer[LayerInfo]
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, adapter_id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., artifact_id: _Optional[str] = ..., key_id: _Optional[str] = ..., layers: _Optional[_Iterable[_Union[LayerInfo, _Mapping]]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class OperationCounts(_message.Message):
    __slots__ = ("plaintext_multiplies", "additions", "rotations", "multiplicative_depth", "rescales", "encryptions", "prepared_encryptions")
    PLAINTEXT_MULTIPLIES_FIELD_NUMBER: _ClassVar[int]
    ADDITIONS_FIELD_NUMBER: _ClassVar[int]
    ROTATIONS_FIELD_NUMBER: _ClassVar[int]
    MULTIPLICATIVE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    RESCALES_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTIONS_FIELD_NUMBER: _ClassVar[int]
    PREPARED_ENCRYPTIONS_FIELD_NUMBER: _ClassVar[int]
    plaintext_multiplies: int
    additions: int
    rotations: int
    multiplicative_depth: int
    rescales: int
    encryptions: int
    prepared_encryptions: int
    def __init__(self, plaintext_multiplies: _Optional[int] = ..., additions: _Optional[int] = ..., rotations: _Optional[int] = ..., multiplicative_depth: _Optional[int] = ..., rescales: _Optional[int] = ..., encryptions: _Optional[int] = ..., prepared_encryptions: _Optional[int] = ...) -> None: ...

class ComputeTimings(_message.Message):
    __slots__ = ("deserialize_ms", "compute_ms", "serialize_ms", "total_ms", "load_ms")
    DESERIALIZE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    SERIALIZE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    LOAD_MS_FIELD_NUMBER: _ClassVar[int]
    deserialize_ms: float
    compute_ms: float
    serialize_ms: float
    total_ms: float
    load_ms: float
    def __init__(self, deserialize_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., serialize_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., load_ms: _Optional[float] = ...) -> None: ...

class LayerDelta(_message.Message):
    __slots__ = ("layer", "ciphertexts", "counts", "block_size", "output_offset", "round")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXTS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    layer: str
    ciphertexts: _containers.RepeatedScalarFieldContainer[bytes]
    counts: OperationCounts
    block_size: int
    output_offset: int
    round: int
    def __init__(self, layer: _Optional[str] = ..., ciphertexts: _Optional[_Iterable[bytes]] = ..., counts: _Optional[_Union[OperationCounts, _Mapping]] = ..., block_size: _Optional[int] = ..., output_offset: _Optional[int] = ..., round: _Optional[int] = ...) -> None: ...

class LayerInput(_message.Message):
    __slots__ = ("layer", "ciphertexts")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXTS_FIELD_NUMBER: _ClassVar[int]
    layer: str
    ciphertexts: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, layer: _Optional[str] = ..., ciphertexts: _Optional[_Iterable[bytes]] = ...) -> None: ...

class RegisterContextRequest(_message.Message):
    __slots__ = ("key_id", "public_context", "params")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    public_context: bytes
    params: HeSchemeParams
    def __init__(self, key_id: _Optional[str] = ..., public_context: _Optional[bytes] = ..., params: _Optional[_Union[HeSchemeParams, _Mapping]] = ...) -> None: ...

class RegisterContextResponse(_message.Message):
    __slots__ = ("context",)
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    context: HeContext
    def __init__(self, context: _Optional[_Union[HeContext, _Mapping]] = ...) -> None: ...

class GetContextRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    def __init__(self, key_id: _Optional[str] = ...) -> None: ...

class GetContextResponse(_message.Message):
    __slots__ = ("context",)
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    context: HeContext
    def __init__(self, context: _Optional[_Union[HeContext, _Mapping]] = ...) -> None: ...

class ListContextsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListContextsResponse(_message.Message):
    __slots__ = ("contexts", "next_page_token")
    CONTEXTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    contexts: _containers.RepeatedCompositeFieldContainer[HeContext]
    next_page_token: str
    def __init__(self, contexts: _Optional[_Iterable[_Union[HeContext, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteContextRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    def __init__(self, key_id: _Optional[str] = ...) -> None: ...

class DeleteContextResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LoadAdapterRequest(_message.Message):
    __slots__ = ("artifact_id", "key_id", "layers")
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    artifact_id: str
    key_id: str
    layers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, artifact_id: _Optional[str] = ..., key_id: _Optional[str] = ..., layers: _Optional[_Iterable[str]] = ...) -> None: ...

class LoadAdapterResponse(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: HeAdapter
    def __init__(self, adapter: _Optional[_Union[HeAdapter, _Mapping]] = ...) -> None: ...

class GetAdapterRequest(_message.Message):
    __slots__ = ("adapter_id",)
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    def __init__(self, adapter_id: _Optional[str] = ...) -> None: ...

class GetAdapterResponse(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: HeAdapter
    def __init__(self, adapter: _Optional[_Union[HeAdapter, _Mapping]] = ...) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters", "next_page_token")
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[HeAdapter]
    next_page_token: str
    def __init__(self, adapters: _Optional[_Iterable[_Union[HeAdapter, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class UnloadAdapterRequest(_message.Message):
    __slots__ = ("adapter_id",)
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    def __init__(self, adapter_id: _Optional[str] = ...) -> None: ...

class UnloadAdapterResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AppendInputRequest(_message.Message):
    __slots__ = ("computation_id", "adapter_id", "layers", "num_tokens", "offset", "ciphertexts")
    COMPUTATION_ID_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXTS_FIELD_NUMBER: _ClassVar[int]
    computation_id: str
    adapter_id: str
    layers: _containers.RepeatedScalarFieldContainer[str]
    num_tokens: int
    offset: int
    ciphertexts: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, computation_id: _Optional[str] = ..., adapter_id: _Optional[str] = ..., layers: _Optional[_Iterable[str]] = ..., num_tokens: _Optional[int] = ..., offset: _Optional[int] = ..., ciphertexts: _Optional[_Iterable[bytes]] = ...) -> None: ...

class AppendInputResponse(_message.Message):
    __slots__ = ("computation_id", "received", "complete", "counts", "timings")
    COMPUTATION_ID_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    computation_id: str
    received: int
    complete: bool
    counts: OperationCounts
    timings: ComputeTimings
    def __init__(self, computation_id: _Optional[str] = ..., received: _Optional[int] = ..., complete: _Optional[bool] = ..., counts: _Optional[_Union[OperationCounts, _Mapping]] = ..., timings: _Optional[_Union[ComputeTimings, _Mapping]] = ...) -> None: ...

class ComputeDeltaRequest(_message.Message):
    __slots__ = ("adapter_id", "layers", "packing", "ciphertexts", "num_tokens", "computation_id", "layer_inputs", "output_offset", "output_count")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    PACKING_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXTS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPUTATION_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_COUNT_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    layers: _containers.RepeatedScalarFieldContainer[str]
    packing: Packing
    ciphertexts: _containers.RepeatedScalarFieldContainer[bytes]
    num_tokens: int
    computation_id: str
    layer_inputs: _containers.RepeatedCompositeFieldContainer[LayerInput]
    output_offset: int
    output_count: int
    def __init__(self, adapter_id: _Optional[str] = ..., layers: _Optional[_Iterable[str]] = ..., packing: _Optional[_Union[Packing, str]] = ..., ciphertexts: _Optional[_Iterable[bytes]] = ..., num_tokens: _Optional[int] = ..., computation_id: _Optional[str] = ..., layer_inputs: _Optional[_Iterable[_Union[LayerInput, _Mapping]]] = ..., output_offset: _Optional[int] = ..., output_count: _Optional[int] = ...) -> None: ...

class ComputeDeltaResponse(_message.Message):
    __slots__ = ("deltas", "counts", "timings", "computation_id")
    DELTAS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    COMPUTATION_ID_FIELD_NUMBER: _ClassVar[int]
    deltas: _containers.RepeatedCompositeFieldContainer[LayerDelta]
    counts: OperationCounts
    timings: ComputeTimings
    computation_id: str
    def __init__(self, deltas: _Optional[_Iterable[_Union[LayerDelta, _Mapping]]] = ..., counts: _Optional[_Union[OperationCounts, _Mapping]] = ..., timings: _Optional[_Union[ComputeTimings, _Mapping]] = ..., computation_id: _Optional[str] = ...) -> None: ...

class ComputeTokensRequest(_message.Message):
    __slots__ = ("adapter_id", "layers", "ciphertexts", "computation_id")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXTS_FIELD_NUMBER: _ClassVar[int]
    COMPUTATION_ID_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    layers: _containers.RepeatedScalarFieldContainer[str]
    ciphertexts: _containers.RepeatedScalarFieldContainer[bytes]
    computation_id: str
    def __init__(self, adapter_id: _Optional[str] = ..., layers: _Optional[_Iterable[str]] = ..., ciphertexts: _Optional[_Iterable[bytes]] = ..., computation_id: _Optional[str] = ...) -> None: ...

class TokenLayerSpan(_message.Message):
    __slots__ = ("layer", "first_block", "blocks")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    FIRST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    layer: str
    first_block: int
    blocks: int
    def __init__(self, layer: _Optional[str] = ..., first_block: _Optional[int] = ..., blocks: _Optional[int] = ...) -> None: ...

class TokenCiphertexts(_message.Message):
    __slots__ = ("ciphertexts",)
    CIPHERTEXTS_FIELD_NUMBER: _ClassVar[int]
    ciphertexts: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, ciphertexts: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ComputeTokensResponse(_message.Message):
    __slots__ = ("computation_id", "round", "block_size", "blocks_per_ciphertext", "spans", "round_two_block_size", "round_two_spans", "tokens", "counts", "timings")
    COMPUTATION_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_PER_CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    SPANS_FIELD_NUMBER: _ClassVar[int]
    ROUND_TWO_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    ROUND_TWO_SPANS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    computation_id: str
    round: int
    block_size: int
    blocks_per_ciphertext: int
    spans: _containers.RepeatedCompositeFieldContainer[TokenLayerSpan]
    round_two_block_size: int
    round_two_spans: _containers.RepeatedCompositeFieldContainer[TokenLayerSpan]
    tokens: _containers.RepeatedCompositeFieldContainer[TokenCiphertexts]
    counts: OperationCounts
    timings: ComputeTimings
    def __init__(self, computation_id: _Optional[str] = ..., round: _Optional[int] = ..., block_size: _Optional[int] = ..., blocks_per_ciphertext: _Optional[int] = ..., spans: _Optional[_Iterable[_Union[TokenLayerSpan, _Mapping]]] = ..., round_two_block_size: _Optional[int] = ..., round_two_spans: _Optional[_Iterable[_Union[TokenLayerSpan, _Mapping]]] = ..., tokens: _Optional[_Iterable[_Union[TokenCiphertexts, _Mapping]]] = ..., counts: _Optional[_Union[OperationCounts, _Mapping]] = ..., timings: _Optional[_Union[ComputeTimings, _Mapping]] = ...) -> None: ...
