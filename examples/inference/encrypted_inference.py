"""Encrypted LoRA inference: the he service computes an adapter's delta on encrypted hidden states;
only this process, which holds the secret key, sees them or the delta in the clear.

    TS_API_KEY=$(cat .tensafe/api_key) python examples/inference/encrypted_inference.py [--state he-lora.json]

Run examples/privacy/he_lora_setup.py first. The hidden states here are random vectors of the layer's
input size; in a real plaintext plane they are the base model's activations at that layer. The delta
is checked against the plaintext LoRA delta of the same adapter, pulled from the vault and decrypted
here (the tenant's own adapter).
"""

import argparse
import io
import json
import os
import tarfile
import time

import numpy as np
from safetensors.numpy import load as st_load

from tg_tinker import ServiceClient
from tg_tinker.he import AdapterEncryptionConfig, HEKeyManager, create_encrypted_runtime

parser = argparse.ArgumentParser()
parser.add_argument("--state", default="he-lora.json")
parser.add_argument("--tokens", type=int, default=8)
args = parser.parse_args()
state = json.loads(open(args.state).read())
passphrase = os.environ.get("TS_HE_PASSPHRASE", "change me: a long passphrase")

service = ServiceClient()
bundle = HEKeyManager(tenant_id=os.environ.get("TS_TENANT_ID", "default")).load_key_bundle(
    state["key_file"], passphrase=passphrase)
runtime = create_encrypted_runtime(
    config=AdapterEncryptionConfig(rank=state["rank"], encrypted_layers=["q_proj", "v_proj"]),
    key_bundle=bundle, client=service, adapter=state["artifact_id"])
layer = runtime.layers[0]
info = runtime.inference.adapter.layer(layer)

# The tenant's own adapter, for the check: pulled from the vault and decrypted on this machine.
with tarfile.open(fileobj=io.BytesIO(service.get_artifact(state["artifact_id"]))) as tar:
    weights = st_load(tar.extractfile("adapter_model.safetensors").read())
A = weights[f"base_model.model.{layer}.lora_A.weight"].astype(np.float64)
B = weights[f"base_model.model.{layer}.lora_B.weight"].astype(np.float64)

rng = np.random.default_rng(0)
for tokens in (1, args.tokens):
    hidden_states = rng.normal(0, 1, (tokens, info.in_features))
    t0 = time.perf_counter()
    delta = runtime.forward(hidden_states, layer=layer)      # encrypt here, compute there, decrypt here
    elapsed = time.perf_counter() - t0
    expected = info.scaling * hidden_states @ A.T @ B.T
    err = np.abs(delta - expected).max() / np.abs(expected).max()
    stats = runtime.inference.last_stats
    packing = "replicated, 2 rounds" if tokens == 1 else "column"
    print(f"{layer}: {tokens} token(s) ({packing}) -> delta {delta.shape} in {elapsed * 1e3:.0f} ms; "
          f"rotations {stats.counts['rotations']}, depth {stats.counts['multiplicative_depth']}, "
          f"ct x pt {stats.counts['plaintext_multiplies']}, sent {stats.request_bytes / 1e6:.1f} MB, "
          f"received {stats.response_bytes / 1e6:.1f} MB; relative error {err:.1e}")
    assert err < 1e-4, "the encrypted delta differs from the plaintext one"
print("encrypted inference done")
service.close()
