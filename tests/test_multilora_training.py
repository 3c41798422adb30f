"""Several sessions' ForwardBackward/Forward ops in one pass of their shared base (multi-LoRA batching).

Every test compares a batched pass with the same sessions run one at a time: two sets of sessions with the
same seeds and configs (so the same initial adapters and RNG), one set's ops run alone through the worker,
the other's run as one pass (``passes.run_pass``, or the worker with the ops queued together). Sessions
differ in rank, target modules, LoRA dropout, batch rows and length; two are DP sessions (per-sample
clipping through their own clipper).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from peft.tuners.lora.layer import Linear as LoraLinear

from tensafe.api.trainer.v1 import trainer_pb2
from tensafe.common import multilora
from tensafe.runtime.accountant_client import AccountantClient
from tensafe.runtime.config import ServerConfig
from tensafe.runtime.errors import InvalidArgument
from tensafe.runtime.peers import PeerChannels
from tensafe.trainer.batches import prepare_batch
from tensafe.trainer.config_checks import validate_config
from tensafe.trainer.dp import PerSampleClipper, lora_layers
from tensafe.trainer.losses import resolve_loss
from tensafe.trainer.messages import OP_FORWARD, OP_FORWARD_BACKWARD, OP_OPTIM_STEP
from tensafe.trainer.passes import PassOp, StepOp, run_pass
from tensafe.trainer.service import Trainer
from tensafe.trainer.servicer import batch_value, config_value
from tensafe.trainer.session import TrainingSession
from tensafe.trainer.settings import DPState
from tensafe.trainer.values import BatchInput
from tg_tinker import LoRAConfig, TrainingConfig
from tg_tinker.training import batch_to_proto

SUCCEEDED = trainer_pb2.FUTURE_STATE_SUCCEEDED
TERMINAL = (SUCCEEDED, trainer_pb2.FUTURE_STATE_FAILED, trainer_pb2.FUTURE_STATE_CANCELLED)
# name: (rank, target modules, dropout, DP, rows, length)
SESSIONS = {
    "plain": (4, ["q_proj", "v_proj"], 0.0, False, 2, 9),
    "dropout": (8, ["q_proj", "k_proj", "v_proj", "o_proj"], 0.1, False, 3, 6),
    "mlp": (2, ["gate_proj", "up_proj", "down_proj"], 0.05, False, 1, 12),
    "dp": (4, ["q_proj", "v_proj"], 0.0, True, 3, 7),
    "dp_dropout": (4, ["q_proj", "v_proj", "down_proj"], 0.1, True, 2, 10),
    # twins of the same rank and batch shape: their products are computed stacked (one bmm per layer)
    "dropout_twin": (8, ["q_proj", "k_proj", "v_proj", "o_proj"], 0.1, False, 3, 6),
    "plain_twin": (4, ["q_proj", "v_proj"], 0.0, False, 2, 9),
}


@pytest.fixture(scope="module")
def trainer(tiny_model: Path) -> Iterator[Trainer]:
    t = Trainer(tiny_model.parent)
    yield t
    t.shutdown()


def _accountant(tmp: Path) -> AccountantClient:
    """A real client that is never called: forward_backward does not talk to the accountant."""
    config = ServerConfig.load(environ={}, env_file=tmp / "none.env", data_dir=tmp)
    return AccountantClient(PeerChannels(config, "trainer", None, frozenset()))


def _session(trainer: Trainer, tenant: str, name: str, seed: int) -> TrainingSession:
    rank, targets, dropout, dp, _, _ = SESSIONS[name]
    cfg = config_value(TrainingConfig(model_ref="tiny", seed=seed, batch_size=4,
                                      lora_config=LoRAConfig(rank=rank, alpha=2 * rank, dropout=dropout,
                                                             target_modules=targets)).to_proto())
    s = trainer.create_session(tenant, cfg)
    with s.base.lock:  # LoRA B starts at zero: give every factor a value, the same for the same seed
        gen = torch.Generator().manual_seed(seed)
        for p in s.params:
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        if dp:
            settings, _ = validate_config(cfg)
            s.dp = DPState(noise_multiplier=1.0, max_grad_norm=0.05, sample_rate=0.1, expected_batch_size=4,
                           accountant_type=1, target_epsilon=8.0, target_delta=1e-5, batch_limit=64)
            s.dp.clipper = PerSampleClipper(lora_layers(s.base.peft_model(), s.session_id), 0.05, s.params)
            s.accountant = _accountant(trainer.model_dir or Path('.'))
            assert settings.dp is None  # the config itself is not DP: the state above is what makes it one
    return s


def _batch(name: str, seed: int) -> BatchInput:
    _, _, _, _, rows, length = SESSIONS[name]
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 380, size=(rows, length))
    mask = np.ones_like(ids)
    mask[0, length - 2:] = 0  # a row with its own padding
    labels = np.where(mask == 1, ids, -100)
    return batch_value(batch_to_proto({"input_ids": ids, "attention_mask": mask, "labels": labels}))


def _prepared(s: TrainingSession, name: str, seed: int):
    return prepare_batch(_batch(name, seed), vocab_size=s.base.vocab_size, max_length=s.settings.max_length)


def _grads(s: TrainingSession) -> list[torch.Tensor]:
    if s.dp is not None:
        assert s.dp.clipper is not None
        return [s.dp.clipper.clipped_sum(p).clone() for p in s.params]
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in s.params]


def _wait(op, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while op.state not in TERMINAL:
        assert time.monotonic() < deadline, f"op {op.future_id} still in state {op.state}"
        time.sleep(0.002)
    return op


def _close(trainer: Trainer, sessions) -> None:
    for s in sessions:
        trainer.close(s.tenant_id, s.session_id)


def _alone(trainer: Trainer, s: TrainingSession, train: bool, prepared) -> object:
    """One op through the worker with nothing else queued: the one-at-a-time path."""
    loss = resolve_loss("token_ce")
    op = trainer._submit(s, OP_FORWARD_BACKWARD if train else OP_FORWARD, PassOp(s, train, prepared, loss, True))  # pyright: ignore[reportPrivateUsage]
    return _wait(op)


def _close_enough(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_a_batched_pass_equals_each_session_run_alone(trainer: Trainer) -> None:
    names = list(SESSIONS)
    alone = [_session(trainer, f"tenant-{i}", n, seed=10 + i) for i, n in enumerate(names)]
    batched = [_session(trainer, f"tenant-{i}", n, seed=10 + i) for i, n in enumerate(names)]
    try:
        assert all(s.base is alone[0].base for s in alone + batched)  # one shared base
        for step in range(2):  # two micro-batches: gradients (and clipped sums) accumulate as alone
            ref = [_alone(trainer, s, True, _prepared(s, n, 100 * step + i)) for i, (s, n) in
                   enumerate(zip(alone, names, strict=True))]
            parts = [PassOp(s, True, _prepared(s, n, 100 * step + i), resolve_loss("token_ce"), True)
                     for i, (s, n) in enumerate(zip(batched, names, strict=True))]
            with batched[0].base.lock:
                got = run_pass(parts)
            for r, (field, res), s in zip(ref, got, batched, strict=True):
                assert r.state == SUCCEEDED and field == "forward_backward"
                assert res.num_tokens == r.result.num_tokens and res.num_sequences == r.result.num_sequences
                assert res.loss == pytest.approx(r.result.loss, rel=1e-5)
                np.testing.assert_allclose(np.frombuffer(res.logprobs.data, np.float32),
                                           np.frombuffer(r.result.logprobs.data, np.float32), rtol=1e-4, atol=1e-5)
                assert s.micro_steps == step + 1
        for a, b in zip(alone, batched, strict=True):
            _close_enough(_grads(a), _grads(b))  # gradients (DP: clipped sums) as when each ran alone
            assert a.dp is None or a.dp.clipper is not None and a.dp.clipper.rows == b.dp.clipper.rows
            assert torch.equal(a.rng_state, b.rng_state)  # dropout drew from each session's own stream
            if b.dp is None:
                assert all(p.grad is not None for p in b.params)
            else:  # a DP session keeps no unclipped gradient
                assert all(p.grad is None for p in b.params)
        # Forward ops batch too (no gradient anywhere).
        fwd = [PassOp(s, False, _prepared(s, n, 7), resolve_loss("token_ce"), True) for s, n in zip(batched, names,
                                                                                                     strict=True)]
        before = [_grads(s) for s in batched]
        with batched[0].base.lock:
            got = run_pass(fwd)
        for s, (field, res), n in zip(alone, got, names, strict=True):
            r = _alone(trainer, s, False, _prepared(s, n, 7))
            assert field == "forward" and res.loss == pytest.approx(r.result.loss, rel=1e-5)
        for s, g in zip(batched, before, strict=True):
            _close_enough(_grads(s), g)
    finally:
        _close(trainer, alone + batched)


def test_the_lora_layers_are_walked_once_per_set_of_adapters(trainer: Trainer) -> None:
    a = _session(trainer, "tenant-a", "plain", seed=1)
    try:
        model = a.base.peft_model()
        layers = multilora.lora_linears(model)
        assert layers and multilora.lora_linears(model) is layers  # cached: no walk of the model per pass
        b = _session(trainer, "tenant-b", "mlp", seed=2)  # new LoRA layers (the MLP's)
        try:
            grown = multilora.lora_linears(model)  # walked again: the set of adapters changed
            assert grown is not layers and set(layers) <= set(grown)
            assert {m for m in grown if b.session_id in m.lora_A} == {
                m for m in model.modules() if isinstance(m, LoraLinear) and b.session_id in m.lora_A} != set()
        finally:
            _close(trainer, [b])
    finally:
        _close(trainer, [a])


def test_one_sessions_broken_rows_reach_no_other_session(trainer: Trainer) -> None:
    """Session B's adapter is poisoned (inf): its op fails, nothing of it is kept, and A's and C's
    gradients are those of running alone; B's weights are not touched by A's and C's ops."""
    a, a_ref = (_session(trainer, "tenant-a", "dropout", seed=3) for _ in range(2))
    c, c_ref = (_session(trainer, "tenant-c", "dp", seed=4) for _ in range(2))
    b = _session(trainer, "tenant-b", "plain", seed=5)
    try:
        with b.base.lock:
            b.params[0].data.fill_(float("inf"))
        b_weights = [p.detach().clone() for p in b.params]
        for ref, n in ((a_ref, "dropout"), (c_ref, "dp")):
            assert _alone(trainer, ref, True, _prepared(ref, n, 1)).state == SUCCEEDED
        parts = [PassOp(a, True, _prepared(a, "dropout", 1), resolve_loss("token_ce"), False),
                 PassOp(b, True, _prepared(b, "plain", 2), resolve_loss("token_ce"), False),
                 PassOp(c, True, _prepared(c, "dp", 1), resolve_loss("token_ce"), False)]
        with b.base.lock:
            got = run_pass(parts)
        assert isinstance(got[1], InvalidArgument) and "not finite" in got[1].message
        assert b.micro_steps == 0 and all(p.grad is None for p in b.params)
        assert got[0][0] == got[2][0] == "forward_backward"
        _close_enough(_grads(a), _grads(a_ref))
        _close_enough(_grads(c), _grads(c_ref))
        assert all(torch.isfinite(g).all() for g in _grads(a) + _grads(c))
        assert _wait(trainer._submit(a, OP_OPTIM_STEP, a.optim_step)).state == SUCCEEDED  # pyright: ignore[reportPrivateUsage]
        assert all(torch.equal(p, w) for p, w in zip(b.params, b_weights, strict=True))
    finally:
        _close(trainer, [a, a_ref, b, c, c_ref])


def test_the_worker_batches_queued_ops_keeps_order_and_charges_shares(trainer: Trainer) -> None:
    names = ["plain", "dropout", "mlp"]
    batched = [_session(trainer, f"tenant-{i}", n, seed=20 + i) for i, n in enumerate(names)]
    alone = [_session(trainer, f"tenant-{i}", n, seed=20 + i) for i, n in enumerate(names)]
    base = batched[0].base
    try:
        fair = base._fair  # pyright: ignore[reportPrivateUsage]
        served = {s.session_id: fair.session_served.get(s.session_id, 0.0) for s in batched}
        passes = base.stats["passes"]
        with base._cond:  # pyright: ignore[reportPrivateUsage] - the worker sees all of them at once
            ops = [[trainer._submit(s, OP_FORWARD_BACKWARD,  # pyright: ignore[reportPrivateUsage]
                                    PassOp(s, True, _prepared(s, n, 30 + k), resolve_loss("token_ce"), False))
                    for k in range(2)] for s, n in zip(batched, names, strict=True)]
        for per_session in ops:
            for op in per_session:
                assert _wait(op).state == SUCCEEDED
            assert per_session[0].end_time <= per_session[1].start_time  # a session's ops in order
        assert base.stats["passes"] - passes == 2  # two passes of three sessions each
        shares = {s.session_id: fair.session_served[s.session_id] - served[s.session_id] for s in batched}
        weights = {s.session_id: 2 * SESSIONS[n][4] * SESSIONS[n][5] for s, n in zip(batched, names, strict=True)}
        first = batched[0].session_id
        for sid, share in shares.items():  # each charged its tokens' share of the passes' seconds
            assert share > 0
            assert share / shares[first] == pytest.approx(weights[sid] / weights[first], rel=1e-6)
        for s, n in zip(alone, names, strict=True):
            for k in range(2):
                _alone(trainer, s, True, _prepared(s, n, 30 + k))
        for a, b in zip(alone, batched, strict=True):
            _close_enough(_grads(a), _grads(b))
    finally:
        _close(trainer, batched + alone)


def test_optimizer_steps_run_in_one_turn_so_sessions_stay_in_step(trainer: Trainer) -> None:
    """Sessions alternating forward_backward and optim_step: each round is one pass and one turn of steps,
    not a convoy of one-session passes; the weights are those of running each session alone."""
    names = ["plain", "mlp", "dp"]
    batched = [_session(trainer, f"tenant-{i}", n, seed=40 + i) for i, n in enumerate(names)]
    alone = [_session(trainer, f"tenant-{i}", n, seed=40 + i) for i, n in enumerate(names)]
    base = batched[0].base
    try:
        for s in batched + alone:
            if s.dp is not None:  # no accountant here: the DP session's step is its clipped sum, kept
                s.dp = None
        groups, ops_run = base.stats["passes"], base.stats["batched_ops"]
        with base._cond:  # pyright: ignore[reportPrivateUsage] - the worker sees all of them at once
            ops = [trainer._submit(s, kind, work) for k in range(2) for s, n in zip(batched, names, strict=True)  # pyright: ignore[reportPrivateUsage]
                   for kind, work in ((OP_FORWARD_BACKWARD, PassOp(s, True, _prepared(s, n, 50 + k),
                                                                    resolve_loss("token_ce"), False)),
                                      (OP_OPTIM_STEP, StepOp(s, s.optim_step)))]
        assert all(_wait(op).state == SUCCEEDED for op in ops)
        assert base.stats["passes"] - groups == 4 and base.stats["batched_ops"] - ops_run == 12
        for s, n in zip(alone, names, strict=True):
            for k in range(2):
                _alone(trainer, s, True, _prepared(s, n, 50 + k))
                assert _wait(trainer._submit(s, OP_OPTIM_STEP, s.optim_step)).state == SUCCEEDED  # pyright: ignore[reportPrivateUsage]
        for a, b in zip(alone, batched, strict=True):
            assert a.step == b.step == 2
            _close_enough([p.detach() for p in a.params], [p.detach() for p in b.params])
    finally:
        _close(trainer, batched + alone)
