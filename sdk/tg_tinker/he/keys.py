"""The tenant's CKKS keys. The secret key is generated here and stays in this process, or in a key
file encrypted under a passphrase or a key the tenant supplies. Only the public context goes out."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import IntegrityError, ValidationError
from .params import HEScheme, HESchemeParams

_MAGIC = b"TENSAFE-HE-KEY-BUNDLE/1\n"
_SCRYPT = {"n": 2 ** 15, "r": 8, "p": 1}


def _tenseal() -> Any:
    try:
        import tenseal
    except ImportError:
        raise ImportError("tg_tinker.he needs TenSEAL for the tenant side of HE-LoRA: pip install 'tg-tinker[he]'") \
            from None
    return tenseal


@dataclass(eq=False)
class HEKeyBundle:
    """A CKKS key pair of one tenant: the secret key (inside a private TenSEAL context, never serialised
    into a request), its parameters and its ``key_id``. :meth:`public_context` is what the he service
    receives. It refuses to be pickled; :meth:`save` writes it encrypted."""

    tenant_id: str
    key_id: str
    params: HESchemeParams
    context: Any = field(repr=False)
    created_at: float = field(default_factory=time.time)
    _codec: Any = field(default=None, init=False, repr=False)

    def __getstate__(self) -> Any:
        raise TypeError("an HEKeyBundle holds a secret key and is not pickled; use bundle.save(path, passphrase=...)")

    def public_context(self) -> bytes:
        """The serialised public context: public key only (no secret key, no relinearisation or Galois
        keys: the computation multiplies ciphertexts by plaintexts only and never rotates)."""
        return self.context.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=False,
                                      save_relin_keys=False)

    @property
    def slot_count(self) -> int:
        return self.params.slot_count

    def encrypt(self, values: Any) -> Any:
        """A CKKS ciphertext (TenSEAL ``CKKSVector``) of a 1-D array of at most ``slot_count`` values."""
        return _tenseal().ckks_vector(self.context, [float(v) for v in values])

    def decrypt(self, data: bytes) -> list[float]:
        """Decrypt a serialised ciphertext produced under this key."""
        ts = _tenseal()
        try:
            vector = ts.ckks_vector_from(self.context, data)
        except Exception:  # noqa: BLE001
            raise IntegrityError("the service returned bytes that are not a ciphertext under this key",
                                 code="INTEGRITY_ERROR") from None
        return vector.decrypt()

    def encrypt_token(self, values: Any) -> bytes:
        """One token's slots for the single-token path: SEAL bytes of a symmetric (seeded) encryption
        under the secret key, at the level with two data primes (see :mod:`tg_tinker.he.seal`)."""
        return self._token_codec().encrypt(np.asarray(values, dtype=np.float64))

    def encrypt_column(self, values: Any) -> bytes:
        """One column (an input dimension across up to ``slot_count`` tokens) for the column path: SEAL
        bytes of a symmetric (seeded) encryption under the secret key, at the top level."""
        return self._token_codec().encrypt(np.asarray(values, dtype=np.float64), top=True)

    def decrypt_token(self, data: bytes) -> Any:
        """Decrypt an output of the he service (SEAL bytes, either packing) to a float64 array of slots."""
        try:
            return self._token_codec().decrypt(data)
        except ValueError:
            raise IntegrityError("the service returned bytes that are not a ciphertext under this key",
                                 code="INTEGRITY_ERROR") from None

    def _token_codec(self) -> Any:
        if self._codec is None:
            _tenseal()
            from .seal import TokenCodec

            self._codec = TokenCodec(self.context, self.params.global_scale)
        return self._codec

    def save(self, path: str | os.PathLike[str], *, passphrase: str | None = None, key: bytes | None = None) -> Path:
        """Write the bundle (secret key included) to ``path``, encrypted with AES-256-GCM under a key
        derived from ``passphrase`` (scrypt) or under ``key`` (32 bytes the tenant holds). File mode 0600."""
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        header: dict[str, Any] = {"tenant_id": self.tenant_id, "key_id": self.key_id, "created_at": self.created_at,
                                  "params": _params_dict(self.params), "cipher": "AES-256-GCM"}
        if (passphrase is None) == (key is None):
            raise ValidationError("give exactly one of passphrase or key", field="passphrase", code="INVALID_ARGUMENT")
        if passphrase is not None:
            if len(passphrase) < 8:
                raise ValidationError("the passphrase must be at least 8 characters", field="passphrase",
                                      code="INVALID_ARGUMENT")
            salt = secrets.token_bytes(16)
            header["kdf"] = {"name": "scrypt", "salt": salt.hex(), **_SCRYPT}
            wrap_key = _scrypt(passphrase, salt, _SCRYPT)
        else:
            if not isinstance(key, bytes | bytearray) or len(key) != 32:
                raise ValidationError("key must be 32 bytes", field="key", code="INVALID_ARGUMENT")
            header["kdf"] = {"name": "none"}
            wrap_key = bytes(key)
        nonce = secrets.token_bytes(12)
        header["nonce"] = nonce.hex()
        head = json.dumps(header, sort_keys=True).encode() + b"\n"
        secret = self.context.serialize(save_public_key=True, save_secret_key=True, save_galois_keys=False,
                                        save_relin_keys=False)
        sealed = AESGCM(wrap_key).encrypt(nonce, secret, _MAGIC + head)
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(_MAGIC + head + sealed)
        os.replace(tmp, path)
        return path


def _params_dict(p: HESchemeParams) -> dict[str, Any]:
    return {"scheme": p.scheme.value, "poly_modulus_degree": p.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(p.coeff_mod_bit_sizes), "scale_bits": p.scale_bits,
            "security_level": p.security_level}


def _scrypt(passphrase: str, salt: bytes, cost: dict[str, int]) -> bytes:
    return hashlib.scrypt(passphrase.encode(), salt=salt, n=cost["n"], r=cost["r"], p=cost["p"], dklen=32,
                          maxmem=256 << 20)


class HEKeyManager:
    """Generates and loads a tenant's CKKS key bundles, on the tenant's machine."""

    def __init__(self, tenant_id: str) -> None:
        if not tenant_id:
            raise ValidationError("tenant_id is required", field="tenant_id", code="INVALID_ARGUMENT")
        self.tenant_id = tenant_id

    def generate_key_bundle(self, params: HESchemeParams | None = None, key_id: str | None = None) -> HEKeyBundle:
        """A fresh key pair for ``params`` (default: N = 8192, primes [60, 40, 40, 60], scale 2^40,
        128-bit security), generated here with TenSEAL (SEAL's CSPRNG)."""
        ts = _tenseal()
        params = params or HESchemeParams()
        if params.scheme is not HEScheme.CKKS:
            raise ValidationError("only CKKS", field="params.scheme", code="INVALID_ARGUMENT")
        ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=params.poly_modulus_degree,
                         coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes))
        ctx.global_scale = params.global_scale
        return HEKeyBundle(tenant_id=self.tenant_id, key_id=key_id or "hek-" + secrets.token_hex(8), params=params,
                           context=ctx)

    def load_key_bundle(self, path: str | os.PathLike[str], *, passphrase: str | None = None,
                        key: bytes | None = None) -> HEKeyBundle:
        """Read a bundle written by :meth:`HEKeyBundle.save`; a wrong passphrase or key, or a modified
        file, raises :class:`~tg_tinker.IntegrityError`."""
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        raw = Path(path).read_bytes()
        if not raw.startswith(_MAGIC):
            raise ValidationError(f"{path} is not a TenSafe HE key bundle", field="path", code="INVALID_ARGUMENT")
        head, _, sealed = raw[len(_MAGIC):].partition(b"\n")
        header = json.loads(head)
        kdf = header["kdf"]
        if kdf["name"] == "scrypt":
            if passphrase is None:
                raise ValidationError("this bundle is sealed with a passphrase", field="passphrase",
                                      code="INVALID_ARGUMENT")
            wrap_key = _scrypt(passphrase, bytes.fromhex(kdf["salt"]), kdf)
        else:
            if key is None:
                raise ValidationError("this bundle is sealed with a key", field="key", code="INVALID_ARGUMENT")
            wrap_key = bytes(key)
        try:
            secret = AESGCM(wrap_key).decrypt(bytes.fromhex(header["nonce"]), sealed, _MAGIC + head + b"\n")
        except (InvalidTag, ValueError):
            raise IntegrityError("wrong passphrase or key, or the key file was modified", code="INTEGRITY_ERROR") \
                from None
        if header["tenant_id"] != self.tenant_id:
            raise ValidationError(f"the bundle belongs to tenant {header['tenant_id']!r}", field="tenant_id",
                                  code="INVALID_ARGUMENT")
        p = header["params"]
        params = HESchemeParams(scheme=HEScheme(p["scheme"]), poly_modulus_degree=p["poly_modulus_degree"],
                                coeff_mod_bit_sizes=tuple(p["coeff_mod_bit_sizes"]), scale_bits=p["scale_bits"],
                                security_level=p["security_level"])
        ctx = _tenseal().context_from(secret)
        return HEKeyBundle(tenant_id=header["tenant_id"], key_id=header["key_id"], params=params, context=ctx,
                           created_at=header["created_at"])
