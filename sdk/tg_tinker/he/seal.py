"""HE-LoRA at the level of Microsoft SEAL (``tenseal.sealapi``), for the SDK and the he service.

TenSEAL's ``CKKSVector`` API re-encodes every plaintext operand, encrypts only with the public key at
the top level and serialises through protobuf with compression; for one token that overhead is most
of the cost. Here the key holder encrypts ``x`` *symmetrically* (its own secret key; the ciphertext
travels in SEAL's seeded form, half the size) directly at the level with two data primes, the he
service multiplies, rescales once and returns ciphertexts at the last level (one prime), and both sides
exchange SEAL's own serialisation. The column path works the same way, with columns encrypted at the
top level (they are multiplied twice before the service rescales). Keys and parameters are those of
the bundle's TenSEAL context.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading

import numpy as np
from numpy.typing import ArrayLike, NDArray

from . import _sealapi as seal
from ._sealapi import Ciphertext, ParmsId, Saveable, SEALContext, SecretKey, TenSEALContext

# SEAL's Python binding saves and loads through file paths only: a private directory, in memory where
# the system has one. Ciphertexts only ever pass through it, never a key.
_scratch_dir: str | None = None
_scratch_lock = threading.Lock()


def _scratch() -> str:
    global _scratch_dir
    with _scratch_lock:
        if _scratch_dir is None or not os.path.isdir(_scratch_dir):
            base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
            _scratch_dir = tempfile.mkdtemp(prefix="tensafe-he-", dir=base)
            atexit.register(shutil.rmtree, _scratch_dir, True)
        return os.path.join(_scratch_dir, f"{os.getpid()}-{threading.get_ident()}.bin")


def to_bytes(obj: object) -> bytes:
    """SEAL's serialisation of a Ciphertext (or a seeded SerializableCiphertext); TypeError for anything else."""
    if not isinstance(obj, Saveable):
        raise TypeError(f"not a SEAL object that can be serialised: {type(obj).__name__}")
    path = _scratch()
    obj.save(path)
    with open(path, "rb") as fh:
        return fh.read()


def load_ciphertext(seal_context: SEALContext, data: bytes) -> Ciphertext:
    """A SEAL Ciphertext from its bytes; SEAL checks it is valid for ``seal_context`` (ValueError if not)."""
    ct = seal.ciphertext(seal_context)
    load_into(ct, seal_context, data)
    return ct


def load_into(obj: object, seal_context: object, data: bytes) -> None:
    """Load SEAL bytes into ``obj`` (a Ciphertext, a PublicKey: anything with ``load(context, path)``);
    SEAL checks them against ``seal_context`` (ValueError if they do not fit)."""
    path = _scratch()
    with open(path, "wb") as fh:
        fh.write(data)
    try:
        obj.load(seal_context, path)  # type: ignore[attr-defined]
    except Exception as exc:  # noqa: BLE001 - SEAL raises plain exceptions for any malformed input
        raise ValueError(f"not a SEAL object for this context ({exc})") from None


def levels(seal_context: SEALContext) -> tuple[ParmsId, ParmsId]:
    """(input level, output level): the parms ids with two data primes and with one. The key holder
    encrypts at the first, the he service's one rescale lands on the second."""
    data = seal_context.first_context_data()
    while data.chain_index() > 1:
        data = data.next_context_data()
    if data.chain_index() != 1:
        raise ValueError("the single-token path needs at least two data primes")
    return data.parms_id(), seal_context.last_parms_id()


class TokenCodec:
    """The key holder's side of both packings: encrypt a token's tiled slots or a column (symmetric,
    seeded) and decrypt the service's outputs. Built from a TenSEAL context holding the secret key;
    lives with the key bundle."""

    def __init__(self, context: TenSEALContext, scale: float) -> None:
        self.seal_context: SEALContext = context.seal_context().data
        self.scale = scale
        self.encoder = seal.ckks_encoder(self.seal_context)
        secret: SecretKey = context.secret_key().data
        self.encryptor = seal.encryptor(self.seal_context, secret)
        self.decryptor = seal.decryptor(self.seal_context, secret)
        self.input_level, self.output_level = levels(self.seal_context)
        self.top_level = self.seal_context.first_parms_id()
        self.slots = self.encoder.slot_count()

    def encrypt(self, values: ArrayLike, *, top: bool = False) -> bytes:
        """SEAL bytes of a seeded symmetric encryption of ``values``: at the level with two data primes
        (one token), or at the top level (``top``: a column, multiplied twice before any rescale)."""
        plain = seal.plaintext()
        level = self.top_level if top else self.input_level
        self.encoder.encode(np.asarray(values, dtype=np.float64).tolist(), level, self.scale, plain)
        return to_bytes(self.encryptor.encrypt_symmetric(plain))

    def decrypt(self, data: bytes) -> NDArray[np.float64]:
        ct = load_ciphertext(self.seal_context, data)
        plain = seal.plaintext()
        self.decryptor.decrypt(ct, plain)
        return np.asarray(self.encoder.decode_double(plain), dtype=np.float64)


__all__ = ["Ciphertext", "ParmsId", "SEALContext", "Saveable", "TokenCodec", "levels", "load_ciphertext", "load_into",
           "to_bytes"]
