"""Exporting a variant's encoder as an MLflow model, and registering it under its data set's name.

Registered names separate data sets (`ae-repr-<dataset slug>-<variant>`), so a model trained on one data
set is never compared with, or made the champion of, another's; each name has its own `champion` alias,
which the first version registered gets. A model whose weights are already a version of its name (the
training was served from the cache, or retraining reproduced the same weights) registers nothing: its run
is tagged with that version instead.

Two runs that register the same weights at the same moment both pass the "already registered?" check; without a
lock of our own, each settles it after registering: the lowest version with those weights is the one, and a run
whose new version is higher deletes it. Version numbers are assigned in one store transaction, so both runs see
the same lowest version and end tagged with it; the `champion` alias, when missing, goes to the lowest version.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from ae_repr.checkpoint import DESCRIPTION, WEIGHTS
from ae_repr.io import read_json, sha256_file

from .record import safe

log = logging.getLogger(__name__)

CHAMPION = "champion"
MODEL_NAME = "encoder"
# on a variant's run: which registered model and version hold its encoder, and whether the run registered it
REGISTERED_MODEL_TAG = "ae_repr.registered_model"
MODEL_VERSION_TAG = "ae_repr.model_version"
REGISTRY_TAG = "ae_repr.registry"  # REGISTERED | UNCHANGED
REGISTERED, UNCHANGED = "registered", "unchanged"
WEIGHTS_TAG = "weights_sha256"  # on every model version: the checksum of the weights it was exported from
_SLUG_MAX = 48  # characters of the data set in a registered name


def dataset_slug(dataset: str) -> str:
    """A data set's name (its --dataset spec) as registered names carry it: lower case, other runs as `-`.

    `digits` -> `digits`, `dsprites:2000` -> `dsprites-2000`, `/data/scans.npz` -> `data-scans-npz`; a
    longer one keeps its end and gains a hash of the whole, so two long paths stay apart.
    """
    name = str(dataset).strip()
    slug = re.sub(r"[^a-z0-9_]+", "-", name.lower()).strip("-_") or "data"
    if len(slug) > _SLUG_MAX:
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        slug = f"{slug[-(_SLUG_MAX - 9):].strip('-_')}-{digest}"
    return slug


def registered_name(variant: str, dataset: str) -> str:
    """The registered model name of a variant's encoder trained on `dataset`."""
    return f"ae-repr-{dataset_slug(dataset)}-{variant}"


def weights_checksum(model_dir: Path) -> str:
    """The sha256 of a model folder's weights, as its description records it."""
    desc = model_dir / DESCRIPTION
    recorded = read_json(desc).get("weights_sha256") if desc.is_file() else None
    return str(recorded) if recorded else sha256_file(model_dir / WEIGHTS)


def version_with_weights(client: Any, name: str, weights: str) -> Any | None:
    """The lowest version of registered model `name` exported from weights with checksum `weights`, or None."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name = '{name}' and tags.`{WEIGHTS_TAG}` = '{weights}'")
    except MlflowException:  # no such registered model yet
        return None
    return min(found, key=lambda v: int(v.version)) if found else None


def ensure_name(client: Any, name: str, variant: str, dataset: str) -> None:
    """Create registered model `name` with its data set, variant and description, unless it exists.

    In one store call: runs registering a new name at the same moment all try, one creates it and the others
    are told it exists. Tags set after `register_model` created a bare name collided instead (UNIQUE constraint
    failed on the second run's tag, and that run's model went untagged).
    """
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, tags={"dataset": dataset, "variant": variant},
                                       description=f"{variant} encoder trained on {dataset}: raw rows in, "
                                                   "representation out")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def ensure_champion(client: Any, name: str) -> None:
    """Give the `champion` alias of `name` to its lowest (first registered) version when no version holds it."""
    from mlflow.exceptions import MlflowException

    if CHAMPION in client.get_registered_model(name).aliases:
        return
    # the lowest version, not our own: two first registrations at once must both point the alias at one version
    (first,) = client.search_model_versions(f"name = '{name}'", max_results=1, order_by=["version_number ASC"])
    try:
        client.set_registered_model_alias(name, CHAMPION, str(first.version))
    except MlflowException:  # another run set it at the same moment (to the same lowest version)
        if CHAMPION not in client.get_registered_model(name).aliases:
            raise


def settle_duplicate(client: Any, name: str, version: str, weights: str) -> str:
    """The version of `name` that weights `weights` belong to, right after we registered them as `version`:
    a lower version with the same weights (another run registered them at the same moment) wins, and ours is
    deleted, so each weights checksum stays one version."""
    first = version_with_weights(client, name, weights)
    if first is None or int(first.version) >= int(version):
        return str(version)
    client.delete_model_version(name, str(version))
    log.info("MLflow: %s version %s deleted: version %s, registered at the same moment, has the same weights",
             name, version, first.version)
    return str(first.version)


def _tag_unchanged(client: Any, run_id: str, name: str, version: str, weights: str) -> None:
    """Tag a run whose weights were already version `version` of `name`, and say so."""
    client.set_tag(run_id, REGISTERED_MODEL_TAG, name)
    client.set_tag(run_id, MODEL_VERSION_TAG, version)
    client.set_tag(run_id, REGISTRY_TAG, UNCHANGED)
    ensure_champion(client, name)  # its first registration may have been cut short by a kill
    log.info("MLflow: %s unchanged since version %s (same weights, sha256 %s): nothing registered", name,
             version, weights[:12])


def log_encoder(client: Any, run_id: str, variant: str, model_dir: Path, example: np.ndarray,
                info: dict[str, Any], *, register: bool, seed: int | None = None) -> None:
    """Log the variant's encoder (raw inputs -> representation) to a run and register it when `register` (a seed
    grid's member as a version tagged with its pretraining `seed`), unless its weights are already a registered
    version of its name: then the run is tagged with that one.

    `client` is the session's MlflowClient; the process-wide tracking URI must name the same store
    (log_model and the registry resolve it, not the client's).
    """
    name = registered_name(variant, str(info.get("dataset")))
    weights = weights_checksum(model_dir)
    if register and (same := version_with_weights(client, name, weights)) is not None:
        _tag_unchanged(client, run_id, name, str(same.version), weights)
        return
    import mlflow
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from ae_repr.encoder import Encoder

    enc = Encoder.from_dir(model_dir)
    x = np.ascontiguousarray(example, dtype=np.float32).reshape(-1, *enc.input_shape)  # (B, *input_shape)
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *enc.input_shape))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, enc.latent_dim))]))
    identity = safe({"variant": variant, "dataset": info.get("dataset"), "dataset_sha256": info.get("sha256"),
                     WEIGHTS_TAG: weights})
    model = mlflow.pytorch.log_model(
        enc, name=MODEL_NAME, run_id=run_id, signature=signature, input_example=x,
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"],
        validate_serving_input=False,  # a reload + predict per model; the tests load and run the model
        metadata=safe({**identity, "latent_dim": enc.latent_dim, "input": "raw rows, float32"}),
    )
    if register:
        # the version is created with its identity (the weights checksum above all) in one store call: a process
        # killed right after registering leaves a version a rerun recognises, never an anonymous duplicate
        tags = {**identity, **({"seed": str(seed)} if seed is not None else {})}
        ensure_name(client, name, variant, identity.get("dataset", ""))
        version = str(mlflow.register_model(model.model_uri, name, tags=tags).version)
        if (kept := settle_duplicate(client, name, version, weights)) != version:
            _tag_unchanged(client, run_id, name, kept, weights)
            return
        ensure_champion(client, name)
        client.set_tag(run_id, REGISTERED_MODEL_TAG, name)
        client.set_tag(run_id, MODEL_VERSION_TAG, version)
        client.set_tag(run_id, REGISTRY_TAG, REGISTERED)
