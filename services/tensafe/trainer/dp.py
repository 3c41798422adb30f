"""DP-SGD for one training session: per-sample clipping of its LoRA parameters, noise once per step.

How a DP step is computed (Abadi et al. 2016, as Opacus does it):

1. ``forward_backward``: the loss of each row is computed on that row alone (the batch loss is their
   sum), one backward pass runs (``torch.autograd.grad`` to the outputs of the session's LoRA
   ``nn.Linear`` layers, no Python in the engine), and from each layer's input and output gradient each
   row's gradient is computed with Opacus' own per-sample rule for linear layers
   (:func:`opacus.grad_sample.linear.compute_linear_grad_sample`). Each row's gradient over ALL the
   session's trainable parameters is clipped to L2 norm ``max_grad_norm`` and the clipped gradients
   are added to a running sum that spans the logical batch (all micro-batches of one step).
2. ``optim_step``: Gaussian noise of standard deviation ``noise_multiplier * max_grad_norm`` is added
   ONCE to that sum, which is then divided by the EXPECTED batch size (the session's batch size times
   its gradient-accumulation steps; under Poisson sampling the actual size varies and must not be
   used, it would depend on the data). The noise comes from a CSPRNG (:class:`SecureGaussian`).

Per-sample gradients are materialised rather than computed by ghost clipping: for a LoRA factor of
rank r over d inputs and a sequence of T tokens, a row's gradient costs T·r·d multiply-adds and r·d
floats, while its ghost norm costs T²·(d + r) and a second backward pass; materialising is the
cheaper of the two whenever T > r·d/(d + r) ≈ r, i.e. for every sequence longer than the rank.

The accounting assumes Poisson sampling at rate q; :func:`poisson_batch_limit` is the largest
logical batch that assumption makes plausible (a larger one is refused before it is accounted).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from opacus.grad_sample.linear import compute_linear_grad_sample
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from tensafe.runtime.errors import InvalidArgument

from .losses import Loss, LossInputs, LossOutput

CLIP_EPS = 1e-6  # added to a row's norm before dividing, as Opacus does
# A DP logical batch is refused when a Poisson batch at the declared rate would reach its size with
# probability below this (a Chernoff bound on the Binomial / Poisson tail).
IMPLAUSIBLE_BATCH_TAIL = 1e-9


def _kl_bernoulli(a: float, q: float) -> float:
    """KL(Bernoulli(a) || Bernoulli(q)) in nats, for 0 < q < 1 and 0 <= a <= 1."""
    out = a * math.log(a / q) if a > 0 else 0.0
    if a < 1:
        out += (1 - a) * math.log((1 - a) / (1 - q))
    return out


def poisson_batch_limit(sample_rate: float, dataset_size: int | None, expected_batch_size: int,
                        tail: float = IMPLAUSIBLE_BATCH_TAIL) -> int:
    """The largest logical batch (rows) that Poisson sampling at ``sample_rate`` makes plausible.

    With the dataset size N known, a batch's size is Binomial(N, q), and for k > Nq the Chernoff
    bound P[X >= k] <= exp(-N · KL(k/N || q)) holds; the limit is the largest k whose bound is still
    >= ``tail``, so every refused size k has P[X >= k] < ``tail`` (the bound is an upper bound: the
    exact tail there is smaller still). Without N (``sample_rate`` alone) the size is taken as
    Poisson with mean m = ``expected_batch_size`` (the limit of Binomial(N, m/N) as N grows, whose
    tail is the heavier): P[X >= k] <= exp(-m) (e·m/k)^k. A batch larger than N is always refused.
    """
    t = math.log(1.0 / tail)
    if dataset_size:
        n, q = int(dataset_size), float(sample_rate)
        if q >= 1.0:
            return n

        def exponent(k: int) -> float:
            return n * _kl_bernoulli(k / n, q)

        lo, hi = max(0, math.ceil(n * q)), n
    else:
        m = float(expected_batch_size)

        def exponent(k: int) -> float:
            return k * math.log(k / m) - k + m

        lo, hi = math.ceil(m), max(math.ceil(m), 1) * 64 + 64
        while exponent(hi) <= t:
            hi *= 2
    if exponent(hi) <= t:
        return hi
    while lo < hi:  # the exponent grows with k above the mean: the largest k with exponent(k) <= t
        mid = (lo + hi + 1) // 2
        if exponent(mid) <= t:
            lo = mid
        else:
            hi = mid - 1
    return lo


class SecureGaussian:
    """Standard normal samples from a cryptographically secure generator.

    Each call draws a fresh 256-bit key and nonce from the operating system (``os.urandom``) and
    expands them with AES-256-CTR into 64-bit words; pairs of 53-bit uniforms in (0, 1] become
    normals by the Box-Muller transform in float64, then the result is cast to the parameter dtype.
    ``torch.normal`` (a Mersenne Twister whose state can be recovered from its outputs) is never
    used for privacy noise.
    """

    def sample(self, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        pairs = (n + 1) // 2
        stream = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(os.urandom(16))).encryptor()
        words = torch.frombuffer(bytearray(stream.update(bytes(16 * pairs))), dtype=torch.int64)
        # The top 53 bits of each word, as an integer in [0, 2^53), then mapped to (0, 1].
        u = ((words >> 11) & ((1 << 53) - 1)).to(torch.float64).add_(1.0).mul_(2.0 ** -53)
        u1, u2 = u[:pairs], u[pairs:]
        radius = torch.sqrt(-2.0 * torch.log(u1))
        angle = (2.0 * torch.pi) * u2
        z = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])
        return z[:n].to(dtype)


class PerSampleClipper:
    """Per-sample gradients of a session's LoRA layers, clipped and summed over a logical batch.

    Hooks are put on the given ``nn.Linear`` modules only; they record nothing unless
    :meth:`per_sample_backward` is running (or :meth:`start_capture` is on), so ``forward``,
    ``sample`` and other sessions' ops on the same shared base model are unaffected.

    The clipped parameters are known by identity: every parameter of the given modules (the
    session's own LoRA factors), whatever their ``requires_grad`` is when the clipper is built. PEFT
    freezes the adapters that are not active (``add_adapter`` / ``set_adapter``), so a session's
    factors are frozen while another session's op runs; a snapshot taken by ``requires_grad`` would
    miss them. ``expected`` (the session's adapter parameters) must be exactly that set: a trainable
    parameter outside the clipped layers would escape per-sample clipping.
    """

    def __init__(self, modules: Sequence[nn.Linear], max_grad_norm: float,
                 expected: Sequence[nn.Parameter] | None = None) -> None:
        if not modules:
            raise InvalidArgument("config.lora_config.target_modules", "DP needs at least one LoRA layer")
        self.modules = list(modules)
        self.params = [p for m in self.modules for p in m.parameters()]
        if not self.params:
            raise InvalidArgument("config.lora_config.target_modules", "DP needs at least one LoRA parameter")
        if expected is not None and {id(p) for p in expected} != {id(p) for p in self.params}:
            raise InvalidArgument("config.lora_config.target_modules",
                                  "DP-SGD clips the LoRA factors of linear layers only; this adapter trains "
                                  "other parameters too")
        self.max_grad_norm = float(max_grad_norm)
        self.summed: dict[nn.Parameter, torch.Tensor] = {}
        self.rows = 0  # rows (samples) clipped into ``summed`` since the last reset
        self._capturing = False
        self._grad_samples: dict[nn.Parameter, torch.Tensor] = {}
        # per_sample_backward's forward: (layer, its input, its output) of each LoRA layer call
        self._recorded: list[tuple[nn.Linear, torch.Tensor, GradientEdge]] | None = None
        self._handles = [m.register_forward_hook(self._forward_hook) for m in self.modules]

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.reset()

    def reset(self) -> None:
        self.summed = {}
        self.rows = 0
        self._grad_samples = {}

    # -- hooks ----------------------------------------------------------------------------------
    def _forward_hook(self, module: nn.Linear, inputs: tuple, output: torch.Tensor) -> None:
        if not torch.is_grad_enabled() or not output.requires_grad:
            return
        activations = inputs[0].detach()
        if self._recorded is not None:  # per_sample_backward: the output's gradient is asked for after
            self._recorded.append((module, activations, get_gradient_edge(output)))  # not the output itself
            return
        if not self._capturing:
            return

        def on_grad(backprops: torch.Tensor) -> None:
            self._add_grad_samples(module, activations, backprops.detach())

        output.register_hook(on_grad)

    def _add_grad_samples(self, module: nn.Linear, activations: torch.Tensor, backprops: torch.Tensor) -> None:
        for param, grad_sample in compute_linear_grad_sample(module, [activations], backprops).items():
            if param in self._grad_samples:
                self._grad_samples[param] = self._grad_samples[param] + grad_sample
            else:
                self._grad_samples[param] = grad_sample

    # -- one micro-batch ---------------------------------------------------------------------------
    def start_capture(self, on: bool) -> None:
        """Capture (``on``) the per-sample gradients of any backward through the next forward, by hooks
        on the layers' outputs, for a pass whose backward someone else runs; then
        :meth:`accumulate_captured`."""
        if on:
            self._grad_samples = {}
        self._capturing = on

    def accumulate_captured(self, rows: int | None) -> None:
        """Clip the captured rows into the sum (``rows`` None: drop them); no unclipped gradient is kept."""
        try:
            if rows is not None:
                self._accumulate(rows)
        finally:
            self._grad_samples = {}
            for p in self.params:
                p.grad = None

    def per_sample_backward(self, forward: Callable[[], LossInputs], loss: Loss) -> list[LossOutput]:
        """Runs the model, one loss per row, one backward; clips each row and adds it to the sum.

        ``forward()`` runs the model and returns the batch's LossInputs (logits included). Returns the
        per-row loss outputs. Nothing is added when a row's loss is not finite.

        The backward is ``torch.autograd.grad`` of the summed row losses with respect to the outputs of
        the session's LoRA layers (their gradient edges, recorded by the forward hooks): it runs in
        the engine with no Python hook in it, and makes no (unclipped) parameter gradient; each layer's
        per-sample gradient is then computed from its activations and that output gradient (Opacus'
        rule), as the hooks of :meth:`start_capture` would.
        """
        self._grad_samples = {}
        self._recorded = []
        try:
            batch = forward()
        finally:
            recorded, self._recorded = self._recorded, None
        try:
            outputs = row_losses(loss, batch)
            if not recorded:
                raise InvalidArgument("batch", "no LoRA layer took part in this forward pass")
            total = torch.stack([o.loss for o in outputs]).sum()
            grads = torch.autograd.grad(total, [edge for _, _, edge in recorded], allow_unused=True)
            del total
            for (module, activations, _), backprops in zip(recorded, grads, strict=True):
                if backprops is not None:  # None: that output did not reach the loss, its gradient is 0
                    self._add_grad_samples(module, activations, backprops)
            del recorded, grads
            self._accumulate(len(outputs))
        finally:
            self._grad_samples = {}
            for p in self.params:
                p.grad = None  # nothing unclipped is ever left on the parameters
        return outputs

    def _accumulate(self, rows: int) -> None:
        samples = self._grad_samples
        if not samples:
            raise InvalidArgument("batch", "no LoRA layer took part in this forward pass")
        sq = torch.zeros(rows, dtype=torch.float64, device=next(iter(samples.values())).device)
        for gs in samples.values():
            sq += gs.reshape(rows, -1).to(torch.float64).pow(2).sum(dim=1)
        norms = sq.sqrt()
        factors = (self.max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)
        if not torch.isfinite(norms).all():
            raise InvalidArgument("batch", "per-sample gradients are not finite; no gradient was accumulated")
        for p, gs in samples.items():
            clipped = torch.einsum("n,n...->...", factors.to(gs.dtype), gs)
            self.summed[p] = self.summed[p] + clipped if p in self.summed else clipped
        self.rows += rows

    # -- the step ----------------------------------------------------------------------------------
    def clipped_sum(self, param: nn.Parameter) -> torch.Tensor:
        got = self.summed.get(param)
        return got if got is not None else torch.zeros_like(param)

    def noised_mean(self, noise_multiplier: float, expected_batch_size: int,
                    noise: SecureGaussian | None) -> dict[nn.Parameter, torch.Tensor]:
        """(sum of clipped rows + N(0, (noise_multiplier * max_grad_norm)^2 I)) / expected_batch_size.

        ``noise=None`` adds none: only tests of the clipping itself pass it.
        """
        std = noise_multiplier * self.max_grad_norm
        total = sum(p.numel() for p in self.params)
        z = noise.sample(total) if noise is not None and std > 0 else None
        out, offset = {}, 0
        for p in self.params:
            g = self.clipped_sum(p).clone()
            if z is not None:
                g += std * z[offset:offset + p.numel()].view_as(p).to(p.device, p.dtype)
            offset += p.numel()
            out[p] = g / expected_batch_size
        return out


def split_rows(batch: LossInputs) -> list[LossInputs]:
    """Each row of a batch alone (leading dimension kept), for its own loss.

    The rows are cut by one ``torch.split`` per tensor, not by ``batch.logits[i:i + 1]`` per row: the
    backward of a slice writes its gradient into a zero tensor of the whole batch's shape, so B row
    slices of [B, T, vocab] logits cost B full-size zero-fills and adds (2.7 s of a 7.4 s DP step at
    B=16 on SmolLM2); the backward of one split is one concatenation.
    """
    n = batch.input_ids.shape[0]

    def rows(t: torch.Tensor | None) -> list[torch.Tensor | None]:
        return [None] * n if t is None else list(torch.split(t, 1))

    extra = {k: list(torch.split(v, 1)) for k, v in batch.extra.items()}
    return [LossInputs(logits=lg, input_ids=ids, attention_mask=am, labels=lb, advantages=adv, old_logprobs=old,
                       extra={k: v[i] for k, v in extra.items()})
            for i, (lg, ids, am, lb, adv, old) in enumerate(zip(
                rows(batch.logits), rows(batch.input_ids), rows(batch.attention_mask), rows(batch.labels),
                rows(batch.advantages), rows(batch.old_logprobs), strict=True))]


def row_losses(loss: Loss, batch: LossInputs) -> list[LossOutput]:
    """Each row's own loss (a DP step clips each row's gradient); INVALID_ARGUMENT if one is not finite."""
    outputs = [loss(row) for row in split_rows(batch)]
    for i, out in enumerate(outputs):
        if not torch.isfinite(out.loss):
            raise InvalidArgument("batch", f"the loss of row {i} is not finite; no gradient was accumulated")
    return outputs


def lora_layers(model: nn.Module, session_id: str) -> list[nn.Linear]:
    """The session's LoRA factor layers; refuses an adapter with parameters outside ``nn.Linear`` layers."""
    marker = f".{session_id}."
    layers: list[nn.Linear] = []
    for name, module in model.named_modules():
        if not any(marker in f"{name}.{n}." for n, _ in module.named_parameters(recurse=False)):
            continue
        if type(module) is not nn.Linear:
            raise InvalidArgument("config.lora_config.target_modules",
                                  f"DP-SGD clips per-sample gradients of LoRA linear layers only; {name} is a "
                                  f"{type(module).__name__}")
        layers.append(module)
    return layers
