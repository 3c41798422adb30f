"""A typed view of the part of ``tenseal.sealapi`` (Microsoft SEAL's Python binding) that HE-LoRA uses.

TenSEAL ships no type information; these Protocols say what each SEAL object is used for here, and
the constructors below are the one place where its untyped values enter typed code.
"""

from __future__ import annotations

from typing import Any, Protocol, cast, runtime_checkable

__all__ = ["CKKSEncoder", "Ciphertext", "ContextData", "Decryptor", "Encryptor", "ParmsId", "Plaintext",
           "SEALContext", "Saveable", "SecretKey", "TenSEALContext", "ciphertext", "ckks_encoder", "decryptor",
           "encryptor", "plaintext"]


class ParmsId(Protocol):
    """SEAL's ``parms_id_type``: names one level of the modulus chain (opaque here)."""


class ContextData(Protocol):
    def chain_index(self) -> int: ...

    def next_context_data(self) -> ContextData: ...

    def parms_id(self) -> ParmsId: ...


class SEALContext(Protocol):
    def first_context_data(self) -> ContextData: ...

    def first_parms_id(self) -> ParmsId: ...

    def last_parms_id(self) -> ParmsId: ...


class SecretKey(Protocol):
    """A SEAL secret key (opaque here; it never leaves the key holder's process)."""


@runtime_checkable
class Saveable(Protocol):
    """A SEAL object that serialises itself to a file (SEAL's binding has no bytes API)."""

    def save(self, path: str) -> None: ...


class Ciphertext(Saveable, Protocol):
    scale: float

    def load(self, context: SEALContext, path: str) -> None: ...

    def size(self) -> int: ...

    def parms_id(self) -> ParmsId: ...

    def is_ntt_form(self) -> bool: ...


class Plaintext(Protocol):
    """An encoded (not encrypted) vector of slots."""


class CKKSEncoder(Protocol):
    def slot_count(self) -> int: ...

    def encode(self, values: list[float], parms_id: ParmsId, scale: float, destination: Plaintext) -> None: ...

    def decode_double(self, plain: Plaintext) -> list[float]: ...


class Encryptor(Protocol):
    def encrypt_symmetric(self, plain: Plaintext) -> Saveable: ...


class Decryptor(Protocol):
    def decrypt(self, encrypted: Ciphertext, destination: Plaintext) -> None: ...


class _Holder(Protocol):
    """TenSEAL's wrapper around a SEAL object: the object is ``.data``."""

    @property
    def data(self) -> Any: ...


class TenSEALContext(Protocol):
    """The TenSEAL context of a key bundle (what ``tenseal.context`` returns)."""

    def seal_context(self) -> _Holder: ...

    def secret_key(self) -> _Holder: ...


def _sealapi() -> Any:
    from tenseal import sealapi

    return sealapi


def ciphertext(context: SEALContext) -> Ciphertext:
    return cast(Ciphertext, _sealapi().Ciphertext(context))


def plaintext() -> Plaintext:
    return cast(Plaintext, _sealapi().Plaintext())


def ckks_encoder(context: SEALContext) -> CKKSEncoder:
    return cast(CKKSEncoder, _sealapi().CKKSEncoder(context))


def encryptor(context: SEALContext, secret: SecretKey) -> Encryptor:
    return cast(Encryptor, _sealapi().Encryptor(context, secret))


def decryptor(context: SEALContext, secret: SecretKey) -> Decryptor:
    return cast(Decryptor, _sealapi().Decryptor(context, secret))
