"""The `retrain` flow (deployment `weekly-retrain`): retrain on the current data, then move each
variant's MLflow `champion` alias only when the new model is significantly better.

Registered names carry the data set (`ae-repr-<dataset slug>-<variant>`, `flows.tracking.models`), so the
champion compared with is always one trained on the same data set. A variant whose trained weights are
already a registered version (its training was served from the cache, or reproduced the same weights)
registers nothing and is reported as "unchanged since version N". Otherwise the new encoder's features
and the champion's encoder (loaded from the registry and run on the same rows) get linear-probe heads
fitted on the train split minus a validation part and are compared on that part with McNemar's exact
one-sided test (`evaluation.champion`); the alias moves when p <= `eval.promotion_alpha`. The test split
is not used for the decision. The decisions, with the accuracies and margin and their intervals, are the
flow run's final state message (shown by `prefect deployment run ... --watch`) and its log; they are also
recorded as tags on the new model version, as `retrain/*` metrics and `retrain.*` tags on the new
version's run, and as a Prefect markdown artifact.
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

from .pretrain_and_probe import data_for, default_out, pretrain_and_probe, resolve_config
from .tracking import CHAMPION, registered_name, tracking_uri
from .tracking.models import MODEL_VERSION_TAG, REGISTERED_MODEL_TAG, REGISTRY_TAG, UNCHANGED, WEIGHTS_TAG

FLOW_NAME = "retrain"
ALIAS = CHAMPION
log = logging.getLogger(__name__)

Compare = Callable[[ModelVersion], PairedTest]  # the champion's version -> the paired test against it


@dataclass(frozen=True)
class Registration:
    """What one variant's run of this retrain left in the registry."""

    version: ModelVersion  # the version it registered, or the one whose weights it reproduced
    run_id: str | None  # the variant's run in this retrain
    unchanged: bool = False  # True: the weights were already `version`, nothing was registered


@dataclass(frozen=True)
class Decision:
    """What happened to one variant's champion alias, and the paired test behind it (None: no test run)."""

    variant: str
    new_version: str | None
    champion_version: str | None
    promoted: bool
    reason: str
    test: PairedTest | None = None
    name: str = ""  # the registered model
    unchanged_since: str | None = None  # the version whose weights this retrain reproduced

    @property
    def verdict(self) -> str:
        """`promoted`, `kept`, `unchanged` (nothing new registered) or `skipped` (nothing to compare)."""
        if self.promoted:
            return "promoted"
        if self.unchanged_since is not None:
            return "unchanged"
        return "kept" if self.new_version is not None else "skipped"

    def line(self) -> str:
        """The decision in one line, for the flow run's final message and log."""
        who = self.name or self.variant
        if self.verdict == "unchanged":
            return f"{who}: {self.reason}; champion v{self.champion_version or '-'} stays"
        if self.verdict == "promoted":
            over = f" over v{self.champion_version}" if self.champion_version else ""
            return f"{who}: promoted v{self.new_version}{over} to champion: {self.reason}"
        if self.verdict == "kept":
            return f"{who}: kept champion v{self.champion_version}, new v{self.new_version} registered: {self.reason}"
        return f"{who}: skipped: {self.reason}"


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


def new_versions(client: MlflowClient, experiment: str, flow_run_id: str, dataset: str,
                 members: dict[str, str] | None = None) -> dict[str, Registration]:
    """By variant, what the child runs of the MLflow parent run of a flow run registered (or found registered);
    in a seed grid, from the child run of the member `members` names for the variant."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    parents = [r for r in client.search_runs([exp.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
               if "mlflow.parentRunId" not in r.data.tags]
    out: dict[str, Registration] = {}
    for parent in parents:
        children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        for child in children:
            variant, tags = child.data.tags.get("variant"), child.data.tags
            if not variant or child.info.run_name not in (variant, (members or {}).get(variant, variant)):
                continue  # a baseline's run, or a seed grid member other than the variant's candidate
                continue
            name = tags.get(REGISTERED_MODEL_TAG) or registered_name(variant, dataset)
            if tags.get(MODEL_VERSION_TAG):
                version = client.get_model_version(name, tags[MODEL_VERSION_TAG])
                out[variant] = Registration(version, child.info.run_id, tags.get(REGISTRY_TAG) == UNCHANGED)
                continue
            found = client.search_model_versions(f"name = '{name}' and run_id = '{child.info.run_id}'")
            if found:
                out[variant] = Registration(max(found, key=lambda v: int(v.version)), child.info.run_id)
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


def update_champion(client: MlflowClient, name: str, variant: str, new: Registration | None,
                    compare: Compare) -> Decision:
    """Test one variant's new version of registered model `name` against its champion; move the alias when
    better; record the decision. A version this retrain only reproduced is left alone, and so is the alias."""
    old = champion(client, name)
    old_version = str(old.version) if old is not None else None  # stores differ: int or str
    if new is None:
        return Decision(variant, None, old_version, False, "no new model version registered", name=name)
    new_version, test = str(new.version.version), None
    if new.unchanged:
        sha = (new.version.tags or {}).get(WEIGHTS_TAG, "")
        why = (f"unchanged since version {new_version} (the trained weights are version {new_version}'s"
               f"{f', sha256 {sha[:12]}' if sha else ''}): nothing registered, nothing compared")
        if new.run_id:
            client.set_tag(new.run_id, "retrain.decision", "unchanged")
            client.set_tag(new.run_id, "retrain.reason", why)
        return Decision(variant, None, old_version, False, why, name=name, unchanged_since=new_version)
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
    decision = Decision(variant, new_version, old_version, promoted, why, test, name=name)
    record(client, name, new.version, decision)
    return decision


def load_encoder(uri: str, version: ModelVersion) -> Any:
    """A registered encoder (raw inputs in, representation out), on the CPU."""
    import mlflow

    mlflow.set_tracking_uri(uri)  # `models:/` resolves through the process-wide registry URI
    return mlflow.pytorch.load_model(f"models:/{version.name}/{version.version}", map_location="cpu")


def decisions_markdown(decisions: list[Decision], alpha: float) -> str:
    """The decisions as a markdown table."""
    def acc(t: PairedTest | None, value: str) -> str:
        if t is None:
            return "–"
        lo, hi = t.accuracy_interval(getattr(t, value))
        return f"{getattr(t, value):.4f} [{lo:.4f}, {hi:.4f}]"

    def margin(t: PairedTest | None) -> str:
        return "–" if t is None else "{:+.4f} [{:+.4f}, {:+.4f}]".format(t.margin, *t.margin_interval())

    lines = [f"# Champion decisions (McNemar exact one-sided, alpha {alpha:g}, validation part of the train split)",
             "", "Accuracies and the margin (new minus champion) with their 95% intervals.", "",
             "| variant | registered model | new version | champion before | val rows | new val accuracy "
             "| champion val accuracy | margin | new-only / champion-only correct | p | decision | why |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for d in decisions:
        t = d.test
        counts = "–" if t is None else f"{t.new_only} / {t.champion_only}"
        new = d.new_version or (f"– (same as v{d.unchanged_since})" if d.unchanged_since else "–")
        lines.append(f"| {d.variant} | {d.name or '–'} | {new} | {d.champion_version or '–'} | "
                     f"{'–' if t is None else t.val_rows} | {acc(t, 'new_val_accuracy')} | "
                     f"{acc(t, 'champion_val_accuracy')} | {margin(t)} | {counts} | "
                     f"{'–' if t is None else format(t.p_value, '.4g')} | **{d.verdict}** | {d.reason} |")
    return "\n".join(lines)


def final_message(dataset: str, decisions: list[Decision]) -> str:
    """The flow run's final message: every variant's decision in one line each, joined."""
    return f"retrain on {dataset}: " + " | ".join(d.line() for d in decisions)


@flow(name=FLOW_NAME, log_prints=True)
def retrain(
    config: ExperimentConfig | str | None = None,
    dataset: str | None = None,
    variants: list[str] | str | None = None,
    epochs: int | None = None,
    latent_dim: int | None = None,
    out: str | None = None,
) -> State:
    """Run pretrain-and-probe on the current data; promote each variant's new model when significantly better.

    Args:
        config: The experiment: an ExperimentConfig, a path to its YAML file, or none for configs/default.yaml;
            tracking and model registration must be enabled.
        dataset: Data set overriding data.dataset; its champion is that of the same data set.
        variants: Variants to retrain, overriding models.variants: a list or a comma-separated string.
        epochs: Cap on training epochs, overriding train.epochs.
        latent_dim: Representation width K, overriding models.latent_dim.
        out: Run directory; runs/<dataset> under the working directory when not given (an unchanged run
            folder is served from the cache and registers nothing).
    """
    logger = get_run_logger()
    cfg = resolve_config(config, dataset=dataset, variants=variants, epochs=epochs, latent_dim=latent_dim)
    if not (cfg.tracking.enabled and cfg.tracking.register_models):
        raise ValueError("retrain compares registered MLflow models: set tracking.enabled and "
                         "tracking.register_models to true")
    out_dir = Path(out or default_out(cfg)).resolve()
    state = pretrain_and_probe(config=cfg, out=str(out_dir), return_state=True)
    uri = tracking_uri()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    data_name = data_for(cfg).name  # what the run's registered names were made from
    # a seed grid's candidate: the seed nearest its variant's mean over seeds (evaluation.seeds)
    members = representative_members(out_dir, cfg.models.variants)
    versions = new_versions(client, cfg.tracking.experiment, str(state.state_details.flow_run_id), data_name,
                            members)

    def compare(variant: str) -> Compare:
        features = out_dir / "features" / f"{members[variant]}.parquet"
        return lambda old: compare_with_champion(load_feature_file(features), load_encoder(uri, old), cfg.eval,
                                                 seed=cfg.seed)

    decisions = [update_champion(client, registered_name(v, data_name), v, versions.get(v), compare(v))
                 for v in cfg.models.variants]
    create_markdown_artifact(markdown=decisions_markdown(decisions, cfg.eval.promotion_alpha),
                             key="champion-decisions", description="retrain: champion alias decisions")
    result: dict[str, Any] = {d.variant: d.verdict for d in decisions}
    message = final_message(data_name, decisions)
    if not state.is_completed():
        message = f"pretrain-and-probe: {state.message}; {message}"
    for d in decisions:  # the final state's message repeats them, in the engine's "Finished in state" line
        logger.info("%s", d.line())
    return Completed(message=message, data=result) if state.is_completed() else Failed(message=message)
