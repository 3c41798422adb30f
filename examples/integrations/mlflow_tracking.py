"""Track a DP fine-tuning run with MLflow (a local SQLite tracking store), then export the adapter for the Hub.

    TS_API_KEY=... TS_BASE_URL=127.0.0.1:50051 python examples/integrations/mlflow_tracking.py --model tiny

`mlflow ui --backend-store-uri sqlite:///build/mlflow/mlflow.db` shows the run. The adapter is written as a
PEFT directory with a model card stating its DP guarantee (nothing is uploaded). Needs
`pip install 'tg-tinker[mlops]'`.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from tg_tinker import DPConfig, LoRAConfig, OptimizerConfig, ServiceClient, TrainingConfig
from tg_tinker.integrations import MLflowTracker, export_peft

BATCH = {"input_ids": [[0, 45, 120, 77, 200, 31], [0, 99, 14, 230, 61, 7]], "attention_mask": [[1] * 6] * 2,
         "labels": [[0, 45, 120, 77, 200, 31], [0, 99, 14, 230, 61, 7]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--store", default="build/mlflow", help="directory of the SQLite tracking store")
    parser.add_argument("--export", default="build/hub-adapter", help="where the PEFT adapter is written")
    args = parser.parse_args()
    config = TrainingConfig(model_ref=args.model, batch_size=2, lora_config=LoRAConfig(rank=4, alpha=8.0),
                            optimizer=OptimizerConfig(name="sgd", learning_rate=0.1),
                            dp_config=DPConfig(enabled=True, noise_multiplier=1.0, max_grad_norm=1.0,
                                               target_epsilon=8.0, target_delta=1e-5, dataset_size=100))
    with ServiceClient() as service:
        with service.create_training_client(config) as tc, \
                MLflowTracker(args.store, experiment="tensafe-examples") as tracker:
            tracker.log_session(tc)
            for step in range(1, args.steps + 1):
                fb = tc.forward_backward(BATCH).result(timeout=300)
                opt = tc.optim_step().result(timeout=300)
                metrics = tracker.log_step(step, fb, opt)
                print(f"step {step}: loss={metrics['loss']:.4f} epsilon={metrics['epsilon']:.4f}")
            artifact = tc.save_state(include_optimizer=False).artifact_id
            tracker.log_artifact(artifact, step=args.steps)
            print(f"MLflow run {tracker.run_id} in {tracker.tracking_uri}")
        shutil.rmtree(args.export, ignore_errors=True)
        card = export_peft(service, artifact, args.export)
        print(f"adapter exported to {Path(args.export)}/ (README.md: {card.privacy_text()[:60]}...)")


if __name__ == "__main__":
    main()
