"""diffurec: DiffuRec (Li, Sun, Li, TOIS 2023) for sequential recommendation, in plain PyTorch.

The library never imports Ray; the Ray programs live in ``pipelines/``.
"""

from diffurec.errors import DiffuRecError

__all__ = ["DiffuRecError"]
__version__ = "0.1.0"
