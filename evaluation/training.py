"""How each learned representation's model was trained (task `training`), from its saved description:
optimizer steps and epochs taken, why training stopped (a plateau of the validation objective, the step
budget, or the epoch cap), and the kept weights' validation terms in nats per example (`val_elbo` for
the VAE family, `val_recon`: the reconstruction NLL of normalized data)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ae_repr.checkpoint import DESCRIPTION
from ae_repr.io import read_json

from .results import result_frame, result_row

TASK = "training"
VAL_TERMS = ("elbo", "recon", "kl")  # the kept weights' validation terms reported, where the model has them


def training_record(name: str, model_dir: Path) -> tuple[pd.DataFrame, str]:
    """Result rows (`steps`, `epochs`, `plateau` 1/0, `val_<term>`) and a one-line note of a saved model."""
    meta = read_json(Path(model_dir) / DESCRIPTION)
    best = meta.get("best_val", {})
    if "steps" not in meta:  # saved by other means than the trainer: nothing to report
        return result_frame([]), f"{name}: no training record in {Path(model_dir) / DESCRIPTION}"
    rows = [
        result_row(name, TASK, "steps", meta["steps"]),
        result_row(name, TASK, "epochs", meta["epochs_run"]),
        result_row(name, TASK, "plateau", float(meta["stopped_on"] == "plateau")),
        *(result_row(name, TASK, f"val_{t}", best[t]) for t in VAL_TERMS if t in best),
    ]
    budget = meta.get("train_config", {}).get("max_steps")
    terms = ", ".join(f"{t} {best[t]:.2f}" for t in VAL_TERMS if t in best)
    note = (
        f"{name}: trained {meta.get('steps')} steps ({meta.get('epochs_run')} epochs, budget {budget} steps), "
        f"stopped on {meta.get('stopped_on')}; kept epoch {meta.get('best_epoch')} (validation {terms or 'n/a'})"
    )
    return result_frame(rows), note
