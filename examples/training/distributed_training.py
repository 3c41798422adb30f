"""Distributed DP-SGD on Ray Train: several workers (GPUs, or CPU processes) train one adapter privately.

    tensafe up &                                   # or: make up
    pip install 'tensafe[ray]'
    TS_API_KEY=$(cat .tensafe/api_key) python examples/training/distributed_training.py --model smollm2-135m-instruct

The run is a platform job: it runs where the operator's settings are (``TENSAFE_DATA_DIR``: the services' key
and the API key verification key; ``TENSAFE_MODEL_DIR``: the model names), and acts as the tenant whose key is
``TS_API_KEY``: its budget is in the accountant, its encrypted checkpoints in the vault, its steps in the
ledger. The training data is the Northwind Clinic FAQ (examples/data), one ``{"text": ...}`` line per example.

Every worker Poisson-samples its shard at the global rate q, clips each example's gradient, the clipped sums are
all-reduced, and the noise is added once per global step (docs/training.md, "Distributed DP on Ray").
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import ray

from tensafe.distributed import DistributedDPConfig, TenSafeTrainer, TenSafeTrainingConfig
from tg_tinker import ServiceClient

HERE = Path(__file__).resolve().parent.parent


def texts_jsonl(out: Path) -> Path:
    """The FAQ as training text: one {"text": question and answer} per line."""
    rows = [json.loads(line) for line in (HERE / "data" / "clinic_faq.jsonl").read_text().splitlines() if line]
    out.write_text("".join(json.dumps({"text": f"Question: {r['prompt']}\nAnswer: {r['response']}"}) + "\n"
                           for r in rows))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="a model name of the server's model directory")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--gpu", action="store_true", help="one GPU per worker (nccl); default: CPU workers (gloo)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=4, help="each worker's expected batch")
    ap.add_argument("--target-epsilon", type=float, default=8.0)
    ap.add_argument("--rank", type=int, default=8)
    args = ap.parse_args()

    ray.init(include_dashboard=False, log_to_driver=False)
    config = TenSafeTrainingConfig(
        model_name=args.model, lora_rank=args.rank, lora_alpha=2 * args.rank, num_epochs=args.epochs,
        per_device_batch_size=args.batch_size, learning_rate=5e-3, num_workers=args.workers, use_gpu=args.gpu,
        dp_config=DistributedDPConfig(target_epsilon=args.target_epsilon, target_delta=1e-5, max_grad_norm=1.0))
    with tempfile.TemporaryDirectory() as tmp:
        result = TenSafeTrainer(config, dataset=str(texts_jsonl(Path(tmp) / "faq.jsonl"))).fit()
    ray.shutdown()
    print(f"trained {result.steps} global steps on {args.workers} workers at sample rate {result.sample_rate:.4g}")
    print(f"epsilon {result.epsilon:.3f} (delta {result.delta:g}), noise multiplier {result.noise_multiplier:.3f}, "
          f"budget {result.budget_id}")
    print(f"final adapter: {result.artifact_id}")
    with ServiceClient() as client:
        sampler = client.create_sampling_client(result.artifact_id)
        out = sampler.sample("Question: When is the clinic open?\nAnswer:", max_tokens=24, temperature=0.0)
        print("sample:", out.samples[0].completion.strip())


if __name__ == "__main__":
    main()
