"""Serve a trained adapter: stream its generations from the inference service, token by token.

    tensafe up &                                   # or: make up
    TS_API_KEY=$(cat .tensafe/api_key) python examples/serving/stream_generation.py --artifact ART_ID

``--artifact`` is a checkpoint saved by ``TrainingClient.save_state`` (for example by
examples/training/lora_finetuning.py). Without it, this script first fine-tunes a small adapter
on a few sentences for ``--steps`` steps and saves it, so that it runs on its own.

The inference service fetches the artifact from the vault as your tenant, decrypts it in its
memory only, and serves it to your tenant only. Leaving the loop early cancels the call.
"""

from __future__ import annotations

import argparse

from tg_tinker import LoRAConfig, OptimizerConfig, ServiceClient, TrainingConfig

parser = argparse.ArgumentParser()
parser.add_argument("--artifact", help="checkpoint artifact id (default: train a small adapter first)")
parser.add_argument("--model", default="smollm2-135m-instruct", help="base model, when training one here")
parser.add_argument("--steps", type=int, default=5)
parser.add_argument("--max-tokens", type=int, default=48)
parser.add_argument("--temperature", type=float, default=0.7)
parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
parser.add_argument("prompts", nargs="*", default=["The clinic opens at", "Refill requests are"])
args = parser.parse_args()

service = ServiceClient()

artifact = args.artifact
if artifact is None:
    config = TrainingConfig(model_ref=args.model, batch_size=2, seed=0,
                            lora_config=LoRAConfig(rank=8, alpha=16, target_modules=["q_proj", "v_proj"]),
                            optimizer=OptimizerConfig(learning_rate=1e-3))
    with service.create_training_client(config) as tc:
        ids = [[1, 20, 30, 40, 50, 60, 70, 80], [1, 21, 31, 41, 51, 61, 71, 81]]
        for _ in range(args.steps):
            tc.forward_backward({"input_ids": ids, "labels": ids})
            tc.optim_step()
        artifact = tc.save_state(include_optimizer=False, name="serving-example").artifact_id
    print(f"trained {args.steps} steps; adapter saved as {artifact}")

sc = service.create_sampling_client(artifact_id=artifact)
print(f"adapter {sc.adapter_id} loaded on {sc.model_ref}")

current = None
for piece in sc.stream(args.prompts, max_tokens=args.max_tokens, temperature=args.temperature, seed=0,
                       stop=args.stop):
    if piece.prompt_index != current:
        current = piece.prompt_index
        print(f"\n[{current}] {args.prompts[current]}", end="")
    print(piece.text, end="", flush=True)
    if piece.finish_reason:
        print(f"  <{piece.finish_reason}>", end="")
print()

sc.unload()
service.close()
