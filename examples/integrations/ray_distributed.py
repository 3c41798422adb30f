"""The user guide's Ray example: ``TenSafeTrainer(TenSafeTrainingConfig(...)).fit()`` on a Ray cluster.

    tensafe up &
    pip install 'tensafe[ray]'
    TS_API_KEY=$(cat .tensafe/api_key) python examples/integrations/ray_distributed.py --model smollm2-135m-instruct

``ray.init()`` joins the cluster named by ``RAY_ADDRESS`` (or starts a local one). Each worker loads the base
model from the server's model directory (the same path on every node), trains on its shard, and rank 0 reports
the run's epsilon, steps and the final adapter's artifact id, which ``load_state`` and
``create_sampling_client`` take. Add ``--gpu`` for one GPU per worker.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import ray

from tensafe.distributed import DistributedDPConfig, TenSafeTrainer, TenSafeTrainingConfig

TEXTS = [
    "The clinic opens at eight in the morning and closes at six in the evening.",
    "Refill requests are processed within two business days.",
    "Lab results are usually ready within three days.",
    "Please bring your insurance card to every appointment.",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--gpu", action="store_true")
    args = ap.parse_args()

    ray.init(include_dashboard=False)
    config = TenSafeTrainingConfig(
        model_name=args.model,
        lora_rank=16,
        lora_alpha=32,
        num_epochs=1,
        per_device_batch_size=4,
        learning_rate=1e-4,
        num_workers=args.workers,
        use_gpu=args.gpu,
        dp_config=DistributedDPConfig(
            target_epsilon=8.0,
            target_delta=1e-5,
            max_grad_norm=1.0,
        ),
    )
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.jsonl"
        data.write_text("".join(json.dumps({"text": f"{TEXTS[i % len(TEXTS)]} ({i})"}) + "\n" for i in range(64)))
        trainer = TenSafeTrainer(config, dataset=str(data))
        result = trainer.fit()
    print({k: result.metrics[k] for k in ("epsilon", "steps", "sample_rate", "artifact_id")})
    ray.shutdown()


if __name__ == "__main__":
    main()
