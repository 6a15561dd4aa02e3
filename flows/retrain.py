"""The `retrain` flow (deployment `weekly-retrain`): retrain on the current data, then move each
variant's MLflow `champion` alias only when the new model beats it by a margin.

For every variant the new linear-probe test accuracy (from `<out>/summary.parquet`) is compared with
the `eval/linear_probe_accuracy` metric of the run behind the version of `ae-repr-<variant>` that
holds the alias `champion`. The decision is recorded as tags on the new model version and as a
Prefect markdown artifact.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.states import Completed, Failed, State

from ae_repr.config import ExperimentConfig

from .pretrain_and_probe import default_out, pretrain_and_probe, resolve_config
from .tracking import CHAMPION, registered_name, tracking_uri

FLOW_NAME = "retrain"
ALIAS = CHAMPION
METRIC = "eval/linear_probe_accuracy"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    """What happened to one variant's champion alias."""

    variant: str
    new_version: str | None
    new_accuracy: float | None
    champion_version: str | None
    champion_accuracy: float | None
    promoted: bool
    reason: str

    @property
    def verdict(self) -> str:
        """`promoted`, `kept` or `skipped` (nothing to compare)."""
        if self.promoted:
            return "promoted"
        return "kept" if self.new_version is not None else "skipped"


def decide(new: float, old: float | None, margin: float) -> tuple[bool, str]:
    """Whether a model with accuracy `new` replaces a champion with `old` (None: no champion), and why."""
    if old is None:
        return True, f"no champion yet; new accuracy {new:.4f}"
    if new > old + margin:
        return True, f"new {new:.4f} > champion {old:.4f} + margin {margin:g}"
    return False, f"new {new:.4f} <= champion {old:.4f} + margin {margin:g}"


def linear_probe_accuracy(summary: Path) -> dict[str, float]:
    """Each representation's linear-probe test accuracy from a `summary.parquet`."""
    df = pd.read_parquet(summary)
    rows = df[(df["task"] == "linear_probe") & (df["metric"] == "accuracy") & df["k"].isna()]
    return {str(r.representation): float(r.value) for r in rows.itertuples(index=False)}


def champion(client: MlflowClient, name: str) -> tuple[ModelVersion | None, float | None]:
    """The version holding the `champion` alias of `name` (None if none) and its run's accuracy metric."""
    try:
        version = client.get_model_version_by_alias(name, ALIAS)
    except MlflowException:  # no such registered model, or no version holds the alias
        return None, None
    if not version.run_id:
        return version, None
    value = client.get_run(version.run_id).data.metrics.get(METRIC)
    return version, (None if value is None or math.isnan(value) else float(value))


def new_versions(client: MlflowClient, experiment: str, flow_run_id: str) -> dict[str, ModelVersion]:
    """The model versions registered from the child runs of the MLflow parent run of a flow run, by variant."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    parents = [r for r in client.search_runs([exp.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
               if "mlflow.parentRunId" not in r.data.tags]
    out: dict[str, ModelVersion] = {}
    for parent in parents:
        children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        for child in children:
            variant = child.data.tags.get("variant")
            if not variant:
                continue
            found = client.search_model_versions(f"name = '{registered_name(variant)}' and run_id = '{child.info.run_id}'")
            if found:
                out[variant] = max(found, key=lambda v: int(v.version))
    return out


def update_champion(client: MlflowClient, variant: str, new: ModelVersion | None, accuracy: float | None,
                    margin: float) -> Decision:
    """Compare one variant's new version with its champion; move the alias when better; tag the new version."""
    name = registered_name(variant)
    old, old_acc = champion(client, name)
    old_version = str(old.version) if old is not None else None  # stores differ: int or str
    if new is None or accuracy is None or math.isnan(accuracy):
        why = "no new model version registered" if new is None else "no linear-probe accuracy in this run"
        return Decision(variant, str(new.version) if new else None, accuracy, old_version, old_acc, False, why)
    new_version = str(new.version)
    holds = old_version == new_version
    if holds:
        # the tracker gives the alias to the first version ever registered: nothing earlier to beat
        promoted, why = True, f"first registered version; new accuracy {accuracy:.4f}"
        old_version, old_acc = None, None
    elif old is not None and old_acc is None:
        promoted, why = False, f"champion v{old_version} has no {METRIC}; alias left in place"
    else:
        promoted, why = decide(accuracy, old_acc, margin)
    if promoted and not holds:
        client.set_registered_model_alias(name, ALIAS, new_version)
    tags = {"retrain.decision": "promoted" if promoted else "kept", "retrain.reason": why,
            "retrain.margin": str(margin), "retrain.previous_champion": str(old_version or "")}
    for key, value in tags.items():
        client.set_model_version_tag(name, new_version, key, value)
    return Decision(variant, new_version, accuracy, old_version, old_acc, promoted, why)


def decisions_markdown(decisions: list[Decision], margin: float) -> str:
    """The decisions as a markdown table."""
    def num(x: float | None) -> str:
        return "–" if x is None else f"{x:.4f}"

    lines = [f"# Champion decisions (margin {margin:g})", "",
             "| variant | new version | new accuracy | champion before | champion accuracy | decision | why |",
             "|---|---:|---:|---:|---:|---|---|"]
    for d in decisions:
        lines.append(f"| {d.variant} | {d.new_version or '–'} | {num(d.new_accuracy)} | "
                     f"{d.champion_version or '–'} | {num(d.champion_accuracy)} | **{d.verdict}** | {d.reason} |")
    return "\n".join(lines)


@flow(name=FLOW_NAME, log_prints=True)
def retrain(
    config: ExperimentConfig | str | None = None,
    dataset: str | None = None,
    variants: list[str] | str | None = None,
    epochs: int | None = None,
    latent_dim: int | None = None,
    out: str | None = None,
    margin: float = 0.005,
) -> State:
    """Run pretrain-and-probe on the current data; promote each variant's new model when it beats the champion."""
    logger = get_run_logger()
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    cfg = resolve_config(config, dataset=dataset, variants=variants, epochs=epochs, latent_dim=latent_dim)
    if not (cfg.tracking.enabled and cfg.tracking.register_models):
        raise ValueError("retrain compares registered MLflow models: set tracking.enabled and "
                         "tracking.register_models to true")
    out_dir = Path(out or default_out(cfg)).resolve()
    state = pretrain_and_probe(config=cfg, out=str(out_dir), return_state=True)
    summary = out_dir / "summary.parquet"
    accuracy = linear_probe_accuracy(summary) if summary.is_file() else {}
    uri = tracking_uri()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = new_versions(client, cfg.tracking.experiment, str(state.state_details.flow_run_id))
    decisions = [update_champion(client, v, versions.get(v), accuracy.get(v), margin) for v in cfg.models.variants]
    for d in decisions:
        logger.info("%s: %s (%s)", d.variant, d.verdict, d.reason)
    create_markdown_artifact(markdown=decisions_markdown(decisions, margin), key="champion-decisions",
                             description="retrain: champion alias decisions")
    result: dict[str, Any] = {d.variant: d.verdict for d in decisions}
    if not state.is_completed():
        return Failed(message=f"pretrain-and-probe: {state.message}; decisions: {result}")
    return Completed(message=f"decisions: {result}", data=result)
