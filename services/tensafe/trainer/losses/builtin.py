"""The built-in losses (token_ce, importance_sampling, ppo, margin_ranking, contrastive, mse, policy_gradient; with
Tinker's semantics: cross_entropy, cispo, dro, and importance_sampling / ppo with ``reduction="sum"``) and
the token helpers they share with plugins (:func:`token_logprobs`, :func:`sequence_scores`).

Importing this module registers them; the package seals them as built-ins (see ``registry``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tensafe.runtime.errors import InvalidArgument

from .registry import LossInputs, LossOutput, register_loss

# ---------------------------------------------------------------------------------------------- helpers


def token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logprobs, mask)``, both [B, T]: ``logprobs[:, t] = log softmax(logits[:, t-1])[labels[:, t]]`` in
    float32 with grad, 0 at t=0 and where ``labels == ignore_index``; ``mask`` is True where it counts."""
    if logits.dim() != 3 or tuple(labels.shape) != tuple(logits.shape[:2]):
        raise InvalidArgument("batch.labels", f"expected shape {list(logits.shape[:2])}, got {list(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise InvalidArgument("batch.labels", f"must be integer token ids, got {labels.dtype}")
    b, t, vocab = logits.shape
    mask = labels != ignore_index
    mask[:, 0] = False
    if (mask & ((labels < 0) | (labels >= vocab))).any():
        raise InvalidArgument("batch.labels", f"label ids must be in [0, {vocab}) or equal ignore_index {ignore_index}")
    nll = F.cross_entropy(*_shifted(logits, labels, ignore_index), ignore_index=ignore_index, reduction="none")
    return torch.cat([logits.new_zeros(b, 1, dtype=torch.float32), -nll.view(b, t)[:, :-1]], dim=1), mask


def _shifted(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat float32 logits [B*T, V] and targets labels[:, t+1] (ignore_index at the end), as HF shifts:
    padding the labels rather than slicing the logits avoids a copy of the largest tensor."""
    targets = F.pad(labels[:, 1:], (0, 1), value=ignore_index)
    return logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1)


def sequence_scores(inputs: LossInputs, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(scores [B], logprobs, mask)``: score_i = mean token log-probability over row i's label tokens."""
    logp, mask = token_logprobs(inputs.logits, inputs.labels, ignore_index)
    counts = mask.sum(dim=1)
    if (counts == 0).any():
        row = int((counts == 0).nonzero()[0])
        raise InvalidArgument("batch.labels", f"row {row} has no label tokens; a sequence score needs at least one")
    return logp.sum(dim=1) / counts, logp, mask


def _output(loss: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor, **metrics: float) -> LossOutput:
    n = int(mask.sum())
    return LossOutput(loss, n, {"loss": float(loss.detach()), "num_tokens": float(n), **metrics}, logp.detach())


def _token_input(value: torch.Tensor | None, name: str, like: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if value is None or tuple(value.shape) != tuple(like.shape):
        got = "missing" if value is None else f"shape {list(value.shape)}"
        raise InvalidArgument(f"batch.{name}", f"expected shape {list(like.shape)}, got {got}")
    return torch.where(mask, value.to(like.device, torch.float32), 0.0)  # ignored positions may hold anything


# ---------------------------------------------------------------------------------------------- built-ins


@register_loss("token_ce", per_example=True)
def token_ce(inputs: LossInputs, ignore_index: int = -100, label_smoothing: float = 0.0) -> LossOutput:
    """Next-token cross entropy: logits[:, t-1] predict labels[:, t] (HF ``labels=`` convention).

    loss = sum over label tokens of CE (with ``label_smoothing`` as in ``F.cross_entropy``) / number of
    label tokens, i.e. the mean. Equal to ``model(input_ids, labels=labels).loss`` when smoothing is 0.
    A batch with no label tokens gives a zero loss (and zero gradients). Metric ``nll``: mean -log p."""
    logp, mask = token_logprobs(inputs.logits, inputs.labels, ignore_index)
    n = max(int(mask.sum()), 1)
    nll = -logp.sum() / n
    if label_smoothing == 0.0:
        loss = nll
    else:
        flat, target = _shifted(inputs.logits, inputs.labels, ignore_index)
        smoothed = F.cross_entropy(
            flat, target, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="sum"
        )
        loss = smoothed / n
    return _output(loss, logp, mask, nll=float(nll.detach()))


def _ratio(inputs: LossInputs, ignore_index: int) -> tuple[torch.Tensor, ...]:
    logp, mask = token_logprobs(inputs.logits, inputs.labels, ignore_index)
    old = _token_input(inputs.old_logprobs, "old_logprobs", logp, mask)
    adv = _token_input(inputs.advantages, "advantages", logp, mask)
    ratio = torch.where(mask, logp - old, 0.0).exp()
    return logp, mask, ratio, adv


@register_loss("importance_sampling", requires=("advantages", "old_logprobs"), per_example=True)
def importance_sampling(inputs: LossInputs, ignore_index: int = -100, reduction: str = "mean") -> LossOutput:
    """Policy gradient with importance weights, for off-policy samples.

    Inputs: ``advantages`` A and ``old_logprobs`` (the sampler's log p), both [B, T] aligned with
    ``token_logprobs``. ratio = exp(logp - old_logp); loss = -mean over label tokens of ratio * A
    (``reduction="sum"``: the sum, as Tinker's ``importance_sampling``; metric ``loss:sum``).
    Metric ``ratio_mean``."""
    logp, mask, ratio, adv = _ratio(inputs, ignore_index)
    n = max(int(mask.sum()), 1)
    loss, extra = _reduce(-(ratio * adv).sum(), n, reduction)
    return _output(loss, logp, mask, ratio_mean=float((ratio.detach() * mask).sum() / n), **extra)


@register_loss("ppo", requires=("advantages", "old_logprobs"), per_example=True)
def ppo(inputs: LossInputs, clip_epsilon: float = 0.2, ignore_index: int = -100, reduction: str = "mean",
        clip_low_threshold: float = 0.0, clip_high_threshold: float = 0.0) -> LossOutput:
    """PPO clipped surrogate. Inputs as ``importance_sampling``; the ratio is clipped to [1 - eps, 1 + eps]
    with eps = ``clip_epsilon``, or to [``clip_low_threshold``, ``clip_high_threshold``] when those are
    given (Tinker's ``ppo``; 0.8 and 1.2 by default there).

    loss = -mean (``reduction="sum"``: sum) over label tokens of min(ratio * A, clip(ratio) * A).
    Metrics: ``clip_fraction`` (label tokens whose ratio was clipped), ``approx_kl`` (mean of
    ratio - 1 - log ratio)."""
    low, high = _clip_range(clip_epsilon, clip_low_threshold, clip_high_threshold)
    logp, mask, ratio, adv = _ratio(inputs, ignore_index)
    n = max(int(mask.sum()), 1)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(low, high) * adv)
    loss, extra = _reduce(-(surrogate * mask).sum(), n, reduction)
    with torch.no_grad():
        clipped = float((((ratio < low) | (ratio > high)) & mask).sum() / n)
        approx_kl = float(((ratio - 1 - ratio.log()) * mask).sum() / n)
    return _output(loss, logp, mask, clip_fraction=clipped, approx_kl=approx_kl, **extra)


def _reduce(total: torch.Tensor, n: int, reduction: str) -> tuple[torch.Tensor, dict[str, float]]:
    """``(loss, metrics)``: the sum over label tokens, or their mean; a sum also reports ``loss:sum``."""
    if reduction == "sum":
        return total, {"loss:sum": float(total.detach())}
    return total / max(n, 1), {}


def _clip_range(eps: float, low: float, high: float) -> tuple[float, float]:
    """The ratio's clip range: [1 - eps, 1 + eps], or [low, high] when either is given (> 0)."""
    if low == 0.0 and high == 0.0:
        return 1 - eps, 1 + eps
    if not 0 < low <= 1 <= high:
        raise InvalidArgument("loss.kwargs.clip_low_threshold",
                              f"need 0 < clip_low_threshold <= 1 <= clip_high_threshold, got {low!r} and {high!r}")
    return low, high


def _pairs(shapes: dict[str, tuple[int, ...]], batch_size: int, seq_len: int) -> None:
    if batch_size % 2:
        raise InvalidArgument(
            "batch.input_ids", f"margin_ranking needs (chosen, rejected) pairs, got {batch_size} rows"
        )


@register_loss("margin_ranking", check=_pairs)
def margin_ranking(inputs: LossInputs, margin: float = 1.0, ignore_index: int = -100) -> LossOutput:
    """Pairwise ranking on sequence scores (score = mean label-token log-probability of a row).

    Rows are pairs [chosen_0, rejected_0, chosen_1, rejected_1, ...] (B even).
    loss = mean over pairs of relu(margin - (s_chosen - s_rejected)). Metric ``accuracy``: share of
    pairs with s_chosen > s_rejected."""
    scores, logp, mask = sequence_scores(inputs, ignore_index)
    chosen, rejected = scores[0::2], scores[1::2]
    loss = F.relu(margin - (chosen - rejected)).mean()
    return _output(loss, logp, mask, accuracy=float((chosen > rejected).float().mean()))


@register_loss("contrastive", requires=("extra.group_ids:B", "extra.is_positive:B"))
def contrastive(inputs: LossInputs, temperature: float = 0.07, ignore_index: int = -100) -> LossOutput:
    """InfoNCE over groups of rows, on sequence scores (mean label-token log-probability of a row).

    Inputs: ``extra.group_ids`` (int [B]) and ``extra.is_positive`` ([B], bool or 0/1; exactly one
    positive per group). loss = mean over groups of -log softmax(scores_in_group / temperature)[positive].
    Metric ``accuracy``: share of groups whose positive has the highest score."""
    groups, positive = inputs.extra["group_ids"], inputs.extra["is_positive"]
    if groups.is_floating_point() or groups.is_complex():
        raise InvalidArgument("batch.extra.group_ids", f"must be integers, got {groups.dtype}")
    if not ((positive == 0) | (positive == 1)).all():
        raise InvalidArgument("batch.extra.is_positive", "must be booleans or 0/1")
    scores, logp, mask = sequence_scores(inputs, ignore_index)
    groups, positive = groups.to(scores.device), positive.to(scores.device).bool()
    terms, hits = [], 0
    for g in groups.unique():
        rows = groups == g
        pos = positive[rows]
        if int(pos.sum()) != 1:
            raise InvalidArgument("batch.extra.is_positive", f"group {int(g)} has {int(pos.sum())} positives, needs 1")
        logits = scores[rows] / temperature
        terms.append(-torch.log_softmax(logits, dim=0)[pos][0])
        hits += int(pos[logits.argmax()])
    loss = torch.stack(terms).mean()
    return _output(loss, logp, mask, accuracy=hits / len(terms), num_groups=float(len(terms)))


@register_loss("mse", requires=("extra.targets:B",), per_example=True)
def mse(inputs: LossInputs, ignore_index: int = -100) -> LossOutput:
    """Regression of sequence scores (mean label-token log-probability of a row) onto ``extra.targets``
    (float [B]): loss = mean over rows of (score - target)^2. Metric ``score_mean``."""
    targets = inputs.extra["targets"]
    scores, logp, mask = sequence_scores(inputs, ignore_index)
    loss = ((scores - targets.to(scores.device, torch.float32)) ** 2).mean()
    return _output(loss, logp, mask, score_mean=float(scores.detach().mean()))


def _token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """[B, T]: entropy of softmax(logits[:, t-1]), the distribution ``labels[:, t]`` is drawn from; 0 at t=0."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    h = -(logp.exp() * logp).sum(dim=-1)
    return torch.cat([h.new_zeros(h.shape[0], 1), h], dim=1)


@register_loss("policy_gradient", requires=("advantages", "old_logprobs"), per_example=True)
def policy_gradient(inputs: LossInputs, clip_epsilon: float = 0.2, clip: bool = True, entropy_coef: float = 0.0,
                    kl_coef: float = 0.0, scale: float = 1.0, ignore_index: int = -100) -> LossOutput:
    """The RLVR objective of ``tensafe.rlvr`` (REINFORCE, PPO, GRPO): per label token t of row i,

    term = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)   (without ``clip``: -ratio * A)
           + kl_coef * (exp(ref - logp) - (ref - logp) - 1)      (k3 estimate of KL(policy || reference))
           - entropy_coef * H_t                                  (entropy of the full next-token distribution)

    with ratio = exp(logp - old_logp); the loss is ``scale`` x the mean over rows of each row's mean term
    over its label tokens (a row without label tokens adds 0), so each trajectory weighs the same whatever
    its length and a row's loss needs no other row (per-example: accepted in DP sessions). ``kl_coef`` > 0
    needs ``extra.ref_logprobs`` [B, T] (the reference model's token log-probabilities). Metrics:
    ``pg_loss``, ``ratio_mean``, ``clip_fraction``, ``approx_kl`` (to the sampling policy), ``entropy``,
    ``kl_ref`` (when kl_coef > 0); token means over the batch."""
    logp, mask, ratio, adv = _ratio(inputs, ignore_index)
    surrogate = ratio * adv
    if clip:
        surrogate = torch.minimum(surrogate, ratio.clamp(1 - clip_epsilon, 1 + clip_epsilon) * adv)
    terms = -surrogate
    pg_terms = terms
    entropy = _token_entropy(inputs.logits)
    if entropy_coef > 0:
        terms = terms - entropy_coef * entropy
    kl = None
    if kl_coef > 0:
        ref = inputs.extra.get("ref_logprobs")
        if ref is None:
            raise InvalidArgument("batch.extra.ref_logprobs", "required by loss 'policy_gradient' when kl_coef > 0")
        ref = _token_input(ref, "extra.ref_logprobs", logp, mask)
        diff = torch.where(mask, ref - logp, 0.0)
        kl = diff.exp() - diff - 1
        terms = terms + kl_coef * kl
    counts = mask.sum(dim=1).clamp(min=1)
    loss = scale * ((terms * mask).sum(dim=1) / counts).mean()
    with torch.no_grad():
        n = max(int(mask.sum()), 1)
        metrics = {
            "pg_loss": float(((pg_terms * mask).sum(dim=1) / counts).mean()),
            "ratio_mean": float((ratio * mask).sum() / n),
            "clip_fraction": float((((ratio - 1).abs() > clip_epsilon) & mask).sum() / n),
            "approx_kl": float(((ratio - 1 - ratio.log()) * mask).sum() / n),
            "entropy": float((entropy * mask).sum() / n),
        }
        if kl is not None:
            metrics["kl_ref"] = float((kl * mask).sum() / n)
    return _output(loss, logp, mask, **metrics)


# ---------------------------------------------------------------------------------------------- Tinker's losses
# Their `loss_fn` names in the `tinker` client (importance_sampling and ppo are the ones above, with
# reduction="sum"): sums over target tokens, not means, and their metrics named "name:reduction".


@register_loss("cross_entropy", per_example=True)
def cross_entropy(inputs: LossInputs, ignore_index: int = -100) -> LossOutput:
    """Tinker's ``cross_entropy``: loss = sum over label tokens of -logp * w, with per-token weights
    ``extra.weights`` (float [B, T], aligned like the labels; absent: 1). Weights may be negative: the
    ``tinker`` client's ``forward_backward_custom`` sends -d(loss)/d(logp). Metric ``loss:sum``."""
    logp, mask = token_logprobs(inputs.logits, inputs.labels, ignore_index)
    weights = inputs.extra.get("weights")
    w = mask.float() if weights is None else _token_input(weights, "extra.weights", logp, mask)
    loss = -(logp * w).sum()
    return _output(loss, logp, mask, **{"loss:sum": float(loss.detach())})


@register_loss("cispo", requires=("advantages", "old_logprobs"), per_example=True)
def cispo(inputs: LossInputs, clip_low_threshold: float = 0.8, clip_high_threshold: float = 1.2,
          ignore_index: int = -100) -> LossOutput:
    """Tinker's ``cispo``: loss = -sum over label tokens of sg(clip(ratio, low, high)) * logp * A; the
    clipped importance weight is a constant, the gradient flows through logp. Inputs as
    ``importance_sampling``. Metrics ``loss:sum``, ``clip_fraction``."""
    low, high = _clip_range(0.0, clip_low_threshold, clip_high_threshold)
    logp, mask, ratio, adv = _ratio(inputs, ignore_index)
    weight = ratio.detach().clamp(low, high)
    loss = -(weight * logp * adv * mask).sum()
    n = max(int(mask.sum()), 1)
    clipped = float((((ratio.detach() < low) | (ratio.detach() > high)) & mask).sum() / n)
    return _output(loss, logp, mask, clip_fraction=clipped, **{"loss:sum": float(loss.detach())})


@register_loss("dro", requires=("advantages", "old_logprobs"), per_example=True)
def dro(inputs: LossInputs, beta: float, ignore_index: int = -100) -> LossOutput:
    """Tinker's ``dro``: loss = -sum over label tokens of logp * A - beta / 2 * (logp - old_logp)^2
    (a quadratic penalty keeps the policy near the sampler's); ``beta`` (> 0) is required. Inputs as
    ``importance_sampling``. Metric ``loss:sum``."""
    logp, mask = token_logprobs(inputs.logits, inputs.labels, ignore_index)
    old = _token_input(inputs.old_logprobs, "old_logprobs", logp, mask)
    adv = _token_input(inputs.advantages, "advantages", logp, mask)
    objective = logp * adv - 0.5 * beta * (logp - old) ** 2
    loss = -(objective * mask).sum()
    return _output(loss, logp, mask, **{"loss:sum": float(loss.detach())})
