"""HE-LoRA, the tenant side: CKKS keys that never leave this process, and LoRA deltas computed by the
he service on encrypted hidden states (real CKKS with TenSEAL; there is no simulated mode).

>>> from tg_tinker.he import HEKeyManager, HESchemeParams, HEScheme, create_private_inference_mode
>>> keys = HEKeyManager(tenant_id="tenant-123")
>>> params = HESchemeParams(scheme=HEScheme.CKKS, poly_modulus_degree=8192, security_level=128)
>>> bundle = keys.generate_key_bundle(params=params)
>>> inference = create_private_inference_mode(key_bundle=bundle, params=params, client=service, adapter=artifact_id)
>>> delta = inference.decrypt_output(inference.process(inference.encrypt_input(hidden_states)))

Needs the ``he`` extra (``pip install 'tg-tinker[he]'``). See docs/he.md.
"""

from .inference import CallStats, EncryptedInput, EncryptedOutput, PrivateInference
from .keys import HEKeyBundle, HEKeyManager
from .params import SECURITY_TABLE, HEScheme, HESchemeParams
from .remote import HEAdapterInfo, HeClient, HEContextInfo, HELayerInfo
from .runtime import (
    AdapterEncryptionConfig,
    EncryptedLoRARuntime,
    create_encrypted_runtime,
    create_private_inference_mode,
)

__all__ = [
    "HEKeyManager",
    "HEKeyBundle",
    "HEScheme",
    "HESchemeParams",
    "SECURITY_TABLE",
    "AdapterEncryptionConfig",
    "PrivateInference",
    "EncryptedLoRARuntime",
    "EncryptedInput",
    "EncryptedOutput",
    "CallStats",
    "create_private_inference_mode",
    "create_encrypted_runtime",
    "HeClient",
    "HEContextInfo",
    "HEAdapterInfo",
    "HELayerInfo",
]
