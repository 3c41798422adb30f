"""Through a real ``tensafe up`` with small quotas (issue 13, items 8 and 12): ``model_ref`` names models,
never paths, and every name that is not a model answers the same NOT_FOUND; per-tenant quotas name the
quota and free on close; per-call work caps and an int64-overflowing shape are refused at submission;
a running Sample is cancellable through the SDK."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from conftest import Stack, start_stack
from tensafe.api.common.v1 import common_pb2
from tensafe.api.trainer.v1 import trainer_pb2
from tg_tinker import LoRAConfig, NotFoundError, QuotaExceededError, TrainingConfig, ValidationError
from tg_tinker.errors import FutureCancelledError

RUNNING = trainer_pb2.FUTURE_STATE_RUNNING
IDS = [5, 6, 7, 8]


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
