"""One tenant against the others on shared trainer/inference resources (issue 13, items 7 and 8).

* Fair scheduling on a shared base: another tenant's small op is not stuck behind a long Sample or a
  long queue of ops; each session's own ops still run in submission order; a seeded Sample gives the
  same output however it was interleaved.
* A running Sample is cancellable between tokens (CancelFuture, and closing the session).
* Per-call work caps (prompts x samples x max_tokens, rows x length) and per-tenant quotas (open
  sessions, private base copies, loaded adapters): refused at submission, naming the field or quota.

The tests run the trainer in process (exact states, no timing but loose bounds). The same quotas and
caps through a real ``tensafe up``: test_service_limits.py; the tensor decoder: test_tensor_decoder.py.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tensafe.api.common.v1 import common_pb2
from tensafe.api.trainer.v1 import trainer_pb2
from tensafe.runtime.errors import InvalidArgument, QuotaExceeded
from tensafe.trainer.service import Trainer, TrainerLimits
from tensafe.trainer.servicer import batch_value, config_value
from tensafe.trainer.values import BatchInput, SamplingSpec, SessionConfig, TensorData
from tg_tinker import LoRAConfig, TrainingConfig

PENDING, RUNNING = trainer_pb2.FUTURE_STATE_PENDING, trainer_pb2.FUTURE_STATE_RUNNING
SUCCEEDED, CANCELLED = trainer_pb2.FUTURE_STATE_SUCCEEDED, trainer_pb2.FUTURE_STATE_CANCELLED
TERMINAL = {SUCCEEDED, trainer_pb2.FUTURE_STATE_FAILED, CANCELLED}
FUZZ = settings(max_examples=int(os.environ.get("TENSAFE_FUZZ_EXAMPLES", "150")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
IDS = [5, 6, 7, 8]
BATCH = {"input_ids": [[1, 20, 30, 40, 50, 60, 70, 80]] * 4}


def cfg(**kw) -> SessionConfig:
    kw.setdefault("lora_config", LoRAConfig(rank=4, alpha=8, dropout=0.0))
    return config_value(TrainingConfig(model_ref="tiny", seed=1, **kw).to_proto())


def wait(op, states=frozenset(TERMINAL), timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while op.state not in states:
        assert time.monotonic() < deadline, f"op {op.future_id} still in state {op.state}"
        time.sleep(0.002)
    return op


def sample_req(session_id: str, prompts: int, max_tokens: int, seed: int | None = None,
               temperature: float = 1.0, num_samples: int = 0) -> tuple:
    """Trainer.sample's arguments after the tenant."""
    sp = SamplingSpec(max_tokens=max_tokens, temperature=temperature, seed=seed, num_samples=num_samples)
    return session_id, sp, (), [IDS] * prompts


def forward_req(session_id: str) -> tuple[str, BatchInput]:
    """Trainer.forward's arguments after the tenant."""
    from tg_tinker.training import batch_to_proto

    return session_id, batch_value(batch_to_proto(BATCH))


@pytest.fixture(scope="module")
def trainer(tiny_model: Path) -> Iterator[Trainer]:
    t = Trainer(tiny_model.parent)
    yield t
    t.shutdown()


@pytest.fixture
def two_tenants(trainer: Trainer) -> Iterator[tuple]:
    a = trainer.create_session("tenant-a", cfg())
    b = trainer.create_session("tenant-b", cfg())
    assert a.base is b.base  # one shared base, one worker
    yield a, b
    for s in (a, b):
        trainer.close(s.tenant_id, s.session_id)


# -- fair scheduling ---------------------------------------------------------------------------------
def test_a_small_op_is_not_stuck_behind_another_tenants_long_sample(trainer: Trainer, two_tenants) -> None:
    """Attack: a Sample with many prompts held the shared worker for its whole length (FIFO)."""
    a, b = two_tenants
    with a.base.lock:  # hold the worker: B's op is queued while A's sample has its first slice
        big = trainer.sample("tenant-a", *sample_req(a.session_id, prompts=12, max_tokens=8, seed=3))
        wait(big, {RUNNING})
        small = trainer.get_info("tenant-b", b.session_id)
    assert wait(small).state == SUCCEEDED
    assert wait(big).state == SUCCEEDED and len(big.result.samples) == 12
    assert small.end_time < big.end_time  # B was served between two of A's sequences, not after all 12


def test_a_small_op_is_not_stuck_behind_another_tenants_queue(trainer: Trainer, two_tenants) -> None:
    a, b = two_tenants
    with a.base.lock:  # hold the worker: B's op is queued while A's first is taken, however slow this thread
        queued = [trainer.forward("tenant-a", *forward_req(a.session_id)) for _ in range(12)]
        wait(queued[0], {RUNNING})
        small = trainer.get_info("tenant-b", b.session_id)  # not a forward: it cannot ride along in A's pass
    assert wait(small).state == SUCCEEDED
    before = sum(1 for op in queued if op.end_time is not None and op.end_time <= small.end_time)
    assert before <= 3, f"{before} of tenant A's 12 ops ran before tenant B's one"  # FIFO: all 12
    for op in queued:
        wait(op)
    # Each session's own ops still ran in submission order.
    assert all(op.state == SUCCEEDED for op in queued)
    starts = [op.start_time for op in queued]
    assert starts == sorted(starts)
    assert [op.end_time for op in queued] == sorted(op.end_time for op in queued)


def test_a_tenants_sessions_are_served_by_tenant_first(trainer: Trainer) -> None:
    """Opening more sessions does not buy a tenant more of the worker: B's op waits for one of A's, not three."""
    many = [trainer.create_session("tenant-a", cfg()) for _ in range(3)]
    b = trainer.create_session("tenant-b", cfg())
    try:
        with b.base.lock:  # hold the worker: it takes A's first op alone, the rest and B's op queue meanwhile
            order = [s.session_id for s in many for _ in range(4)]
            queued = [trainer.forward("tenant-a", *forward_req(order[0]))]
            wait(queued[0], {RUNNING})
            queued += [trainer.forward("tenant-a", *forward_req(sid)) for sid in order[1:]]
            small = trainer.get_info("tenant-b", b.session_id)  # not a forward: it cannot ride along in A's pass
        assert wait(small).state == SUCCEEDED
        # Fair by session alone, A's two other sessions (batched with A's next op) would go first too: 4.
        before = sum(1 for op in queued if op.end_time is not None and op.end_time <= small.start_time)
        assert before <= 3, f"{before} of tenant A's 12 ops ran before tenant B's one"
        for op in queued:
            wait(op)
    finally:
        for s in [*many, b]:
            trainer.close(s.tenant_id, s.session_id)


def test_a_seeded_sample_is_the_same_however_it_is_interleaved(trainer: Trainer, two_tenants) -> None:
    a, b = two_tenants
    alone = wait(trainer.sample("tenant-a", *sample_req(a.session_id, prompts=4, max_tokens=8, seed=11)))
    mixed = trainer.sample("tenant-a", *sample_req(a.session_id, prompts=4, max_tokens=8, seed=11))
    wait(mixed, {RUNNING})
    # B's ops (sampling with its own RNG, unseeded) run between A's sequences.
    others = [trainer.sample("tenant-b", *sample_req(b.session_id, prompts=1, max_tokens=4)) for _ in range(3)]
    wait(mixed)
    assert any(op.end_time < mixed.end_time for op in map(wait, others))  # really interleaved
    assert [s.token_ids for s in mixed.result.samples] == [s.token_ids for s in alone.result.samples]


# -- cancelling a running sample -----------------------------------------------------------------------
@pytest.fixture
def token_counter(trainer: Trainer, two_tenants) -> Iterator[list[int]]:
    """Counts decoding steps on the shared base (a forward hook on its output layer)."""
    count = [0]
    head = two_tenants[0].base.model.get_output_embeddings()
    hook = head.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    yield count
    hook.remove()


def test_cancelling_a_running_sample_stops_it_between_tokens(trainer: Trainer, two_tenants, token_counter) -> None:
    a, b = two_tenants
    op = trainer.sample("tenant-a", *sample_req(a.session_id, prompts=1, max_tokens=240, seed=4))
    while token_counter[0] < 3:
        assert op.state in (PENDING, RUNNING)
        time.sleep(0.001)
    cancelled, event = trainer.cancel("tenant-a", a.session_id, op.future_id)
    assert cancelled is True
    assert event.state == CANCELLED and event.error.reason == "FUTURE_CANCELLED"
    assert event.result is None and not event.event().HasField("sample")
    stopped_at = token_counter[0]
    assert stopped_at < 120, stopped_at  # stopped within a token or two, not after its 240
    # The worker moved on: the next ops, the same session's and another tenant's, run; the sample decoded
    # nothing more after it was cancelled (GetInfo runs no model).
    assert wait(trainer.get_info("tenant-a", a.session_id)).state == SUCCEEDED
    assert token_counter[0] == stopped_at
    assert wait(trainer.forward("tenant-b", *forward_req(b.session_id))).state == SUCCEEDED


def test_cancelling_a_sample_waiting_between_sequences(trainer: Trainer, two_tenants) -> None:
    a, b = two_tenants
    op = trainer.sample("tenant-a", *sample_req(a.session_id, prompts=30, max_tokens=16))
    wait(op, {RUNNING})
    cancelled, event = trainer.cancel("tenant-a", a.session_id, op.future_id)
    assert cancelled and event.state == CANCELLED
    assert wait(trainer.forward("tenant-b", *forward_req(b.session_id))).state == SUCCEEDED


def test_cancel_of_an_op_that_cannot_stop_while_running_is_refused(trainer: Trainer, two_tenants) -> None:
    a, _ = two_tenants
    with a.base.lock:  # hold the worker: the first op is taken (RUNNING), the second stays queued
        first = trainer.forward("tenant-a", *forward_req(a.session_id))
        wait(first, {RUNNING})
        assert trainer.cancel("tenant-a", a.session_id, first.future_id)[0] is False  # a forward runs to the end
    assert wait(first).state == SUCCEEDED


def test_closing_a_session_stops_its_running_sample(trainer: Trainer) -> None:
    s = trainer.create_session("tenant-c", cfg())
    op = trainer.sample("tenant-c", *sample_req(s.session_id, prompts=30, max_tokens=200))
    wait(op, {RUNNING})
    trainer.close("tenant-c", s.session_id)
    assert wait(op, timeout=10).state == CANCELLED


# -- inference: jobs on one base take turns by sequence -----------------------------------------------
@pytest.fixture(scope="module")
def hf_base(tiny_model: Path):
    from tensafe.common.models import resolve_model_ref
    from tensafe.inference.hf_backend import HFBackend

    base = HFBackend().open(resolve_model_ref("tiny", tiny_model.parent))
    yield base
    base.close()


def _generate(base, prompts: int, max_tokens: int, seed: int | None = None):
    """Start a job; returns (thread collecting its chunks, list of (monotonic time, chunk))."""
    from tensafe.inference.backend import ChunkQueue
    from tensafe.inference.generation import validate

    sp = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=1.0)
    if seed is not None:
        sp.seed = seed
    job = validate(base.tokenizer, [], [IDS] * prompts, sp, base.vocab_size, base.max_length)
    out = ChunkQueue(threading.Event())
    got: list[tuple[float, object]] = []
    reader = threading.Thread(target=lambda: got.extend((time.monotonic(), c) for c in out), daemon=True)
    base.start(None, job, out)
    reader.start()
    return reader, got


def _tokens(got) -> dict:
    seqs: dict = {}
    for _, c in got:
        seqs.setdefault((c.prompt_index, c.sample_index), []).extend(c.token_ids)
    return seqs


def test_an_inference_job_does_not_hold_the_base_for_its_whole_length(hf_base) -> None:
    """Attack: one Generate with many sequences held the base's lock until its last one."""
    big, big_got = _generate(hf_base, prompts=12, max_tokens=8, seed=5)
    deadline = time.monotonic() + 60
    while not big_got:
        assert time.monotonic() < deadline
        time.sleep(0.002)
    with hf_base.lock:  # between two steps: the small job is waiting before the next, however slow this thread
        small, small_got = _generate(hf_base, prompts=1, max_tokens=4)
    small.join(60)
    assert small_got and small_got[-1][1].finish_reason
    done_before = sum(1 for t, c in list(big_got) if c.finish_reason and t <= small_got[-1][0])
    assert done_before <= 3, f"{done_before} of the big job's 12 sequences finished before the small job"
    big.join(120)
    assert sum(1 for _, c in big_got if c.finish_reason) == 12
    # Seeded: the same tokens as the same job run alone, however it was interleaved.
    alone, alone_got = _generate(hf_base, prompts=12, max_tokens=8, seed=5)
    alone.join(120)
    assert _tokens(alone_got) == _tokens(big_got)


# -- caps and quotas, in process ------------------------------------------------------------------------
def test_work_caps_are_refused_at_submission_naming_the_field(tiny_model: Path) -> None:
    t = Trainer(tiny_model.parent, limits=TrainerLimits(sample_tokens=100, batch_tokens=64))
    try:
        s = t.create_session("t", cfg())
        with pytest.raises(InvalidArgument) as err:
            t.sample("t", *sample_req(s.session_id, prompts=7, max_tokens=15))  # 105 > 100
        assert err.value.field == "sampling.max_tokens"
        assert err.value.metadata["quota"] == "TENSAFE_MAX_SAMPLE_TOKENS" and err.value.metadata["limit"] == "100"
        with pytest.raises(InvalidArgument) as err:
            t.sample("t", *sample_req(s.session_id, prompts=2, max_tokens=10, num_samples=6))  # 2 x 6 x 10 = 120
        assert err.value.field == "sampling.max_tokens"
        assert wait(t.sample("t", *sample_req(s.session_id, prompts=10, max_tokens=10))).state == SUCCEEDED
        big = BatchInput(input_ids=TensorData(dtype=common_pb2.DTYPE_INT64, shape=(9, 8), data=b"\0" * 576))
        with pytest.raises(InvalidArgument) as err:
            t.forward("t", s.session_id, big)
        assert err.value.field == "batch.input_ids" and err.value.metadata["quota"] == "TENSAFE_MAX_BATCH_TOKENS"
        assert s.book.last_sequence == 1  # nothing refused was queued
    finally:
        t.shutdown()


def test_session_and_private_copy_quotas_per_tenant(tiny_model: Path) -> None:
    t = Trainer(tiny_model.parent, limits=TrainerLimits(sessions=3, private_copies=1))
    try:
        first = t.create_session("a", cfg(lora_config=LoRAConfig(rank=4, bias="all")))
        with pytest.raises(QuotaExceeded) as err:
            t.create_session("a", cfg(lora_config=LoRAConfig(rank=4, bias="all")))
        assert err.value.quota == "TENSAFE_QUOTA_PRIVATE_COPIES" and err.value.metadata["limit"] == "1"
        assert len(t._bases) == 1  # the refused session loaded no copy
        shared = [t.create_session("a", cfg()) for _ in range(2)]
        with pytest.raises(QuotaExceeded) as err:
            t.create_session("a", cfg())
        assert err.value.quota == "TENSAFE_QUOTA_SESSIONS" and err.value.code.name == "RESOURCE_EXHAUSTED"
        other = t.create_session("b", cfg(lora_config=LoRAConfig(rank=4, bias="all")))  # another tenant's own quota
        t.close("a", first.session_id)  # frees a session place and the private copy
        again = t.create_session("a", cfg(lora_config=LoRAConfig(rank=4, bias="all")))
        assert again.base is not shared[0].base
        with pytest.raises(QuotaExceeded):
            t.create_session("a", cfg())
        for s in [*shared, again, other]:
            t.close(s.tenant_id, s.session_id)
        assert t._bases == {}
    finally:
        t.shutdown()


def test_queued_ops_per_session_are_bounded(tiny_model: Path) -> None:
    """Attack: queueing ops without end (each holds its batch in memory) on a busy base."""
    t = Trainer(tiny_model.parent, limits=TrainerLimits(pending_ops=3))
    try:
        s = t.create_session("t", cfg())
        info = s.session_id
        with s.base.lock:  # the worker is busy: ops stay queued
            ops = [t.get_info("t", info) for _ in range(3)]
            with pytest.raises(QuotaExceeded) as err:
                t.get_info("t", info)
            assert err.value.quota == "TENSAFE_QUOTA_PENDING_OPS" and err.value.metadata["current"] == "3"
            t.cancel("t", s.session_id, ops[-1].future_id)  # a cancelled op frees its place
            ops.append(t.get_info("t", info))
        assert [wait(op).state for op in ops] == [SUCCEEDED, SUCCEEDED, CANCELLED, SUCCEEDED]
        assert wait(t.get_info("t", info)).state == SUCCEEDED  # finished ops free theirs
    finally:
        t.shutdown()


def test_closed_sessions_are_not_kept_without_end(tiny_model: Path) -> None:
    from tensafe.trainer.service import KEEP_CLOSED

    t = Trainer(tiny_model.parent)
    try:
        for _ in range(KEEP_CLOSED + 5):
            s = t.create_session("t", cfg())
            t.close("t", s.session_id)
        assert len(t.list("t", include_closed=True)) == KEEP_CLOSED
        assert len(t._sessions) == KEEP_CLOSED
    finally:
        t.shutdown()


def test_concurrent_creates_cannot_overshoot_the_session_quota(tiny_model: Path) -> None:
    t = Trainer(tiny_model.parent, limits=TrainerLimits(sessions=2))
    results: list[object] = []

    def create() -> None:
        try:
            results.append(t.create_session("a", cfg()))
        except QuotaExceeded as exc:
            results.append(exc)

    try:
        threads = [threading.Thread(target=create) for _ in range(6)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        assert sum(1 for r in results if isinstance(r, QuotaExceeded)) == 4
        assert len(t.list("a", include_closed=False)) == 2
    finally:
        t.shutdown()
