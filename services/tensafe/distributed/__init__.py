"""Distributed DP-SGD on Ray Train (the ``[ray]`` extra): ``TenSafeTrainer(TenSafeTrainingConfig(...)).fit()``.

See docs/training.md, "Distributed DP on Ray", for the guarantee and how a run uses the services.
"""

from __future__ import annotations

from .config import DistributedDPConfig, TenSafeTrainingConfig
from .trainer import FitResult, TenSafeTrainer

__all__ = ["DistributedDPConfig", "FitResult", "TenSafeTrainer", "TenSafeTrainingConfig"]
