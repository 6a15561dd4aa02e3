"""The `retrain` flow (deployment `weekly-retrain`): retrain on the current data, then move each
variant's MLflow `champion` alias only when the new model is significantly better.

For every variant, the new encoder's features and the champion's encoder (the version of
`ae-repr-<variant>` holding the alias `champion`, loaded from the registry and run on the same rows)
get linear-probe heads fitted on the train split minus a validation part and are compared on that part
with McNemar's exact one-sided test (`evaluation.champion`); the alias moves when p <= `eval.promotion_alpha`.
The test split is not used for the decision. The statistic and the decision are recorded as tags on the
new model version, as `retrain/*` metrics and `retrain.*` tags on the new version's run, in the log and
as a Prefect markdown artifact.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.states import Completed, Failed, State

from ae_repr.config import ExperimentConfig
from evaluation.champion import PairedTest, compare_with_champion
from evaluation.inputs import load_feature_file
from evaluation.seeds import representative_members

from .pretrain_and_probe import default_out, pretrain_and_probe, resolve_config
from .tracking import CHAMPION, registered_name, tracking_uri

FLOW_NAME = "retrain"
ALIAS = CHAMPION
log = logging.getLogger(__name__)

Compare = Callable[[ModelVersion], PairedTest]  # the champion's version -> the paired test against it


@dataclass(frozen=True)
class Decision:
    """What happened to one variant's champion alias, and the paired test behind it (None: no test run)."""

    variant: str
    new_version: str | None
    champion_version: str | None
    promoted: bool
    reason: str
    test: PairedTest | None = None

    @property
    def verdict(self) -> str:
        """`promoted`, `kept` or `skipped` (nothing to compare)."""
        if self.promoted:
            return "promoted"
        return "kept" if self.new_version is not None else "skipped"


def decide(test: PairedTest) -> tuple[bool, str]:
    """Whether the new model replaces the champion, and why: only when significantly better at level alpha."""
    verdict = "significantly better" if test.better else "not significantly better"
    return test.better, f"new model {verdict}: {test.describe()}"


def champion(client: MlflowClient, name: str) -> ModelVersion | None:
    """The version holding the `champion` alias of `name`, or None."""
    try:
        return client.get_model_version_by_alias(name, ALIAS)
    except MlflowException:  # no such registered model, or no version holds the alias
        return None


def new_versions(client: MlflowClient, experiment: str, flow_run_id: str,
                 members: dict[str, str] | None = None) -> dict[str, ModelVersion]:
    """The model versions registered from the child runs of the MLflow parent run of a flow run, by variant (in a
    seed grid: from the child run of the member `members` names for the variant)."""
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
            if not variant or child.info.run_name not in (variant, (members or {}).get(variant, variant)):
                continue
            found = client.search_model_versions(f"name = '{registered_name(variant)}' and run_id = '{child.info.run_id}'")
            if found:
                out[variant] = max(found, key=lambda v: int(v.version))
    return out


def record(client: MlflowClient, name: str, new: ModelVersion, decision: Decision) -> None:
    """The decision as tags on the new model version, and as `retrain/*` metrics and tags on its run."""
    tags = {"retrain.decision": "promoted" if decision.promoted else "kept", "retrain.reason": decision.reason,
            "retrain.previous_champion": decision.champion_version or ""}
    if decision.test is not None:
        tags |= {"retrain.alpha": f"{decision.test.alpha:g}", "retrain.p_value": repr(decision.test.p_value)}
    for key, value in tags.items():
        client.set_model_version_tag(name, new.version, key, value)
    if not new.run_id:
        return
    for key, value in tags.items():
        client.set_tag(new.run_id, key, value[:5000])  # run tags hold at most 5,000 characters
    if decision.test is not None:
        for key, value in decision.test.as_dict().items():
            client.log_metric(new.run_id, f"retrain/{key}", float(value))


def update_champion(client: MlflowClient, variant: str, new: ModelVersion | None, compare: Compare) -> Decision:
    """Test one variant's new version against its champion; move the alias when better; record the decision."""
    name = registered_name(variant)
    old = champion(client, name)
    old_version = str(old.version) if old is not None else None  # stores differ: int or str
    if new is None:
        return Decision(variant, None, old_version, False, "no new model version registered")
    new_version, test = str(new.version), None
    holds = old_version == new_version  # the tracker gives the alias to the first version ever registered
    if old is None or holds:
        promoted, why, old_version = True, "no earlier champion to test against", None
    else:
        try:
            test = compare(old)
        except Exception as e:  # a champion that cannot be scored on this data is left in place, with the reason
            promoted, why = False, f"champion v{old_version} not compared ({e.__class__.__name__}: {e}); alias left"
        else:
            promoted, why = decide(test)
    if promoted and not holds:
        client.set_registered_model_alias(name, ALIAS, new_version)
    decision = Decision(variant, new_version, old_version, promoted, why, test)
    record(client, name, new, decision)
    return decision


def load_encoder(uri: str, version: ModelVersion) -> Any:
    """A registered encoder (raw inputs in, representation out), on the CPU."""
    import mlflow

    mlflow.set_tracking_uri(uri)  # `models:/` resolves through the process-wide registry URI
    return mlflow.pytorch.load_model(f"models:/{version.name}/{version.version}", map_location="cpu")


def decisions_markdown(decisions: list[Decision], alpha: float) -> str:
    """The decisions as a markdown table."""
    def num(t: PairedTest | None, field: str, fmt: str = ".4f") -> str:
        return "–" if t is None else format(getattr(t, field), fmt)

    lines = [f"# Champion decisions (McNemar exact one-sided, alpha {alpha:g}, validation part of the train split)",
             "", "| variant | new version | champion before | val rows | new val accuracy | champion val accuracy "
             "| new-only / champion-only correct | p | decision | why |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for d in decisions:
        t = d.test
        counts = "–" if t is None else f"{t.new_only} / {t.champion_only}"
        lines.append(f"| {d.variant} | {d.new_version or '–'} | {d.champion_version or '–'} | "
                     f"{'–' if t is None else t.val_rows} | {num(t, 'new_val_accuracy')} | {num(t, 'champion_val_accuracy')} "
                     f"| {counts} | {num(t, 'p_value', '.4g')} | **{d.verdict}** | {d.reason} |")
    return "\n".join(lines)


@flow(name=FLOW_NAME, log_prints=True)
def retrain(
    config: ExperimentConfig | str | None = None,
    dataset: str | None = None,
    variants: list[str] | str | None = None,
    epochs: int | None = None,
    latent_dim: int | None = None,
    out: str | None = None,
) -> State:
    """Run pretrain-and-probe on the current data; promote each variant's new model when significantly better."""
    logger = get_run_logger()
    cfg = resolve_config(config, dataset=dataset, variants=variants, epochs=epochs, latent_dim=latent_dim)
    if not (cfg.tracking.enabled and cfg.tracking.register_models):
        raise ValueError("retrain compares registered MLflow models: set tracking.enabled and "
                         "tracking.register_models to true")
    out_dir = Path(out or default_out(cfg)).resolve()
    state = pretrain_and_probe(config=cfg, out=str(out_dir), return_state=True)
    uri = tracking_uri()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    # a seed grid's candidate: the seed nearest its variant's mean over seeds (evaluation.seeds)
    members = representative_members(out_dir, cfg.models.variants)
    versions = new_versions(client, cfg.tracking.experiment, str(state.state_details.flow_run_id), members)

    def compare(variant: str) -> Compare:
        features = out_dir / "features" / f"{members[variant]}.parquet"
        return lambda old: compare_with_champion(load_feature_file(features), load_encoder(uri, old), cfg.eval,
                                                 seed=cfg.seed)

    decisions = [update_champion(client, v, versions.get(v), compare(v)) for v in cfg.models.variants]
    for d in decisions:
        logger.info("%s: %s (%s)", d.variant, d.verdict, d.reason)
    create_markdown_artifact(markdown=decisions_markdown(decisions, cfg.eval.promotion_alpha),
                             key="champion-decisions", description="retrain: champion alias decisions")
    result: dict[str, Any] = {d.variant: d.verdict for d in decisions}
    tests = {d.variant: d.test.as_dict() for d in decisions if d.test is not None}
    if not state.is_completed():
        return Failed(message=f"pretrain-and-probe: {state.message}; decisions: {result}")
    return Completed(message=f"decisions: {result}; paired tests: {tests}", data=result)
