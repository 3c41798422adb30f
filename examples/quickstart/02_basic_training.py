"""A minimal training loop: queue forward_backward and optim_step, then read the results.

    TS_API_KEY=$(cat .tensafe/api_key) python examples/quickstart/02_basic_training.py [--model NAME]
"""

import argparse

from tg_tinker import LoRAConfig, OptimizerConfig, ServiceClient, TrainingConfig

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="smollm2-135m-instruct", help="a model name on the server")
parser.add_argument("--steps", type=int, default=5)
args = parser.parse_args()

service = ServiceClient()
config = TrainingConfig(
    model_ref=args.model,
    lora_config=LoRAConfig(rank=16, alpha=32, dropout=0.05, target_modules=["q_proj", "v_proj", "k_proj", "o_proj"]),
    optimizer=OptimizerConfig(name="adamw", learning_rate=1e-4, weight_decay=0.01),
    batch_size=2,
    gradient_accumulation_steps=1,
)
tc = service.create_training_client(config)
info = tc.get_info()
print(f"session {tc.session_id}: {info.num_trainable_parameters:,} trainable of {info.num_parameters:,} parameters")

# Token ids are built on the client; any tokenizer of the same model will do. Here: a fixed toy batch.
ids = [[1, 20, 30, 40, 50, 60, 70, 80], [1, 21, 31, 41, 51, 61, 71, 81]]
batch = {"input_ids": ids, "attention_mask": [[1] * 8, [1] * 8], "labels": ids}

for _ in range(args.steps):
    fb_future = tc.forward_backward(batch)  # returns at once
    opt_future = tc.optim_step()            # queued behind it
    fb_result = fb_future.result()
    opt_result = opt_future.result()
    print(f"Step {tc.step}: loss={fb_result.loss:.4f} grad_norm={opt_result.grad_norm:.4f}")

print(tc.sample([ids[0][:4]], max_tokens=8, temperature=0).samples[0])
tc.close()
service.close()
