"""The trainer's logic in process: one shared base, adapters added and released."""

from __future__ import annotations

import pytest
from google.protobuf import json_format

from tensafe.api.trainer.v1 import trainer_pb2
from tensafe.runtime.errors import InvalidArgument
from tensafe.trainer.messages import config_proto
from tensafe.trainer.service import Trainer
from tensafe.trainer.servicer import config_value
from tg_tinker import DPConfig, LoRAConfig, LossConfig, OptimizerConfig, TrainingConfig


def test_sessions_share_one_base_and_closing_releases_it(tiny_model) -> None:
    trainer = Trainer(tiny_model.parent)
    cfg = config_value(TrainingConfig(model_ref="tiny", lora_config=LoRAConfig(rank=4, alpha=8), seed=1).to_proto())
    a = trainer.create_session("t1", cfg)
    b = trainer.create_session("t2", cfg)
    assert a.base is b.base and len(trainer._bases) == 1
    model = a.base.peft
    base_weight = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert not base_weight.requires_grad
    assert set(model.peft_config) == {a.session_id, b.session_id}
    a_params = {id(p) for p in a.base.adapter_parameters(a.session_id)}
    assert a_params and not a_params & {id(p) for p in b.base.adapter_parameters(b.session_id)}
    assert a.optimizer.param_groups[0]["params"] and all(
        id(p) in a_params for p in a.optimizer.param_groups[0]["params"])
    trainer.close("t1", a.session_id)
    assert set(model.peft_config) == {b.session_id} and a.optimizer is None
    assert [s.session_id for s in trainer.list("t1", include_closed=True)] == [a.session_id]
    assert trainer.list("t1", include_closed=False) == []
    trainer.close("t2", b.session_id)
    assert trainer._bases == {}  # the last session took the base model with it


def test_bias_training_gets_a_private_base(tiny_model) -> None:
    trainer = Trainer(tiny_model.parent)
    shared = config_value(TrainingConfig(model_ref="tiny", seed=1).to_proto())
    private = config_value(TrainingConfig(model_ref="tiny", seed=1, lora_config=LoRAConfig(bias="all")).to_proto())
    a = trainer.create_session("t", shared)
    b = trainer.create_session("t", private)
    assert a.base is not b.base
    trainer.shutdown()
    assert trainer._bases == {}


def test_pending_ops_are_cancelled_when_the_session_closes(tiny_model) -> None:
    trainer = Trainer(tiny_model.parent)
    s = trainer.create_session("t", config_value(TrainingConfig(model_ref="tiny", seed=1).to_proto()))
    with s.base.lock:  # hold the worker so the ops stay queued
        ops = [trainer.get_info("t", s.session_id) for _ in range(3)]
        trainer.close("t", s.session_id)
    assert all(op.state == trainer_pb2.FUTURE_STATE_CANCELLED for op in ops[1:])


ROUND_TRIP = [
    trainer_pb2.TrainingConfig(),
    TrainingConfig(model_ref="tiny", seed=1).to_proto(),
    TrainingConfig(model_ref="tiny", lora_config=LoRAConfig(rank=8, alpha=16, dropout=0.1, bias="lora_only"),
                   optimizer=OptimizerConfig(name="sgd", learning_rate=0.1, momentum=0.9),
                   loss=LossConfig("ppo", {"clip_epsilon": 0.1}), metadata={"run": "a", "n": 3, "x": [1.5, None]},
                   dp_config=DPConfig(enabled=True, max_grad_norm=1.0, target_epsilon=8.0, target_delta=1e-5,
                                      dataset_size=1000, max_steps=10)).to_proto(),
    trainer_pb2.TrainingConfig(optimizer=trainer_pb2.OptimizerConfig(eps=0.0, betas=[0.8, 0.9]),
                               loss=trainer_pb2.LossConfig(), dp_config=trainer_pb2.DPConfig(
                                   noise_multiplier=0.0, sample_rate=0.5, budget_id="bud_1", accountant_type=1),
                               lora_config=trainer_pb2.LoRAConfig(bias=trainer_pb2.LORA_BIAS_NONE)),
]


@pytest.mark.parametrize("msg", ROUND_TRIP)
def test_a_config_comes_back_as_it_was_sent(msg) -> None:
    """Session.config and the checkpoint's session.json echo the TrainingConfig the tenant sent: the
    plain values keep every field and what was absent (an unset optional, a missing sub-message)."""
    back = config_proto(config_value(msg))
    assert back.SerializeToString(deterministic=True) == msg.SerializeToString(deterministic=True)
    assert json_format.MessageToDict(back) == json_format.MessageToDict(msg)


def test_an_unknown_lora_bias_is_refused_naming_the_field() -> None:
    with pytest.raises(InvalidArgument) as err:
        config_value(trainer_pb2.TrainingConfig(lora_config=trainer_pb2.LoRAConfig(bias=9)))
    assert err.value.field == "config.lora_config.bias"
