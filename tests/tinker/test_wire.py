"""The gateway's wire conversions against the ``tinker`` client's own encoders and decoders (no server)."""

from __future__ import annotations

import numpy as np
import pytest

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402
from tinker.proto import request_conv, response_conv, tinker_public_pb2  # noqa: E402

from tensafe.runtime.errors import InvalidArgument  # noqa: E402
from tensafe.tinker import wire, wire_schema  # noqa: E402


def test_vendored_schema_is_the_clients() -> None:
    assert wire_schema.SERIALIZED == tinker_public_pb2.DESCRIPTOR.serialized_pb
    assert tinker.__version__ == wire_schema.TINKER_VERSION


def encode(data: list[types.Datum], loss_fn: str = "cross_entropy", config: dict | None = None) -> bytes:
    req = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn=loss_fn, loss_fn_config=config),
        model_id="s:train:0", seq_id=3)
    return request_conv.forward_backward_request_to_proto(req).SerializeToString()


def test_datums_become_hf_aligned_rows() -> None:
    import torch

    weights = torch.tensor([[0.0, 0.0, 1.0, 1.0]])  # 2-D: the client may send it sparse (CSR)
    data = [types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3, 4]),
                        loss_fn_inputs={"target_tokens": [2, 3, 4, 5], "weights": weights.reshape(-1)}),
            types.Datum(model_input=types.ModelInput.from_ints([7, 8]),
                        loss_fn_inputs={"target_tokens": [8, 9], "weights": [0.5, -1.0]})]
    call = wire.decode_forward_backward(encode(data))
    assert (call.model_id, call.seq_id, call.loss_fn, call.forward_only) == ("s:train:0", 3, "cross_entropy", False)
    batch = wire.to_batch(call.data)
    np.testing.assert_array_equal(batch["input_ids"], [[1, 2, 3, 4, 0], [7, 8, 0, 0, 0]])
    np.testing.assert_array_equal(batch["attention_mask"], [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(batch["labels"], [[-100, 2, 3, 4, 5], [-100, 8, 9, -100, -100]])
    np.testing.assert_allclose(batch["weights"], [[0, 0, 0, 1, 1], [0, 0.5, -1, 0, 0]])


def test_sparse_csr_inputs_decode() -> None:
    import torch

    td = types.TensorData.from_torch_sparse(torch.tensor([[0.0, 0.0, 0.0, 2.0, 0.0, 0.0]]))
    assert td.sparse_crow_indices is not None
    msg = tinker_public_pb2.ForwardBackwardRequest.FromString(encode([types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 3, 4, 5, 6]),
        loss_fn_inputs={"target_tokens": [2, 3, 4, 5, 6, 7], "weights": td})]))
    call = wire.decode_forward_backward(msg.SerializeToString())
    np.testing.assert_allclose(call.data[0].inputs["weights"], [0, 0, 0, 2, 0, 0])


def test_results_decode_in_the_client() -> None:
    lps = [np.array([-1.0, -2.0, -3.0], np.float32), np.array([-0.5], np.float32)]
    body = wire.forward_backward_output({"logprobs": lps}, {"loss:sum": 6.5}, 2)
    out = response_conv.deserialize_forward_backward_output(body)
    assert out.metrics == {"loss:sum": 6.5}
    assert [list(o["logprobs"].data) for o in out.loss_fn_outputs] == [[-1.0, -2.0, -3.0], [-0.5]]
    sample = response_conv.deserialize_sample_response(wire.sample_response(
        [wire.SampledSeq([5, 6], [-0.1, -0.2], "length"), wire.SampledSeq([7], None, "stop")],
        [float("nan"), -1.5, -2.5]))
    assert [s.tokens for s in sample.sequences] == [[5, 6], [7]]
    assert [s.stop_reason for s in sample.sequences] == ["length", "stop"]
    assert sample.prompt_logprobs == [None, -1.5, -2.5]


@pytest.mark.parametrize(("loss_fn", "config", "inputs", "field"), [
    ("gspo", None, {}, "loss_fn"),
    ("cross_entropy", None, {"advantages": [1.0, 1.0]}, "data[0].loss_fn_inputs.advantages"),
    ("ppo", None, {"logprobs": [0.0, 0.0]}, "data[0].loss_fn_inputs.advantages"),
    ("cross_entropy", None, {"weights": [1.0]}, "data[0].loss_fn_inputs.weights"),
])
def test_bad_bodies_name_the_field(loss_fn: str, config: dict | None, inputs: dict, field: str) -> None:
    datum = types.Datum(model_input=types.ModelInput.from_ints([1, 2]),
                        loss_fn_inputs={"target_tokens": [2, 3], **inputs})
    with pytest.raises(InvalidArgument) as err:
        wire.decode_forward_backward(encode([datum], loss_fn, config))
    assert err.value.metadata["field"] == field


def test_loss_config_maps_to_tensafe_kwargs() -> None:
    assert wire.loss_spec("ppo", {}) == ("ppo", {"reduction": "sum", "clip_low_threshold": 0.8,
                                                 "clip_high_threshold": 1.2})
    assert wire.loss_spec("dro", {"beta": 0.1}) == ("dro", {"beta": 0.1})
    with pytest.raises(InvalidArgument, match="required"):
        wire.loss_spec("dro", {})
    with pytest.raises(InvalidArgument) as err:
        wire.loss_spec("cross_entropy", {"beta": 1.0})
    assert err.value.metadata["field"] == "loss_fn_config.beta"


def test_futures_expire_to_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    """A finished future is kept for FUTURE_TTL_SECONDS, then remembered as expired (retrieve_future: 410);
    an unknown id, or another tenant's, is NotFound (404)."""
    from tensafe.runtime.errors import NotFound
    from tensafe.tinker import futures

    table = futures.FutureTable()
    box = table.new("acme")
    assert table.get("acme", box.request_id) is box
    with pytest.raises(NotFound):
        table.get("other", box.request_id)
    box.future.set_result(futures.Outcome(json={}))
    monkeypatch.setattr(futures, "FUTURE_TTL_SECONDS", -1.0)
    assert table.get("acme", box.request_id) is None
    with pytest.raises(NotFound):
        table.get("acme", "never-issued")
