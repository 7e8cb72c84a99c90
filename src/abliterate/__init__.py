"""abliterate: remove refusals from chat models by directional ablation, tuned with Optuna."""

import os

from abliterate.errors import UserError

# Where the user wants torch.compile's caches, read before any of our modules imports torch._dynamo:
# importing it fills TORCHINDUCTOR_CACHE_DIR in with torch's default, and inductor's first Triton kernel
# TRITON_CACHE_DIR (see `compiled.keep_compiled_code_in`).
CHOSEN_COMPILE_CACHE = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
CHOSEN_TRITON_CACHE = os.environ.get("TRITON_CACHE_DIR")

__all__ = ["UserError"]
__version__ = "0.1.0"
