"""Plain values -> the trainer's messages, where a message is what the value becomes.

``config_proto`` gives a session's ``TrainingConfig`` back exactly as it was sent (``servicer.config_value``
is its inverse): echoed in ``Session.config`` and ``SessionInfo``, and written into a checkpoint's
``session.json``. The future-state and op-type names the logic uses are here too, so that the logic
(``service``) imports no generated module.
"""

from __future__ import annotations

from typing import Any, cast

from google.protobuf import struct_pb2

from tensafe.api.accountant.v1 import accountant_pb2
from tensafe.api.common.v1 import common_pb2
from tensafe.api.trainer.v1 import trainer_pb2

from .values import LoraSpec, SessionConfig

# Op types of the futures (``FutureRef.op``).
OP_FORWARD_BACKWARD = trainer_pb2.OP_TYPE_FORWARD_BACKWARD
OP_FORWARD = trainer_pb2.OP_TYPE_FORWARD
OP_FORWARD_CUSTOM = trainer_pb2.OP_TYPE_FORWARD_CUSTOM
OP_BACKWARD_CUSTOM = trainer_pb2.OP_TYPE_BACKWARD_CUSTOM
OP_OPTIM_STEP = trainer_pb2.OP_TYPE_OPTIM_STEP
OP_SAMPLE = trainer_pb2.OP_TYPE_SAMPLE
OP_SAVE_STATE = trainer_pb2.OP_TYPE_SAVE_STATE
OP_LOAD_STATE = trainer_pb2.OP_TYPE_LOAD_STATE
OP_GET_INFO = trainer_pb2.OP_TYPE_GET_INFO

DEFAULT_ACCOUNTANT_TYPE = common_pb2.ACCOUNTANT_TYPE_PLD

_BIAS = {"": trainer_pb2.LORA_BIAS_UNSPECIFIED, "none": trainer_pb2.LORA_BIAS_NONE,
         "all": trainer_pb2.LORA_BIAS_ALL, "lora_only": trainer_pb2.LORA_BIAS_LORA_ONLY}
BIAS_NAMES = {number: name for name, number in _BIAS.items()}


def struct(values: dict[str, Any]) -> struct_pb2.Struct:
    msg = struct_pb2.Struct()
    msg.update(values)
    return msg


def lora_proto(lora: LoraSpec) -> trainer_pb2.LoRAConfig:
    return trainer_pb2.LoRAConfig(rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
                                  target_modules=list(lora.target_modules), bias=_BIAS[lora.bias])


def config_proto(cfg: SessionConfig) -> trainer_pb2.TrainingConfig:
    msg = trainer_pb2.TrainingConfig(model_ref=cfg.model_ref, batch_size=cfg.batch_size,
                                     gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                                     max_sequence_length=cfg.max_sequence_length)
    if cfg.seed is not None:
        msg.seed = cfg.seed
    if cfg.lora is not None:
        msg.lora_config.CopyFrom(lora_proto(cfg.lora))
    if (opt := cfg.optimizer) is not None:
        msg.optimizer.SetInParent()
        msg.optimizer.name, msg.optimizer.learning_rate = opt.name, opt.learning_rate
        msg.optimizer.weight_decay = opt.weight_decay
        msg.optimizer.betas.extend(opt.betas)
        if opt.eps is not None:
            msg.optimizer.eps = opt.eps
        if opt.momentum is not None:
            msg.optimizer.momentum = opt.momentum
    if (dp := cfg.dp) is not None:
        out = msg.dp_config
        out.SetInParent()
        out.enabled, out.max_grad_norm, out.budget_id = dp.enabled, dp.max_grad_norm, dp.budget_id
        out.target_epsilon, out.target_delta = dp.target_epsilon, dp.target_delta
        out.accountant_type = cast("common_pb2.AccountantType", dp.accountant_type)
        out.sampling = cast("trainer_pb2.DPSampling", dp.sampling)
        out.dataset_artifact_id = dp.dataset_artifact_id
        for name in ("noise_multiplier", "dataset_size", "sample_rate", "max_steps"):
            if (value := getattr(dp, name)) is not None:
                setattr(out, name, value)
    if cfg.loss is not None:
        msg.loss.SetInParent()
        msg.loss.name = cfg.loss.name
        if cfg.loss.kwargs is not None:
            msg.loss.kwargs.CopyFrom(struct(cfg.loss.kwargs))
    if cfg.metadata is not None:
        msg.metadata.CopyFrom(struct(cfg.metadata))
    return msg


def budget_is_active(budget: accountant_pb2.Budget) -> bool:
    """An accountant budget (as the accountant client returns it) still takes steps."""
    return budget.state == accountant_pb2.BUDGET_STATE_ACTIVE


def budget_state_name(budget: accountant_pb2.Budget) -> str:
    return accountant_pb2.BudgetState.Name(budget.state)
