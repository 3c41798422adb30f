"""Track a DP fine-tuning run with Weights & Biases (offline: nothing leaves this machine).

    TS_API_KEY=... TS_BASE_URL=127.0.0.1:50051 python examples/integrations/wandb_tracking.py --model tiny

Logs the session's settings (never its metadata), each step's loss and epsilon, and the vault id of the
final checkpoint; `wandb sync <dir>` uploads the run later if you want it in the W&B app.
Needs `pip install 'tg-tinker[mlops]'`.
"""

from __future__ import annotations

import argparse
import os

from tg_tinker import DPConfig, LoRAConfig, OptimizerConfig, ServiceClient, TrainingConfig
from tg_tinker.integrations import WandbTracker

BATCH = {"input_ids": [[0, 45, 120, 77, 200, 31], [0, 99, 14, 230, 61, 7]], "attention_mask": [[1] * 6] * 2,
         "labels": [[0, 45, 120, 77, 200, 31], [0, 99, 14, 230, 61, 7]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dir", default="build/wandb", help="where the offline run is written")
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    config = TrainingConfig(model_ref=args.model, batch_size=2, lora_config=LoRAConfig(rank=4, alpha=8.0),
                            optimizer=OptimizerConfig(name="sgd", learning_rate=0.1),
                            dp_config=DPConfig(enabled=True, noise_multiplier=1.0, max_grad_norm=1.0,
                                               target_epsilon=8.0, target_delta=1e-5, dataset_size=100))
    with ServiceClient() as service, service.create_training_client(config) as tc, \
            WandbTracker(project="tensafe-examples", dir=args.dir) as tracker:
        tracker.log_session(tc)
        for step in range(1, args.steps + 1):
            fb = tc.forward_backward(BATCH).result(timeout=300)
            opt = tc.optim_step().result(timeout=300)
            metrics = tracker.log_step(step, fb, opt)
            print(f"step {step}: loss={metrics['loss']:.4f} epsilon={metrics['epsilon']:.4f}")
        artifact = tc.save_state(include_optimizer=False).artifact_id
        tracker.log_artifact(artifact, step=args.steps)
        print(f"checkpoint {artifact} (encrypted in the vault); W&B run written under {args.dir}/wandb")


if __name__ == "__main__":
    main()
