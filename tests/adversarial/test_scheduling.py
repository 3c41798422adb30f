"""One tenant against the others on shared trainer/inference resources (issue 13, items 7, 8, 12, 13).

* Fair scheduling on a shared base: another tenant's small op is not stuck behind a long Sample or a
  long queue of ops; each session's own ops still run in submission order; a seeded Sample gives the
  same output however it was interleaved.
* A running Sample is cancellable between tokens (CancelFuture, and closing the session).
* Per-call work caps (prompts x samples x max_tokens, rows x length) and per-tenant quotas (open
  sessions, private base copies, loaded adapters): refused at submission, naming the field or quota.
* ``model_ref`` names models, never paths; every name that is not a model answers the same NOT_FOUND.
* The tensor decoder only ever raises InvalidArgument (int64 overflow of the element count included).

The scheduling tests run the trainer in process (exact states, no timing but loose bounds); the rest
run through a real ``tensafe up`` with small quotas.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import Stack, start_stack
from tensafe.api.common.v1 import common_pb2
from tensafe.api.trainer.v1 import trainer_pb2
from tensafe.runtime.errors import InvalidArgument, QuotaExceeded
from tensafe.trainer.batches import prepare_batch
from tensafe.trainer.service import Trainer, TrainerLimits
from tensafe.trainer.servicer import batch_value, config_value
from tensafe.trainer.values import BatchInput, SamplingSpec, SessionConfig, TensorData
from tg_tinker import LoRAConfig, NotFoundError, QuotaExceededError, TrainingConfig, ValidationError
from tg_tinker.errors import FutureCancelledError
from tg_tinker.errors import ValidationError as SDKValidationError
from tg_tinker.tensors import from_proto

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
    big = trainer.sample("tenant-a", *sample_req(a.session_id, prompts=12, max_tokens=8, seed=3))
    wait(big, {RUNNING})
    small = trainer.get_info("tenant-b", b.session_id)
    wait(small)
    assert small.state == SUCCEEDED
    assert big.state == RUNNING  # B was served between two of A's sequences, not after all 12
    wait(big)
    assert big.state == SUCCEEDED and len(big.result.samples) == 12


def test_a_small_op_is_not_stuck_behind_another_tenants_queue(trainer: Trainer, two_tenants) -> None:
    a, b = two_tenants
    queued = [trainer.forward("tenant-a", *forward_req(a.session_id)) for _ in range(12)]
    wait(queued[0], {RUNNING, *TERMINAL})
    small = wait(trainer.forward("tenant-b", *forward_req(b.session_id)))
    assert small.state == SUCCEEDED
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
        queued = [trainer.forward("tenant-a", *forward_req(s.session_id)) for s in many for _ in range(4)]
        wait(queued[0], {RUNNING, *TERMINAL})
        small = wait(trainer.forward("tenant-b", *forward_req(b.session_id)))
        before = sum(1 for op in queued if op.end_time is not None and op.end_time <= small.end_time)
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


# -- the tensor decoder ------------------------------------------------------------------------------------
DTYPES = list(common_pb2.Dtype.values()) + [99]


@st.composite
def tensors(draw: st.DrawFn) -> common_pb2.Tensor:
    dims = st.one_of(st.integers(-3, 6), st.integers(-2**63, 2**63 - 1),
                     st.sampled_from([0, 2**30, 2**31 - 1, 2**31, 2**32, 2**33, 2**62, 2**63 - 1, -2**63]))
    shape = draw(st.lists(dims, max_size=20))
    dtype = draw(st.sampled_from(DTYPES))
    if draw(st.booleans()):  # bytes that fit a small shape exactly (or an overflowing product's wrap)
        data = draw(st.binary(max_size=64))
    else:
        n = draw(st.integers(0, 48))
        data = bytes(n)
    return common_pb2.Tensor(dtype=dtype, shape=shape, data=data)


WRAPS = common_pb2.Tensor(dtype=common_pb2.DTYPE_INT64, shape=[2**32, 2**32])  # 2**64 elements: 0 in int64
EMPTY_BUT_HUGE = common_pb2.Tensor(dtype=common_pb2.DTYPE_FLOAT32, shape=[0, 2**30, 2**30])


@FUZZ
@given(tensors())
@example(WRAPS)
@example(EMPTY_BUT_HUGE)
def test_the_tensor_decoder_only_raises_validation_errors(tensor: common_pb2.Tensor) -> None:
    try:
        arr = from_proto(tensor, "t")
    except SDKValidationError as exc:
        assert exc.code == "INVALID_ARGUMENT" and exc.field.startswith("t.")
        return
    assert arr.shape == tuple(tensor.shape) and arr.nbytes == len(tensor.data)


@FUZZ
@given(tensors(), st.sampled_from(["input_ids", "attention_mask", "labels", "advantages", "extra"]))
@example(WRAPS, "attention_mask")
@example(WRAPS, "extra")
@example(EMPTY_BUT_HUGE, "labels")
def test_prepare_batch_only_raises_invalid_argument(tensor: common_pb2.Tensor, where: str) -> None:
    batch = trainer_pb2.Batch()
    batch.input_ids.CopyFrom(common_pb2.Tensor(dtype=common_pb2.DTYPE_INT64, shape=[1, 4],
                                               data=np.array([[1, 2, 3, 4]], "<i8").tobytes()))
    if where == "extra":
        batch.extra["x"].CopyFrom(tensor)
    else:
        getattr(batch, where).CopyFrom(tensor)
    try:
        prepare_batch(batch_value(batch), vocab_size=384, max_length=256)
    except InvalidArgument as exc:
        assert exc.field.startswith("batch.")


@pytest.mark.parametrize("shape", [[2**32, 2**32], [2**31, 2**31, 4], [2**62, 4], [-1, 4], [1] * 17, [3, -2**63]])
def test_overflowing_or_negative_shapes_are_invalid_argument(shape: list[int]) -> None:
    """Attack: [2**32, 2**32] has 2**64 elements, 0 in int64: the byte check passed and reshape failed (INTERNAL)."""
    with pytest.raises(SDKValidationError) as err:
        from_proto(common_pb2.Tensor(dtype=common_pb2.DTYPE_INT64, shape=shape, data=b""), "batch.input_ids")
    assert err.value.field in ("batch.input_ids.shape", "batch.input_ids.data")


# -- through the service: names not paths, quotas, caps ---------------------------------------------------
@pytest.fixture(scope="module")
def quota_stack(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Stack]:
    """A `tensafe up` whose model dir holds things that are not models; `tiny` is registered by the operator."""
    tmp = tmp_path_factory.mktemp("scheduling")
    models = tmp / "models"
    (models / "empty").mkdir(parents=True)
    (models / "notes.txt").write_text("not a model")
    (models / "noweights").mkdir()
    (models / "noweights" / "config.json").write_text("{}")
    shutil.copy(tiny_model / "config.json", models / "config-only.json")
    s = start_stack(tmp, {"TENSAFE_MODEL_DIR": str(models), "TENSAFE_MODELS": f"tiny={tiny_model}",
                          "TENSAFE_QUOTA_SESSIONS": "3", "TENSAFE_QUOTA_PRIVATE_COPIES": "1",
                          "TENSAFE_QUOTA_ADAPTERS": "1", "TENSAFE_MAX_SAMPLE_TOKENS": "256",
                          "TENSAFE_MAX_BATCH_TOKENS": "128"})
    yield s
    assert s.process.stop() == 0, s.process.output()


@pytest.fixture(scope="module")
def client(quota_stack: Stack):
    with quota_stack.client(retry_count=2) as c:
        yield c


def test_model_ref_paths_are_invalid_and_unknown_names_all_look_the_same(client, quota_stack: Stack,
                                                                         tiny_model: Path) -> None:
    """Attack: model_ref=/path loaded any directory and told files from missing paths (the master key's)."""
    for path in (str(quota_stack.data_dir / "master.key"), str(quota_stack.data_dir / "no-such-file"),
                 str(tiny_model), "../data/master.key", "~/x"):
        with pytest.raises(ValidationError) as err:
            client._call("trainer", "CreateSession", trainer_pb2.CreateSessionRequest(
                config=TrainingConfig(model_ref=path).to_proto()))
        assert err.value.field == "config.model_ref", path
        with pytest.raises(ValidationError) as err:
            client.create_sampling_client(model_ref=path).sample(["hi"], max_tokens=2)
        assert err.value.field == "model_ref", path
    answers = set()
    for name in ("empty", "notes.txt", "noweights", "config-only.json", "absent", "tiny/config.json"):
        with pytest.raises(NotFoundError) as err:
            client.create_training_client(TrainingConfig(model_ref=name))
        answers.add((err.value.grpc_code, err.value.code, err.value.message.replace(repr(name), "<name>")))
        with pytest.raises(NotFoundError):
            client.create_sampling_client(model_ref=name).sample(["hi"], max_tokens=2)
    assert answers == {("NOT_FOUND", "RESOURCE_NOT_FOUND", "model <name> not found")}
    with client.create_training_client(TrainingConfig(model_ref="tiny")) as tc:  # the operator's registered name
        assert tc.get_info().vocab_size > 0


def test_quotas_through_the_service_name_the_quota_and_free_on_close(client, quota_stack: Stack) -> None:
    private = client.create_training_client(TrainingConfig(model_ref="tiny", lora_config=LoRAConfig(bias="all")))
    with pytest.raises(QuotaExceededError) as err:
        client.create_training_client(TrainingConfig(model_ref="tiny", lora_config=LoRAConfig(bias="all")))
    assert err.value.quota == "TENSAFE_QUOTA_PRIVATE_COPIES" and err.value.grpc_code == "RESOURCE_EXHAUSTED"
    shared = [client.create_training_client(TrainingConfig(model_ref="tiny")) for _ in range(2)]
    with pytest.raises(QuotaExceededError) as err:
        client.create_training_client(TrainingConfig(model_ref="tiny"))
    assert err.value.quota == "TENSAFE_QUOTA_SESSIONS" and err.value.limit == "3"
    # Adapters: one loaded per tenant here; unloading frees the place.
    artifacts = [shared[0].save_state(name=f"a{i}").artifact_id for i in range(2)]
    first = client.create_sampling_client(artifact_id=artifacts[0])
    assert client.create_sampling_client(artifact_id=artifacts[0]).adapter_id == first.adapter_id  # same one again
    with pytest.raises(QuotaExceededError) as err:
        client.create_sampling_client(artifact_id=artifacts[1])
    assert err.value.quota == "TENSAFE_QUOTA_ADAPTERS"
    first.unload()
    second = client.create_sampling_client(artifact_id=artifacts[1])
    assert second.sample(["Once upon"], max_tokens=2, temperature=0).samples
    second.unload()
    # Another tenant has its own quota.
    key = quota_stack.cli("keys", "create", "--tenant", "other-tenant").stdout.split()[-1]
    with quota_stack.client(api_key=key) as other:
        with other.create_training_client(TrainingConfig(model_ref="tiny")) as tc:
            assert tc.step == 0
    private.close()
    with client.create_training_client(TrainingConfig(model_ref="tiny", lora_config=LoRAConfig(bias="all"))):
        pass
    for tc in shared:
        tc.close()


def test_caps_and_the_int64_shape_through_the_service(client) -> None:
    with client.create_training_client(TrainingConfig(model_ref="tiny")) as tc:
        with pytest.raises(ValidationError) as err:
            tc.sample([IDS] * 9, max_tokens=30)  # 270 > 256
        assert err.value.field == "sampling.max_tokens"
        assert err.value.details["quota"] == "TENSAFE_MAX_SAMPLE_TOKENS"
        with pytest.raises(ValidationError) as err:
            tc.forward_backward({"input_ids": [[1] * 40] * 4}).result(timeout=60)  # 160 > 128
        assert err.value.field == "batch.input_ids"
        for field, shape in (("input_ids", [2**32, 2**32]), ("advantages", [2**32, 2**32]),
                             ("extra.x", [2**31, 2**31, 4])):
            req = trainer_pb2.ForwardBackwardRequest(session_id=tc.session_id)
            req.batch.input_ids.CopyFrom(common_pb2.Tensor(dtype=common_pb2.DTYPE_INT64, shape=[1, 4],
                                                           data=np.array([[1, 2, 3, 4]], "<i8").tobytes()))
            bad = common_pb2.Tensor(dtype=common_pb2.DTYPE_INT64 if field == "input_ids" else common_pb2.DTYPE_FLOAT32,
                                    shape=shape, data=b"")
            if field == "extra.x":
                req.batch.extra["x"].CopyFrom(bad)
            else:
                getattr(req.batch, field).CopyFrom(bad)
            with pytest.raises(ValidationError) as err:  # was INTERNAL
                client._call("trainer", "ForwardBackward", req)
            assert err.value.field.startswith(f"batch.{field}"), err.value.field
        grad = trainer_pb2.BackwardCustomRequest(session_id=tc.session_id, forward_future_id="fut_x")
        grad.grad_logprobs.CopyFrom(common_pb2.Tensor(dtype=common_pb2.DTYPE_FLOAT32, shape=[2**32, 2**32]))
        with pytest.raises(ValidationError) as err:
            client._call("trainer", "BackwardCustom", grad)
        assert err.value.field.startswith("grad_logprobs")
    with pytest.raises(ValidationError) as err:  # inference Generate: the same cap
        client.create_sampling_client(model_ref="tiny").sample([IDS] * 2, max_tokens=200)
    assert err.value.field == "sampling.max_tokens"


def test_cancel_of_a_running_sample_through_the_sdk(client) -> None:
    with client.create_training_client(TrainingConfig(model_ref="tiny", seed=2)) as tc:
        running = tc.sample_async([IDS] * 8, max_tokens=30)  # 240 tokens: within the cap
        deadline = time.monotonic() + 60
        while tc._transport.unary("trainer", "GetFuture", trainer_pb2.GetFutureRequest(
                session_id=tc.session_id, future_id=running.future_id)).event.state != RUNNING:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        assert running.cancel() is True
        with pytest.raises(FutureCancelledError):
            running.result(timeout=30)
        assert tc.get_info().step == 0  # the session goes on
