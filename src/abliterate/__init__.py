"""abliterate: remove refusals from chat models by directional ablation, tuned with Optuna."""

from abliterate.errors import UserError

__all__ = ["UserError"]
__version__ = "0.1.0"
