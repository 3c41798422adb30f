"""Experiment tracking and model export for TenSafe runs, on the client side.

- :class:`MLflowTracker` (``mlflow-skinny``: a local file or SQLite tracking store, or any tracking server)
  and :class:`WandbTracker` (``wandb``, offline by default) log a session's settings, each step's loss,
  epsilon and learning rate, and the ids of the artifacts it saved: numbers and ids only, never weights,
  tokens or data.
- :func:`export_peft` writes a checkpoint of the vault as a PEFT adapter directory (``adapter_config.json``,
  ``adapter_model.safetensors``, and a model card ``README.md`` stating its DP guarantee) in the layout of the
  Hugging Face Hub, with no network: uploading it is the user's decision.

Install with ``pip install 'tg-tinker[mlops]'`` (or ``tensafe[mlops]``). See docs/integrations.md.
"""

from __future__ import annotations

from .export import ModelCard, export_peft
from .tracking import MLflowTracker, StepMetrics, Tracker, WandbTracker, step_metrics

__all__ = ["MLflowTracker", "ModelCard", "StepMetrics", "Tracker", "WandbTracker", "export_peft", "step_metrics"]
