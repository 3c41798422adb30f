import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from tensafe.api.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ArtifactKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ARTIFACT_KIND_UNSPECIFIED: _ClassVar[ArtifactKind]
    ARTIFACT_KIND_CHECKPOINT: _ClassVar[ArtifactKind]
    ARTIFACT_KIND_ADAPTER: _ClassVar[ArtifactKind]
    ARTIFACT_KIND_OTHER: _ClassVar[ArtifactKind]

class ArtifactState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ARTIFACT_STATE_UNSPECIFIED: _ClassVar[ArtifactState]
    ARTIFACT_STATE_AVAILABLE: _ClassVar[ArtifactState]
    ARTIFACT_STATE_SHREDDED: _ClassVar[ArtifactState]

class KekState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KEK_STATE_UNSPECIFIED: _ClassVar[KekState]
    KEK_STATE_ACTIVE: _ClassVar[KekState]
    KEK_STATE_RETIRED: _ClassVar[KekState]
    KEK_STATE_DESTROYED: _ClassVar[KekState]
ARTIFACT_KIND_UNSPECIFIED: ArtifactKind
ARTIFACT_KIND_CHECKPOINT: ArtifactKind
ARTIFACT_KIND_ADAPTER: ArtifactKind
ARTIFACT_KIND_OTHER: ArtifactKind
ARTIFACT_STATE_UNSPECIFIED: ArtifactState
ARTIFACT_STATE_AVAILABLE: ArtifactState
ARTIFACT_STATE_SHREDDED: ArtifactState
KEK_STATE_UNSPECIFIED: KekState
KEK_STATE_ACTIVE: KekState
KEK_STATE_RETIRED: KekState
KEK_STATE_DESTROYED: KekState

class Artifact(_message.Message):
    __slots__ = ("artifact_id", "tenant_id", "kind", "name", "size_bytes", "plaintext_sha256", "create_time", "encryption", "metadata", "content_type", "session_id", "stored_size_bytes", "state", "lineage")
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PLAINTEXT_SHA256_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTION_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STORED_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_FIELD_NUMBER: _ClassVar[int]
    artifact_id: str
    tenant_id: str
    kind: ArtifactKind
    name: str
    size_bytes: int
    plaintext_sha256: bytes
    create_time: _timestamp_pb2.Timestamp
    encryption: _common_pb2.EncryptionInfo
    metadata: _struct_pb2.Struct
    content_type: str
    session_id: str
    stored_size_bytes: int
    state: ArtifactState
    lineage: _common_pb2.Lineage
    def __init__(self, artifact_id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., kind: _Optional[_Union[ArtifactKind, str]] = ..., name: _Optional[str] = ..., size_bytes: _Optional[int] = ..., plaintext_sha256: _Optional[bytes] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., encryption: _Optional[_Union[_common_pb2.EncryptionInfo, _Mapping]] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., content_type: _Optional[str] = ..., session_id: _Optional[str] = ..., stored_size_bytes: _Optional[int] = ..., state: _Optional[_Union[ArtifactState, str]] = ..., lineage: _Optional[_Union[_common_pb2.Lineage, _Mapping]] = ...) -> None: ...

class PutArtifactHeader(_message.Message):
    __slots__ = ("kind", "name", "metadata", "content_type", "session_id", "expected_sha256", "lineage", "lineage_mac")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_SHA256_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_MAC_FIELD_NUMBER: _ClassVar[int]
    kind: ArtifactKind
    name: str
    metadata: _struct_pb2.Struct
    content_type: str
    session_id: str
    expected_sha256: bytes
    lineage: _common_pb2.Lineage
    lineage_mac: bytes
    def __init__(self, kind: _Optional[_Union[ArtifactKind, str]] = ..., name: _Optional[str] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., content_type: _Optional[str] = ..., session_id: _Optional[str] = ..., expected_sha256: _Optional[bytes] = ..., lineage: _Optional[_Union[_common_pb2.Lineage, _Mapping]] = ..., lineage_mac: _Optional[bytes] = ...) -> None: ...

class PutArtifactRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: PutArtifactHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[PutArtifactHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class PutArtifactResponse(_message.Message):
    __slots__ = ("artifact",)
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    artifact: Artifact
    def __init__(self, artifact: _Optional[_Union[Artifact, _Mapping]] = ...) -> None: ...

class GetArtifactRequest(_message.Message):
    __slots__ = ("artifact_id",)
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    artifact_id: str
    def __init__(self, artifact_id: _Optional[str] = ...) -> None: ...

class GetArtifactResponse(_message.Message):
    __slots__ = ("artifact", "chunk")
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    artifact: Artifact
    chunk: bytes
    def __init__(self, artifact: _Optional[_Union[Artifact, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class PullArtifactRequest(_message.Message):
    __slots__ = ("artifact_id",)
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    artifact_id: str
    def __init__(self, artifact_id: _Optional[str] = ...) -> None: ...

class PullArtifactResponse(_message.Message):
    __slots__ = ("artifact", "chunk")
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    artifact: Artifact
    chunk: bytes
    def __init__(self, artifact: _Optional[_Union[Artifact, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class DescribeArtifactRequest(_message.Message):
    __slots__ = ("artifact_id",)
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    artifact_id: str
    def __init__(self, artifact_id: _Optional[str] = ...) -> None: ...

class DescribeArtifactResponse(_message.Message):
    __slots__ = ("artifact",)
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    artifact: Artifact
    def __init__(self, artifact: _Optional[_Union[Artifact, _Mapping]] = ...) -> None: ...

class ListArtifactsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "kind", "session_id")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    kind: ArtifactKind
    session_id: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., kind: _Optional[_Union[ArtifactKind, str]] = ..., session_id: _Optional[str] = ...) -> None: ...

class ListArtifactsResponse(_message.Message):
    __slots__ = ("artifacts", "next_page_token")
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    artifacts: _containers.RepeatedCompositeFieldContainer[Artifact]
    next_page_token: str
    def __init__(self, artifacts: _Optional[_Iterable[_Union[Artifact, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteArtifactRequest(_message.Message):
    __slots__ = ("artifact_id",)
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    artifact_id: str
    def __init__(self, artifact_id: _Optional[str] = ...) -> None: ...

class DeleteArtifactResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UnwrapDataKeyRequest(_message.Message):
    __slots__ = ("artifact_id",)
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    artifact_id: str
    def __init__(self, artifact_id: _Optional[str] = ...) -> None: ...

class UnwrapDataKeyResponse(_message.Message):
    __slots__ = ("artifact_id", "data_key", "encryption")
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_KEY_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTION_FIELD_NUMBER: _ClassVar[int]
    artifact_id: str
    data_key: bytes
    encryption: _common_pb2.EncryptionInfo
    def __init__(self, artifact_id: _Optional[str] = ..., data_key: _Optional[bytes] = ..., encryption: _Optional[_Union[_common_pb2.EncryptionInfo, _Mapping]] = ...) -> None: ...

class KekVersion(_message.Message):
    __slots__ = ("version", "state", "wrapped_key_count", "create_time")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    WRAPPED_KEY_COUNT_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    version: int
    state: KekState
    wrapped_key_count: int
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, version: _Optional[int] = ..., state: _Optional[_Union[KekState, str]] = ..., wrapped_key_count: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class TenantKeyInfo(_message.Message):
    __slots__ = ("tenant_id", "key_id", "current_version", "versions", "shredded", "shred_time")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    CURRENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    SHREDDED_FIELD_NUMBER: _ClassVar[int]
    SHRED_TIME_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    key_id: str
    current_version: int
    versions: _containers.RepeatedCompositeFieldContainer[KekVersion]
    shredded: bool
    shred_time: _timestamp_pb2.Timestamp
    def __init__(self, tenant_id: _Optional[str] = ..., key_id: _Optional[str] = ..., current_version: _Optional[int] = ..., versions: _Optional[_Iterable[_Union[KekVersion, _Mapping]]] = ..., shredded: _Optional[bool] = ..., shred_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RotateTenantKeyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RotateTenantKeyResponse(_message.Message):
    __slots__ = ("key_info", "rewrapped_count")
    KEY_INFO_FIELD_NUMBER: _ClassVar[int]
    REWRAPPED_COUNT_FIELD_NUMBER: _ClassVar[int]
    key_info: TenantKeyInfo
    rewrapped_count: int
    def __init__(self, key_info: _Optional[_Union[TenantKeyInfo, _Mapping]] = ..., rewrapped_count: _Optional[int] = ...) -> None: ...

class ShredTenantRequest(_message.Message):
    __slots__ = ("confirm_tenant_id",)
    CONFIRM_TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    confirm_tenant_id: str
    def __init__(self, confirm_tenant_id: _Optional[str] = ...) -> None: ...

class ShredTenantResponse(_message.Message):
    __slots__ = ("key_info", "artifact_count")
    KEY_INFO_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_COUNT_FIELD_NUMBER: _ClassVar[int]
    key_info: TenantKeyInfo
    artifact_count: int
    def __init__(self, key_info: _Optional[_Union[TenantKeyInfo, _Mapping]] = ..., artifact_count: _Optional[int] = ...) -> None: ...

class GetTenantKeyInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetTenantKeyInfoResponse(_message.Message):
    __slots__ = ("key_info",)
    KEY_INFO_FIELD_NUMBER: _ClassVar[int]
    key_info: TenantKeyInfo
    def __init__(self, key_info: _Optional[_Union[TenantKeyInfo, _Mapping]] = ...) -> None: ...
