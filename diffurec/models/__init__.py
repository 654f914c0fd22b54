"""Models: DiffuRec and the SASRec baseline, built from a Config."""

from __future__ import annotations

from diffurec.config import Config


def build_model(cfg: Config, num_items: int):
    from diffurec.models.diffurec import DiffuRec
    from diffurec.models.sasrec import SASRec

    return {"diffurec": DiffuRec, "sasrec": SASRec}[cfg.model](cfg, num_items)
