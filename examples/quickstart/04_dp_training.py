"""Differentially private LoRA training: DP-SGD with a privacy budget the server enforces.

    TS_API_KEY=$(cat .tensafe/api_key) python examples/quickstart/04_dp_training.py [--model NAME]

Each step's batch is drawn by Poisson sampling (every example independently, with probability
sample_rate = expected batch size / dataset size): that is the sampling the privacy accounting
assumes. The server clips each example's gradient, adds Gaussian noise once per step, records the
step with the privacy accountant BEFORE applying it, and refuses the step that would pass
target_epsilon (DPBudgetExceededError; the weights stay as they were).
"""

import argparse
import random

from tg_tinker import DPBudgetExceededError, DPConfig, LoRAConfig, OptimizerConfig, ServiceClient, TrainingConfig
from tg_tinker.data import PoissonSampler

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="smollm2-135m-instruct", help="a model name on the server")
parser.add_argument("--steps", type=int, default=40, help="most steps to try; the budget may end the run first")
parser.add_argument("--target-epsilon", type=float, default=3.0)
parser.add_argument("--noise-multiplier", type=float, default=0.8)
args = parser.parse_args()

# A toy private dataset of 200 token sequences (a real job tokenizes its records on this side).
rng = random.Random(0)
dataset = [[1] + [rng.randrange(2, 200) for _ in range(11)] for _ in range(200)]
batch_size = 8  # expected: Poisson batches vary around it

service = ServiceClient()
config = TrainingConfig(
    model_ref=args.model,
    lora_config=LoRAConfig(rank=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"]),
    optimizer=OptimizerConfig(name="sgd", learning_rate=0.5),
    batch_size=batch_size,
    dp_config=DPConfig(
        enabled=True,
        noise_multiplier=args.noise_multiplier,
        max_grad_norm=1.0,
        target_epsilon=args.target_epsilon,
        target_delta=1e-5,
        accountant_type="pld",
        dataset_size=len(dataset),  # sample rate = batch_size / dataset_size
    ),
)
tc = service.create_training_client(config)
print(f"session {tc.session_id}, privacy budget {tc.get_info().budget_id}")

sampler = PoissonSampler.for_batch_size(len(dataset), batch_size, steps=args.steps)
for rows in sampler.batches(dataset):
    if rows:  # an empty Poisson batch is still a (noise-only) step: skip forward_backward, not the step
        tc.forward_backward({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows], "labels": rows})
    try:
        opt = tc.optim_step(apply_dp_noise=True).result()
    except DPBudgetExceededError as exc:
        print(f"Budget exhausted after step {tc.step}: {exc}")
        break
    dp = opt.dp_metrics
    print(f"Step {opt.step}: batch={len(rows)} epsilon={dp.total_epsilon:.4f} of {dp.target_epsilon} "
          f"(delta={dp.delta:g}, noise={dp.noise_applied})")

info = tc.get_info()
print(f"trained {info.step} steps; epsilon spent {info.total_epsilon:.4f} at delta 1e-05")
tc.close()
service.close()
