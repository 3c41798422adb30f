"""Deadlines between services (#22): a long noise calibration is computed once, whatever the retries,
kept for the next request, and bounded by the caller's own deadline, which crosses the trainer -> accountant hop.

One real `tensafe up` (SQLite) with its Prometheus endpoint on: the accountant counts its calibrations
(``tensafe_accountant_calibrations_total`` by source) and every service records the deadline left
of each call it admits (``tensafe_grpc_deadline_seconds``).
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Stack, free_port, start_stack
from tensafe.api.accountant.v1 import accountant_pb2
from tensafe.api.common.v1 import common_pb2
from tg_tinker import DeadlineTooShortError, DPConfig, LoRAConfig, OptimizerConfig, TrainingConfig

# A PLD calibration well over the 1 s deadlines below: 3.5 s on an idle 2-core machine, longer under load.
# (q = 1, one step took 1.2 s idle, close enough to 1 s that a fast run finished inside the deadline.)
SLOW = {"target_epsilon": 4.0, "target_delta": 1e-5, "sample_rate": 0.02, "num_steps": 500}


@pytest.fixture(scope="module")
def deadline_stack(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Stack]:
    port = free_port()
    s = start_stack(tmp_path_factory.mktemp("deadlines"), {"TENSAFE_MODEL_DIR": str(tiny_model.parent),
                                                           "TENSAFE_METRICS_PORT": str(port)})
    s.metrics_port = port  # type: ignore[attr-defined]
    yield s
    assert s.process.stop() == 0, s.process.output()


def metrics(stack: Stack) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def calibrations(stack: Stack) -> dict[str, float]:
    m = metrics(stack)
    return {src: m.get(("tensafe_accountant_calibrations_total", (("source", src),)), 0.0)
            for src in ("computed", "joined", "cached")}


def deadline_seen(stack: Stack, service: str, method: str) -> tuple[float, float]:
    """(sum, count) of the deadlines left when ``service`` admitted calls of ``method``."""
    m = metrics(stack)
    labels = (("method", method), ("service", service))
    return (m.get(("tensafe_grpc_deadline_seconds_sum", labels), 0.0),
            m.get(("tensafe_grpc_deadline_seconds_count", labels), 0.0))


def calibrate(client, timeout: float, **params):
    req = accountant_pb2.CalibrateNoiseRequest(accountant_type=common_pb2.ACCOUNTANT_TYPE_PLD, **{**SLOW, **params})
    return client._call("accountant", "CalibrateNoise", req, timeout=timeout)


def test_retries_of_a_slow_calibration_join_one_computation_and_then_read_its_answer(deadline_stack: Stack) -> None:
    before = calibrations(deadline_stack)
    with deadline_stack.client(timeout=1.0, retry_count=0) as client:
        # The first request and three retries, each with a 1 s deadline: each is told, before its deadline,
        # that the calibration does not fit and what to do; the calibration runs once.
        for attempt in range(4):
            t0 = time.monotonic()
            with pytest.raises(DeadlineTooShortError) as err:
                calibrate(client, 1.0)
            assert time.monotonic() - t0 < 1.0, f"attempt {attempt} was answered after its deadline"
            assert err.value.code == "DEADLINE_TOO_SHORT"
            assert "noise_multiplier" in err.value.hint and "timeout" in err.value.hint
        after = calibrations(deadline_stack)
        assert after["computed"] - before["computed"] == 1, (before, after)
        assert after["joined"] - before["joined"] == 3, (before, after)

        # A caller with time enough joins the same computation and gets its answer.
        answer = calibrate(client, 300.0)
        assert answer.noise_multiplier > 0 and answer.epsilon <= SLOW["target_epsilon"]
        # Once it is done, the same request is answered at once from the cache, whatever its deadline.
        t0 = time.monotonic()
        again = calibrate(client, 0.5)
        assert time.monotonic() - t0 < 0.5
        assert (again.noise_multiplier, again.epsilon) == (answer.noise_multiplier, answer.epsilon)
    final = calibrations(deadline_stack)
    assert final["computed"] - before["computed"] == 1, (before, final)
    assert final["cached"] - before["cached"] >= 1, (before, final)


def dp_session(dataset_size: int, epsilon: float) -> TrainingConfig:
    """A DP session whose noise is calibrated (no noise_multiplier): one step at sample rate 4/dataset_size."""
    return TrainingConfig(model_ref="tiny", batch_size=4, optimizer=OptimizerConfig(name="sgd", learning_rate=0.1),
                          lora_config=LoRAConfig(rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]),
                          dp_config=DPConfig(enabled=True, max_grad_norm=1.0, target_epsilon=epsilon,
                                             target_delta=1e-5, dataset_size=dataset_size, max_steps=1))


def test_the_callers_deadline_crosses_the_trainer_to_accountant_hop(deadline_stack: Stack) -> None:
    with deadline_stack.client(retry_count=0) as client:
        client.create_training_client(TrainingConfig(model_ref="tiny", batch_size=4)).close()  # the model is loaded
    before = calibrations(deadline_stack)
    # Too short for the calibration (about 1.5 s on a quiet machine, longer under load): the trainer's caller
    # hears so, through the hop, before its deadline.
    with deadline_stack.client(timeout=1.2, retry_count=0) as short:
        t0 = time.monotonic()
        with pytest.raises(DeadlineTooShortError) as err:
            short.create_training_client(dp_session(4, 5.0))
        assert time.monotonic() - t0 < 1.2
        assert "noise_multiplier" in str(err.value)

    trainer_sum, trainer_n = deadline_seen(deadline_stack, "trainer", "CreateSession")
    acct_sum, acct_n = deadline_seen(deadline_stack, "accountant", "CalibrateNoise")
    # With a deadline of 120 s the session is created: the calibration started above is joined, not redone.
    with deadline_stack.client(timeout=120.0, retry_count=0) as patient:
        training = patient.create_training_client(dp_session(4, 5.0))
        training.close()
    trainer_sum2, trainer_n2 = deadline_seen(deadline_stack, "trainer", "CreateSession")
    acct_sum2, acct_n2 = deadline_seen(deadline_stack, "accountant", "CalibrateNoise")
    after = calibrations(deadline_stack)
    assert after["computed"] - before["computed"] == 1, (before, after)
    assert trainer_n2 - trainer_n == 1 and acct_n2 - acct_n == 1
    trainer_left, acct_left = trainer_sum2 - trainer_sum, acct_sum2 - acct_sum
    # The trainer saw the SDK's 120 s; the accountant saw what was left of it, less the trainer's margin:
    # derived from the caller's deadline (not a constant of the trainer's, which was 30 s).
    assert 110 < trainer_left <= 120, trainer_left
    assert trainer_left - 30 < acct_left < trainer_left, (trainer_left, acct_left)


def test_vault_transfers_get_the_callers_deadline_or_a_budget_for_their_size(deadline_stack: Stack) -> None:
    lora = LoRAConfig(rank=2, alpha=4, dropout=0.0, target_modules=["q_proj"])
    with deadline_stack.client(timeout=77.0, retry_count=0) as client:
        with client.create_training_client(TrainingConfig(model_ref="tiny", batch_size=2, lora_config=lora)) as tc:
            put_sum, put_n = deadline_seen(deadline_stack, "vault", "PutArtifact")
            saved = tc.save_state(include_optimizer=False)
            put_sum2, put_n2 = deadline_seen(deadline_stack, "vault", "PutArtifact")
        get_sum, get_n = deadline_seen(deadline_stack, "vault", "GetArtifact")
        client.create_sampling_client(saved.artifact_id)   # the inference service reads it from the vault
        get_sum2, get_n2 = deadline_seen(deadline_stack, "vault", "GetArtifact")
    assert put_n2 - put_n == 1 and get_n2 - get_n == 1
    # The trainer's worker stores the checkpoint after SaveState has answered: no caller waits on that call,
    # so the vault gets the budget for its size (30 s + size at 8 MiB/s; a small checkpoint: ~30 s).
    assert 25 < put_sum2 - put_sum <= 30 + saved.size_bytes / (8 << 20) + 0.1, put_sum2 - put_sum
    # LoadAdapter reads the adapter while its caller waits: the vault gets what is left of the caller's 77 s.
    assert 70 < get_sum2 - get_sum < 77, get_sum2 - get_sum
