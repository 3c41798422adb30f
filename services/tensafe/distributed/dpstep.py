"""One global DP-SGD step across workers, as Opacus' ``DistributedDPOptimizer`` makes it.

1. Every worker Poisson-samples ITS shard at the GLOBAL rate q (:func:`poisson_sample`: each row kept with
   probability q, independently, from the operating system's CSPRNG), so the union over workers is a
   Poisson sample of the whole dataset at rate q: the sampling the accountant assumes.
2. Every worker clips each of its sampled rows' gradients to ``max_grad_norm`` and sums them, with the
   trainer's own per-sample clipper (:class:`tensafe.trainer.dp.PerSampleClipper`): :func:`local_clipped_sum`.
3. The sums are all-reduced with SUM (:func:`noised_global_mean`); Gaussian noise of std
   ``noise_multiplier * max_grad_norm`` is added ONCE, by rank 0 alone (to its own sum, before the
   reduce), drawn from the trainer's CSPRNG Gaussian (:class:`tensafe.trainer.dp.SecureGaussian`); the
   result is divided by the global EXPECTED batch size q * N (never the realised one, which depends on
   the data). Every rank then holds the same noised mean and applies the same optimizer step, so the
   parameters stay identical across ranks.

Per-sample norms are computed in float64 and the sums and the noise are float32, whatever the base
model's dtype (:mod:`tensafe.common.devices`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from tensafe.trainer.dp import PerSampleClipper, SecureGaussian
from tensafe.trainer.losses import Loss, LossInputs

IGNORE_INDEX = -100


def poisson_sample(rows: Sequence[int], sample_rate: float) -> list[int]:
    """The rows kept this step: each with probability ``sample_rate``, from ``os.urandom`` (53-bit uniforms)."""
    n = len(rows)
    if n == 0:
        return []
    words = np.frombuffer(os.urandom(8 * n), dtype=np.uint64)
    u = (words >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
    return [rows[int(i)] for i in np.flatnonzero(u < sample_rate)]


def encode(tokenizer, texts: Sequence[str], max_length: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Token ids, mask and labels (padding ignored) of ``texts``, right-padded to the longest."""
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE_INDEX)}


def local_clipped_sum(model: torch.nn.Module, clipper: PerSampleClipper, params: Sequence[torch.nn.Parameter],
                      batches: Sequence[dict[str, torch.Tensor]], loss: Loss) -> tuple[torch.Tensor, int, float]:
    """This worker's sum of per-row clipped gradients, flattened in ``params`` order (float32), its row count
    and the sum of its rows' losses. No rows: a zero vector (the step still takes part in the reduce)."""
    clipper.reset()
    loss_sum = 0.0
    for batch in batches:
        def run(b: dict[str, torch.Tensor] = batch) -> LossInputs:
            model.train(True)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
            return LossInputs(logits=logits, input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                              labels=b["labels"], advantages=None, old_logprobs=None, extra={})

        outs = clipper.per_sample_backward(run, loss)
        loss_sum += sum(float(o.loss.detach()) for o in outs)
    flat = torch.cat([clipper.clipped_sum(p).detach().reshape(-1).to(torch.float32) for p in params])
    rows = clipper.rows
    clipper.reset()
    return flat, rows, loss_sum


def noised_global_mean(flat: torch.Tensor, *, noise_multiplier: float, max_grad_norm: float,
                       expected_batch_size: float, noise: SecureGaussian | None) -> torch.Tensor:
    """(SUM over ranks of the clipped sums + N(0, (sigma C)^2 I) once) / expected batch. ``noise=None``: none
    (only the tests of the clipping itself pass it)."""
    total = flat.clone()
    if dist.get_rank() == 0 and noise is not None and noise_multiplier > 0:
        z = noise.sample(total.numel(), torch.float32).to(total.device)
        total += (noise_multiplier * max_grad_norm) * z
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / expected_batch_size


def set_grads(params: Sequence[torch.nn.Parameter], flat: torch.Tensor) -> None:
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.device, p.dtype).clone()
        offset += n
