"""HE-LoRA setup: tenant-held CKKS keys, a fine-tuned adapter, and the he service ready to compute its
deltas on encrypted hidden states.

    TS_API_KEY=$(cat .tensafe/api_key) python examples/privacy/he_lora_setup.py [--model NAME] [--steps N]

1. generates a CKKS key bundle here (N = 8192, 128-bit security) and saves it encrypted under a
   passphrase (the secret key never goes anywhere else);
2. fine-tunes a LoRA adapter on q_proj and v_proj for a few steps and saves it to the vault;
3. registers the public context with the he service and has it load the adapter from the vault.
Writes the artifact id and key file path to --state for examples/inference/encrypted_inference.py.
"""

import argparse
import json
import os
from pathlib import Path

from tg_tinker import LoRAConfig, OptimizerConfig, ServiceClient, TrainingConfig
from tg_tinker.he import HEKeyManager, HEScheme, HESchemeParams, create_private_inference_mode

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="smollm2-135m-instruct", help="a model name on the server")
parser.add_argument("--steps", type=int, default=3)
parser.add_argument("--rank", type=int, default=16)
parser.add_argument("--key-file", default="he-key.bundle")
parser.add_argument("--state", default="he-lora.json")
args = parser.parse_args()
passphrase = os.environ.get("TS_HE_PASSPHRASE", "change me: a long passphrase")

service = ServiceClient()
tenant = os.environ.get("TS_TENANT_ID", "default")

# 1. Keys, on this machine.
params = HESchemeParams(scheme=HEScheme.CKKS, poly_modulus_degree=8192, security_level=128)
bundle = HEKeyManager(tenant_id=tenant).generate_key_bundle(params=params)
bundle.save(args.key_file, passphrase=passphrase)
print(f"key bundle {bundle.key_id}: secret key saved encrypted to {args.key_file}; "
      f"public context {len(bundle.public_context()) / 1e6:.2f} MB")

# 2. An adapter to run encrypted: a few LoRA steps, saved to the vault.
config = TrainingConfig(model_ref=args.model, batch_size=2,
                        lora_config=LoRAConfig(rank=args.rank, alpha=2 * args.rank, dropout=0.0,
                                               target_modules=["q_proj", "v_proj"]),
                        optimizer=OptimizerConfig(name="adamw", learning_rate=1e-3))
ids = [[1, 20, 30, 40, 50, 60, 70, 80], [1, 21, 31, 41, 51, 61, 71, 81]]
with service.create_training_client(config) as tc:
    for _ in range(args.steps):
        tc.forward_backward({"input_ids": ids})
        tc.optim_step()
    checkpoint = tc.save_state()
print(f"adapter trained {args.steps} steps, saved as {checkpoint.artifact_id}")

# 3. The he service: public context registered, adapter loaded from the vault (as this tenant).
inference = create_private_inference_mode(key_bundle=bundle, params=params, client=service,
                                          adapter=checkpoint.artifact_id)
context = service.he.get_context(bundle.key_id)
print(f"he service holds context {context.key_id}: {context.size_bytes:,} bytes, {context.slot_count} slots, "
      f"Galois keys: {context.has_galois_keys}")
print(f"he service loaded adapter {inference.adapter.adapter_id} with {len(inference.layers)} encrypted layers, "
      f"e.g. {inference.layers[0].name} ({inference.layers[0].in_features} -> {inference.layers[0].out_features}, "
      f"rank {inference.layers[0].rank})")
Path(args.state).write_text(json.dumps({"artifact_id": checkpoint.artifact_id, "key_file": args.key_file,
                                        "rank": args.rank}))
print(f"HE-LoRA setup done: {args.state}")
service.close()
