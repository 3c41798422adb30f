"""The trainer's logic in process: one shared base, adapters added and released."""

from __future__ import annotations

from tensafe.api.trainer.v1 import trainer_pb2
from tensafe.trainer.service import Trainer
from tg_tinker import LoRAConfig, TrainingConfig


def test_sessions_share_one_base_and_closing_releases_it(tiny_model) -> None:
    trainer = Trainer(tiny_model.parent)
    cfg = TrainingConfig(model_ref="tiny", lora_config=LoRAConfig(rank=4, alpha=8), seed=1).to_proto()
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
    shared = TrainingConfig(model_ref="tiny", seed=1).to_proto()
    private = TrainingConfig(model_ref="tiny", seed=1, lora_config=LoRAConfig(bias="all")).to_proto()
    a = trainer.create_session("t", shared)
    b = trainer.create_session("t", private)
    assert a.base is not b.base
    trainer.shutdown()
    assert trainer._bases == {}


def test_pending_ops_are_cancelled_when_the_session_closes(tiny_model) -> None:
    trainer = Trainer(tiny_model.parent)
    s = trainer.create_session("t", TrainingConfig(model_ref="tiny", seed=1).to_proto())
    with s.base.lock:  # hold the worker so the ops stay queued
        ops = [trainer.get_info("t", trainer_pb2.GetInfoRequest(session_id=s.session_id)) for _ in range(3)]
        trainer.close("t", s.session_id)
    assert all(op.state == trainer_pb2.FUTURE_STATE_CANCELLED for op in ops[1:])
