"""Attested epsilon: DPConfig(sampling="server") — the trainer Poisson-samples a vault dataset itself.

The sampler in-process (its draws have the distribution of one Bernoulli(q) per row), the dataset checks, then
sessions through the SDK: no client batch accepted, q = batch / N set by the trainer, the accountant's epsilon
that of PLD at that q, and the ledger (hence the compliance report) stating the dataset digest, N, q and
"attested"."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess

import dp_accounting
import numpy as np
import pytest

from conftest import REPO, eventually, tensafe_cmd
from tensafe.runtime.errors import InvalidArgument
from tensafe.trainer.dataset import PoissonSampler, check_tokens, parse
from tg_tinker import DPConfig, LoRAConfig, NotFoundError, OptimizerConfig, TrainingConfig, ValidationError

FIELD = "config.dp_config.dataset_artifact_id"


def _jsonl(rows: list[dict]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def test_poisson_sampler_includes_each_row_with_probability_q() -> None:
    n, q, draws = 400, 0.05, 2000
    sampler = PoissonSampler(n, q)
    counts = np.zeros(n)
    sizes = []
    for _ in range(draws):
        picked = sampler.draw()
        assert picked == sorted(set(picked)) and all(0 <= i < n for i in picked)
        counts[picked] += 1
        sizes.append(len(picked))
    # Batch size ~ Binomial(n, q): mean n q = 20, variance n q (1 - q) = 19; 6-sigma bounds on the mean of 2000.
    assert abs(np.mean(sizes) - n * q) < 6 * math.sqrt(n * q * (1 - q) / draws)
    assert abs(np.var(sizes) - n * q * (1 - q)) < 0.2 * n * q * (1 - q)
    # Each row's count ~ Binomial(2000, q): no row favoured (6 sigma), first and last rows included.
    sd = math.sqrt(draws * q * (1 - q))
    assert np.abs(counts - draws * q).max() < 6 * sd and counts[0] > 0 and counts[-1] > 0
    assert PoissonSampler(5, 1.0).draw() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("data, what", [
    (b"", "holds no rows"),
    (b"not json\n", "line 1 is not JSON"),
    (_jsonl([{"input_ids": [1, 2]}, {"text": "hi"}]), "line 2"),
    (_jsonl([{"input_ids": [1, 2], "labels": [1]}]), "labels has 1 ids"),
    (_jsonl([{"input_ids": [1, True]}]), "integers only"),
    (_jsonl([{"input_ids": [1, -3]}]), "negative id"),
    (_jsonl([{"input_ids": [1, 2], "labels": [-100, -100]}]), "trains nothing"),
    (_jsonl([{"input_ids": [1, 2], "extra": 1}]), "nothing else"),
])
def test_bad_datasets_are_refused_naming_the_line(data: bytes, what: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse(data, "art_x")
    assert err.value.field == FIELD and what in err.value.message


def test_dataset_tokens_are_checked_against_the_model() -> None:
    ds = parse(_jsonl([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 500]}]), "art_x")
    assert len(ds) == 2 and ds.sha256 == hashlib.sha256(_jsonl([{"input_ids": [1, 2, 3]},
                                                                {"input_ids": [4, 500]}])).hexdigest()
    with pytest.raises(InvalidArgument, match="row 2 has a token id outside"):
        check_tokens(ds, vocab_size=384, max_length=64)
    with pytest.raises(InvalidArgument, match="row 1 has 3 tokens"):
        check_tokens(ds, vocab_size=1000, max_length=2)


# ------------------------------------------------------------------------------------------- the service
ROWS = [{"input_ids": [0, 45 + i % 50, 120, 77, 200 - i % 90, 31, 9]} for i in range(200)]
NOISE, DELTA, BATCH_SIZE = 1.0, 1e-5, 10


@pytest.fixture(scope="module")
def service(trainer_stack):
    with trainer_stack.client(retry_count=2) as client:
        yield client


@pytest.fixture(scope="module")
def dataset_id(service) -> str:
    return service.artifacts.put(_jsonl(ROWS), kind="other", name="clinic-rows.jsonl").artifact_id


def _config(dataset_id: str, **dp) -> TrainingConfig:
    settings = {"enabled": True, "noise_multiplier": NOISE, "max_grad_norm": 1.0, "target_epsilon": 20.0,
                "target_delta": DELTA, "sampling": "server", "dataset_artifact_id": dataset_id, **dp}
    return TrainingConfig(model_ref="tiny", batch_size=BATCH_SIZE, lora_config=LoRAConfig(rank=2, alpha=4.0),
                          optimizer=OptimizerConfig(name="sgd", learning_rate=0.5), seed=2,
                          dp_config=DPConfig(**settings))


def test_server_sampled_session_trains_and_accounts_at_its_own_rate(service, trainer_stack, dataset_id) -> None:
    q = BATCH_SIZE / len(ROWS)
    with service.create_training_client(_config(dataset_id)) as tc:
        results = []
        for _ in range(3):
            fb = tc.forward_backward(None).result(timeout=60)
            results.append((fb, tc.optim_step().result(timeout=60)))
        with pytest.raises(ValidationError) as err:  # a client batch: refused, nothing queued
            tc.forward_backward({"input_ids": [[1, 2, 3]]}).result(timeout=60)
        assert err.value.field == "batch"
        info = tc.get_info()
    # The trainer drew the batches: row counts vary around q N, the loss is over those rows.
    assert all(fb.num_sequences == 0 or math.isfinite(fb.loss) for fb, _ in results)
    assert sum(fb.num_sequences for fb, _ in results) > 0
    dp = results[-1][1].dp_metrics
    assert dp.sample_rate == pytest.approx(q) and dp.accounted_steps == 3
    acct = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    acct.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(NOISE)), 3)
    assert dp.total_epsilon == pytest.approx(acct.get_epsilon(DELTA), rel=1e-3)
    # The ledger says so: dataset digest, N, q, "server"; the compliance report calls it attested.
    vkey = trainer_stack.cli("ledger", "vkey").stdout.strip()
    (entry,) = eventually(lambda: [e for e in service.get_audit_logs(action="trainer.CreateSession", vkey=vkey)
                                   if e.details.get("session_id") == info.session_id], 20,
                          message="the CreateSession entry")
    assert entry.details["sampling"] == "server" and entry.details["dataset_artifact_id"] == dataset_id
    assert entry.details["dataset_sha256"] == hashlib.sha256(_jsonl(ROWS)).hexdigest()
    assert entry.details["dataset_size"] == str(len(ROWS)) and float(entry.details["sample_rate"]) == q
    out = trainer_stack.data_dir.parent / "server-sampling-report"
    subprocess.run(tensafe_cmd("compliance", "report", "--tenant", "default", "--data-dir",
                               str(trainer_stack.data_dir), "--out", str(out), "--no-pdf"), env=trainer_stack.env,
                   check=True, capture_output=True, timeout=120, cwd=REPO)
    report = json.loads((out / "report.json").read_text())
    (session,) = [s for s in report["sessions"] if s["session_id"] == info.session_id]
    assert session["sampling"] == "attested" and len(session["epsilon"]) == 3


def test_server_sampling_refuses_what_it_cannot_attest(service, trainer_stack, dataset_id) -> None:
    cases = [
        (dict(sample_rate=0.1), "config.dp_config.sample_rate"),
        (dict(dataset_size=999), "config.dp_config.dataset_size"),
        (dict(dataset_artifact_id="art_" + "0" * 24), None),  # not in this tenant's vault: NOT_FOUND
    ]
    for dp, field in cases:
        with pytest.raises(ValidationError if field else NotFoundError) as err:
            service.create_training_client(_config(dataset_id, **dp))
        if field:
            assert err.value.field == field, err.value
    with pytest.raises(ValidationError) as err:
        service.create_training_client(TrainingConfig(
            model_ref="tiny", batch_size=2, gradient_accumulation_steps=2,
            dp_config=DPConfig(enabled=True, noise_multiplier=1.0, sampling="server", dataset_artifact_id=dataset_id)))
    assert err.value.field == "config.gradient_accumulation_steps"
    bad = service.artifacts.put(_jsonl(ROWS[:20] + [{"input_ids": [0, 1, 99999]}]), kind="other").artifact_id
    with pytest.raises(ValidationError) as err:
        service.create_training_client(_config(bad))
    assert err.value.field == FIELD and "row 21 has a token id outside the vocabulary" in str(err.value)
    with pytest.raises(ValidationError) as err:  # the SDK checks what it can before sending
        DPConfig(enabled=True, sampling="server")
    assert err.value.field == "dp_config.dataset_artifact_id"
