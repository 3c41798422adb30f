"""The accountant service: privacy budgets and the durable record of every DP step (docs/privacy.md)."""
