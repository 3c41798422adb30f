"""The server-side loss registry: values against plain reference computations, gradients,
ignore_index, validation (every error names its field) and operator plugins via entry points."""

from __future__ import annotations

import logging
import math
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from tensafe.runtime.errors import InvalidArgument
from tensafe.trainer.losses import LossInputs, LossOutput, available_losses, register_loss, resolve_loss, token_logprobs
from tensafe.trainer.losses import registry as losses

B, T, V = 4, 6, 11
BUILTINS = ["contrastive", "importance_sampling", "margin_ranking", "mse", "ppo", "token_ce"]


def make_inputs(seed: int = 0, batch: int = B, ignore_index: int = -100) -> LossInputs:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, V, (batch, T), generator=g)
    labels = input_ids.clone()
    labels[:, :2] = ignore_index  # a prompt that is not trained on
    labels[0, -1] = ignore_index
    labels[1, 3] = ignore_index
    return LossInputs(
        logits=torch.randn(batch, T, V, generator=g, requires_grad=True),
        input_ids=input_ids,
        attention_mask=torch.ones(batch, T, dtype=torch.long),
        labels=labels,
        advantages=torch.randn(batch, T, generator=g),
        old_logprobs=-torch.rand(batch, T, generator=g) * 3,
        extra={
            "group_ids": torch.tensor([0, 0, 1, 1, 1, 2, 2, 2][:batch]),
            "is_positive": torch.tensor([1, 0, 0, 1, 0, 0, 0, 1][:batch], dtype=torch.bool),
            "targets": torch.randn(batch, generator=g) - 2,
        },
    )


def ref_token_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100):
    """Loops: logp[b][t] = log softmax(logits[b, t-1])[labels[b, t]] for the label tokens."""
    out = {}
    for b in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            if labels[b, t] != ignore_index:
                row = logits[b, t - 1].double()
                out[b, t] = float(row[labels[b, t]] - torch.logsumexp(row, 0))
    return out


def ref_scores(inputs: LossInputs) -> list[float]:
    lp = ref_token_logprobs(inputs.logits.detach(), inputs.labels)
    return [sum(v for (b, _), v in lp.items() if b == row) / sum(1 for (b, _) in lp if b == row) for row in range(B)]


def test_token_logprobs_matches_loops_and_zero_elsewhere():
    x = make_inputs()
    logp, mask = token_logprobs(x.logits, x.labels)
    ref = ref_token_logprobs(x.logits.detach(), x.labels)
    assert logp.shape == (B, T) and logp.dtype == torch.float32 and mask.dtype == torch.bool
    assert set(map(tuple, mask.nonzero().tolist())) == set(ref)
    for (b, t), v in ref.items():
        assert logp[b, t].item() == pytest.approx(v, abs=1e-5)
    assert torch.all(logp[~mask] == 0) and not mask[:, 0].any()
    out = resolve_loss("token_ce")(x)
    assert not out.token_logprobs.requires_grad and torch.equal(out.token_logprobs, logp.detach())


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_token_ce_equals_torch_cross_entropy(smoothing):
    x = make_inputs()
    out = resolve_loss("token_ce", label_smoothing=smoothing)(x)
    ref = F.cross_entropy(x.logits[:, :-1].reshape(-1, V), x.labels[:, 1:].reshape(-1), label_smoothing=smoothing)
    assert out.loss.item() == pytest.approx(ref.item(), abs=1e-6)
    assert out.num_tokens == int((x.labels[:, 1:] != -100).sum()) == out.metrics["num_tokens"]
    assert out.metrics["loss"] == pytest.approx(ref.item(), abs=1e-6)


def test_token_ce_custom_ignore_index_and_empty_batch():
    x = make_inputs(ignore_index=-1)
    out = resolve_loss("token_ce", ignore_index=-1)(x)
    ref = F.cross_entropy(x.logits[:, :-1].reshape(-1, V), x.labels[:, 1:].reshape(-1), ignore_index=-1)
    assert out.loss.item() == pytest.approx(ref.item(), abs=1e-6)
    x.labels[:] = -100
    out = resolve_loss("token_ce")(x)
    assert out.num_tokens == 0 and out.loss.item() == 0.0  # no NaN poisoning an accumulated gradient
    out.loss.backward()
    assert torch.all(x.logits.grad == 0)


def test_token_ce_equals_hf_llama_loss():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config).eval()
    input_ids = torch.randint(0, 64, (3, 9))
    labels = input_ids.clone()
    labels[:, :3] = -100
    labels[2, 6:] = -100
    with torch.no_grad():
        out = model(input_ids=input_ids, labels=labels)
    mine = resolve_loss(None)(LossInputs(out.logits, input_ids, torch.ones_like(input_ids), labels))
    assert mine.loss.item() == pytest.approx(out.loss.item(), abs=1e-5)


def test_importance_sampling_matches_reference_and_ignores_garbage_at_ignored_positions():
    x = make_inputs()
    ignored = x.labels == -100
    x.old_logprobs[ignored] = float("nan")  # whatever the client sends there must not matter
    x.advantages[ignored] = float("inf")
    out = resolve_loss("importance_sampling")(x)
    lp = ref_token_logprobs(x.logits.detach(), x.labels)
    terms = [math.exp(v - x.old_logprobs[bt].item()) * x.advantages[bt].item() for bt, v in lp.items()]
    assert out.loss.item() == pytest.approx(-sum(terms) / len(terms), rel=1e-5)
    out.loss.backward()
    assert torch.isfinite(x.logits.grad).all()


def test_ppo_matches_reference_with_clipping():
    x = make_inputs()
    eps = 0.2
    logp, _ = token_logprobs(x.logits, x.labels)
    x.old_logprobs = logp.detach() + 0.3 * torch.randn(B, T, generator=torch.Generator().manual_seed(1))
    out = resolve_loss("ppo", clip_epsilon=eps)(x)
    lp = ref_token_logprobs(x.logits.detach(), x.labels)
    terms, clipped = [], 0
    for bt, v in lp.items():
        ratio, adv = math.exp(v - x.old_logprobs[bt].item()), x.advantages[bt].item()
        terms.append(min(ratio * adv, max(1 - eps, min(ratio, 1 + eps)) * adv))
        clipped += abs(ratio - 1) > eps
    assert out.loss.item() == pytest.approx(-sum(terms) / len(terms), rel=1e-5)
    assert out.metrics["clip_fraction"] == pytest.approx(clipped / len(terms))
    assert 0 < out.metrics["clip_fraction"] < 1  # the batch exercises both branches


def test_ppo_on_policy_is_minus_mean_advantage():
    x = make_inputs()
    logp, mask = token_logprobs(x.logits, x.labels)
    x.old_logprobs = logp.detach().clone()
    out = resolve_loss("ppo")(x)
    assert out.loss.item() == pytest.approx(-x.advantages[mask].mean().item(), abs=1e-6)
    assert out.metrics["clip_fraction"] == 0 and out.metrics["approx_kl"] == pytest.approx(0, abs=1e-7)


def test_margin_ranking_matches_reference():
    x = make_inputs()
    s = ref_scores(x)
    out = resolve_loss("margin_ranking", margin=0.5)(x)
    pairs = [(s[0], s[1]), (s[2], s[3])]
    assert out.loss.item() == pytest.approx(sum(max(0.0, 0.5 - (c - r)) for c, r in pairs) / 2, abs=1e-5)
    assert out.metrics["accuracy"] == sum(c > r for c, r in pairs) / 2


def test_margin_ranking_needs_pairs():
    loss = resolve_loss("margin_ranking")
    with pytest.raises(InvalidArgument) as e:
        loss.check_batch({}, 3, T)
    assert e.value.field == "batch.input_ids"
    with pytest.raises(InvalidArgument) as e:
        loss(make_inputs(batch=3))
    assert e.value.field == "batch.input_ids"


def test_contrastive_matches_reference():
    x = make_inputs(batch=8)
    for k in ("advantages", "old_logprobs"):
        setattr(x, k, None)
    lp = ref_token_logprobs(x.logits.detach(), x.labels)
    s = [sum(v for (b, _), v in lp.items() if b == r) / sum(1 for (b, _) in lp if b == r) for r in range(8)]
    temp = 0.5
    groups = {0: [0, 1], 1: [2, 3, 4], 2: [5, 6, 7]}
    positives = {0: 0, 1: 3, 2: 7}
    ref = [-(s[positives[g]] / temp - math.log(sum(math.exp(s[r] / temp) for r in rows))) for g, rows in groups.items()]
    out = resolve_loss("contrastive", temperature=temp)(x)
    assert out.loss.item() == pytest.approx(sum(ref) / 3, abs=1e-5)
    assert out.metrics["num_groups"] == 3


def test_contrastive_needs_exactly_one_positive_per_group():
    x = make_inputs()
    x.extra["is_positive"] = torch.tensor([1, 1, 0, 1], dtype=torch.bool)
    with pytest.raises(InvalidArgument, match="group 0 has 2 positives") as e:
        resolve_loss("contrastive")(x)
    assert e.value.field == "batch.extra.is_positive"
    x.extra["is_positive"] = torch.tensor([1, 0, 0, 0], dtype=torch.bool)
    with pytest.raises(InvalidArgument) as e:
        resolve_loss("contrastive")(x)
    assert e.value.field == "batch.extra.is_positive"
    x.extra["group_ids"] = torch.tensor([0.0, 0, 1, 1])
    with pytest.raises(InvalidArgument) as e:
        resolve_loss("contrastive")(x)
    assert e.value.field == "batch.extra.group_ids"


def test_mse_matches_reference():
    x = make_inputs()
    s = ref_scores(x)
    out = resolve_loss("mse")(x)
    ref = sum((si - x.extra["targets"][i].item()) ** 2 for i, si in enumerate(s)) / B
    assert out.loss.item() == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("name", BUILTINS)
def test_gradients_flow_and_metrics(name):
    x = make_inputs()
    out = resolve_loss(name)(x)
    assert isinstance(out, LossOutput) and out.loss.dim() == 0
    assert {"loss", "num_tokens"} <= set(out.metrics)
    assert all(isinstance(v, float) for v in out.metrics.values())
    out.loss.backward()
    grad = x.logits.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("name", BUILTINS)
def test_ignored_positions_do_not_matter(name):
    x, y = make_inputs(), make_inputs()
    with torch.no_grad():  # the logits that predict an ignored label, and the last position, predict nothing
        for b, t in (x.labels[:, 1:] == -100).nonzero().tolist():
            y.logits[b, t] += 100 * torch.randn(V)
        y.logits[:, -1] += 100 * torch.randn(B, V)
    a, c = resolve_loss(name)(x), resolve_loss(name)(y)
    assert a.loss.item() == pytest.approx(c.loss.item(), abs=1e-5)
    c.loss.backward()
    for b, t in (x.labels[:, 1:] == -100).nonzero().tolist():
        assert torch.all(y.logits.grad[b, t] == 0)


def test_sequence_loss_rejects_a_row_without_label_tokens():
    x = make_inputs()
    x.labels[2] = -100
    with pytest.raises(InvalidArgument, match="row 2") as e:
        resolve_loss("mse")(x)
    assert e.value.field == "batch.labels"


def test_resolve_defaults_and_kwargs():
    assert resolve_loss(None).name == resolve_loss("").name == "token_ce"
    assert resolve_loss("").kwargs == {"ignore_index": -100, "label_smoothing": 0.0}
    loss = resolve_loss("ppo", clip_epsilon=1)
    assert loss.kwargs == {"clip_epsilon": 1.0, "ignore_index": -100, "reduction": "mean",
                           "clip_low_threshold": 0.0, "clip_high_threshold": 0.0}
    assert loss.requires == ("advantages", "old_logprobs")
    assert set(BUILTINS) <= set(available_losses())


@pytest.mark.parametrize(
    ("name", "kwargs", "field"),
    [
        ("nope", {}, "loss.name"),
        (3, {}, "loss.name"),
        ("token_ce", {"foo": 1}, "loss.kwargs.foo"),
        ("token_ce", {"label_smoothing": 1.0}, "loss.kwargs.label_smoothing"),
        ("token_ce", {"label_smoothing": -0.1}, "loss.kwargs.label_smoothing"),
        ("token_ce", {"label_smoothing": float("nan")}, "loss.kwargs.label_smoothing"),
        ("token_ce", {"label_smoothing": "0.1"}, "loss.kwargs.label_smoothing"),
        ("token_ce", {"ignore_index": 1.5}, "loss.kwargs.ignore_index"),
        ("token_ce", {"ignore_index": True}, "loss.kwargs.ignore_index"),
        ("ppo", {"clip_epsilon": 0}, "loss.kwargs.clip_epsilon"),
        ("ppo", {"clip_epsilon": -0.2}, "loss.kwargs.clip_epsilon"),
        ("margin_ranking", {"margin": -1.0}, "loss.kwargs.margin"),
        ("contrastive", {"temperature": 0.0}, "loss.kwargs.temperature"),
        ("contrastive", {"temperature": -1}, "loss.kwargs.temperature"),
        ("mse", {"margin": 1.0}, "loss.kwargs.margin"),
    ],
)
def test_bad_name_or_kwargs(name, kwargs, field):
    with pytest.raises(InvalidArgument) as e:
        resolve_loss(name, **kwargs)
    assert e.value.field == field


def test_unknown_name_lists_available():
    available = "cispo, contrastive, cross_entropy, dro, importance_sampling"
    with pytest.raises(InvalidArgument, match=f"unknown loss 'focal'; available: {available}"):
        resolve_loss("focal")


@pytest.mark.parametrize(
    ("name", "drop", "field"),
    [
        ("importance_sampling", "advantages", "batch.advantages"),
        ("ppo", "old_logprobs", "batch.old_logprobs"),
        ("contrastive", "extra.group_ids", "batch.extra.group_ids"),
        ("contrastive", "extra.is_positive", "batch.extra.is_positive"),
        ("mse", "extra.targets", "batch.extra.targets"),
    ],
)
def test_missing_or_misshaped_inputs(name, drop, field):
    loss = resolve_loss(name)
    full = {"advantages": (B, T), "old_logprobs": (B, T), "extra.group_ids": (B,), "extra.is_positive": (B,)}
    full["extra.targets"] = (B,)
    loss.check_batch(full, B, T)
    wrong = (B, T + 1) if "extra" not in drop else (B, 2)
    for shapes in ({k: v for k, v in full.items() if k != drop}, {**full, drop: wrong}):
        with pytest.raises(InvalidArgument) as e:
            loss.check_batch(shapes, B, T)
        assert e.value.field == field
    x = make_inputs()  # the same checks run when the loss is called
    if drop.startswith("extra."):
        del x.extra[drop.removeprefix("extra.")]
    else:
        setattr(x, drop, None)
    with pytest.raises(InvalidArgument) as e:
        loss(x)
    assert e.value.field == field


def test_bad_labels():
    x = make_inputs()
    with pytest.raises(InvalidArgument) as e:
        token_logprobs(x.logits, x.labels[:, 1:])
    assert e.value.field == "batch.labels"
    x.labels[0, 3] = V
    with pytest.raises(InvalidArgument) as e:
        resolve_loss("token_ce")(x)
    assert e.value.field == "batch.labels"


# ------------------------------------------------------------------------------------- operator plugins


@pytest.fixture
def plugin_env(tmp_path, monkeypatch):
    """A throwaway installed distribution declaring ``tensafe.losses`` entry points, and a fresh registry."""
    monkeypatch.setattr(losses, "_REGISTRY", dict(losses._REGISTRY))
    monkeypatch.setattr(losses, "_entry_points_loaded", False)
    (tmp_path / "tensafe_focal_plugin.py").write_text(
        textwrap.dedent(
            """
            import torch
            from tensafe.trainer.losses import LossOutput, register_loss, token_logprobs

            @register_loss("weighted_ce", requires=("extra.weights:B",))
            def weighted_ce(inputs, ignore_index: int = -100):
                logp, mask = token_logprobs(inputs.logits, inputs.labels, ignore_index)
                w = inputs.extra["weights"][:, None]
                return LossOutput(-(w * logp).sum() / mask.sum(), int(mask.sum()), {}, logp.detach())

            def focal(inputs, gamma: float = 2.0, ignore_index: int = -100):
                logp, mask = token_logprobs(inputs.logits, inputs.labels, ignore_index)
                loss = -(((1 - logp.exp()) ** gamma) * logp)[mask].mean()
                return LossOutput(loss, int(mask.sum()), {"gamma": gamma}, logp.detach())

            def hijack(inputs, **kwargs):
                raise AssertionError("a plugin must never replace a built-in")
            """
        )
    )
    dist = tmp_path / "tensafe_focal_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tensafe-focal-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[tensafe.losses]\n"
        "focal = tensafe_focal_plugin:focal\n"
        "weighted_ce = tensafe_focal_plugin:weighted_ce\n"
        "token_ce = tensafe_focal_plugin:hijack\n"
        "broken = tensafe_no_such_module:fn\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("tensafe_focal_plugin", None)


def test_entry_point_losses(plugin_env, caplog):
    caplog.set_level(logging.WARNING, logger="tensafe.trainer.losses")
    focal = resolve_loss("focal", gamma=1)
    assert focal.kwargs == {"gamma": 1.0, "ignore_index": -100}
    x = make_inputs()
    out = focal(x)
    logp, mask = token_logprobs(x.logits, x.labels)
    assert out.loss.item() == pytest.approx(-(((1 - logp.exp()) * logp)[mask]).mean().item(), rel=1e-6)
    assert out.metrics["loss"] == out.loss.item() and out.metrics["num_tokens"] == out.num_tokens
    with pytest.raises(InvalidArgument) as e:
        resolve_loss("focal", gamma="big")
    assert e.value.field == "loss.kwargs.gamma"
    with pytest.raises(InvalidArgument) as e:
        resolve_loss("focal", alpha=0.25)
    assert e.value.field == "loss.kwargs.alpha"

    weighted = resolve_loss("weighted_ce")  # registered itself by decorator, requirements included
    with pytest.raises(InvalidArgument) as e:
        weighted.check_batch({}, B, T)
    assert e.value.field == "batch.extra.weights"
    x.extra["weights"] = torch.ones(B)
    assert weighted(x).loss.item() == pytest.approx(resolve_loss("token_ce")(x).loss.item(), rel=1e-6)

    assert resolve_loss("token_ce")(x).loss.item() > 0  # the built-in, not the hijacker
    assert "'token_ce' is a built-in loss" in caplog.text
    assert "tensafe_no_such_module" in caplog.text  # a broken plugin is logged, the others still load
    assert {"focal", "weighted_ce"} <= set(available_losses()) and "broken" not in available_losses()


def test_register_loss_cannot_replace_a_builtin(monkeypatch, caplog):
    monkeypatch.setattr(losses, "_REGISTRY", dict(losses._REGISTRY))
    builtin = losses._REGISTRY["ppo"].fn

    @register_loss("ppo")
    def fake(inputs):
        raise AssertionError

    assert losses._REGISTRY["ppo"].fn is builtin and "'ppo' is a built-in loss" in caplog.text


@pytest.mark.parametrize("requires", [("advantage",), ("extra.x:BX",), ("targets",)])
def test_register_loss_rejects_bad_requires(monkeypatch, requires):
    monkeypatch.setattr(losses, "_REGISTRY", dict(losses._REGISTRY))
    with pytest.raises(ValueError, match="bad requires"):
        register_loss("x", requires=requires)(lambda inputs: None)


def test_bf16_logits_and_single_token_rows():
    x = make_inputs()
    out = resolve_loss("token_ce")(LossInputs(x.logits.bfloat16(), x.input_ids, x.attention_mask, x.labels))
    assert out.token_logprobs.dtype == torch.float32 and out.loss.dtype == torch.float32
    one = LossInputs(x.logits[:, :1], x.input_ids[:, :1], x.attention_mask[:, :1], x.labels[:, :1])
    out = resolve_loss("token_ce")(one)
    assert out.num_tokens == 0 and out.token_logprobs.shape == (B, 1)
