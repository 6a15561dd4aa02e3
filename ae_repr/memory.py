"""The peak memory a run would need, estimated from the data's shape and the config before any work, and the
memory this machine (or its cgroup) has for it: a run that cannot fit is refused in one line up front.

The estimate adds up what is alive at the peak, every term in bytes:
- model: parameters (and buffers) x 5 copies: weights, gradients, Adam's two moments, and the best epoch's
  weights the trainer keeps; for every model trained at once (the largest ones).
- activations: the tensors one training batch keeps for the backward pass, per model trained at once
  (per input element a fixed count set by the likelihood, plus the backbone's hidden activations).
- data: the data set as loaded (its storage dtype) and its normalized float32 copy.
- evaluation: the largest of the evaluation's copies: the raw-input baseline (a D-column feature table
  written and read back, standardized in float64 for the probes), PCA/ICA on the D columns (a centred
  float64 copy), few-shot fine-tuning's ensemble (one model per episode with its gradients and Adam
  moments), extraction's input batch.
Parameters are counted exactly, by building each model on PyTorch's meta device (shapes only, no memory).

`release_free_memory` hands what the process has freed back to the system between steps (the evaluation
calls it after every task), so that steps running side by side do not stack their high-water marks.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import DataError

if TYPE_CHECKING:
    from collections.abc import Callable

    from .config import ExperimentConfig
    from .data import Dataset
    from .models import ModelConfig

log = logging.getLogger(__name__)

GIB = 1 << 30
FLOAT32 = 4
# weights, gradients, Adam's first and second moments, the best epoch's weights (ae_repr.train keeps a copy)
MODEL_COPIES = 5
# float32 values a training batch keeps for the backward pass per input element, by likelihood: measured with
# saved-tensor hooks (parameters excluded) on the MLP and conv backbones of every variant, bernoulli 2.0-3.1,
# gaussian 5.0-6.1, discretized_logistic 9.5-10.6; plus 1-2 for the gradient flowing back through the output
PER_ELEMENT = {"bernoulli": 4, "gaussian": 7, "discretized_logistic": 12}
# each hidden activation is kept before and after its nonlinearity, in the encoder and again in the decoder
# (measured: exactly 4 per hidden unit); a hierarchical VAE runs its networks once per level
PER_HIDDEN = 4
EXTRACT_BATCH = 4096  # ae_repr.features' default batch: the raw chunk and its normalized float32 copy
_UNLIMITED = 1 << 60  # a cgroup "limit" at or above this is no limit (v1 writes 2^63 rounded to a page)


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes of a run, by what holds them."""

    model: int
    activations: int
    data: int
    evaluation: int

    @property
    def total(self) -> int:
        return self.model + self.activations + self.data + self.evaluation

    def describe(self) -> str:
        """`about 41.2 GiB (model 38.1 GiB, activations ..., data ..., evaluation ...)`."""
        parts = ", ".join(f"{k} {gib(v)}" for k, v in (("model", self.model), ("activations", self.activations),
                                                         ("data", self.data), ("evaluation", self.evaluation)))
        return f"about {gib(self.total)} ({parts})"


def gib(n: int) -> str:
    """Bytes as GiB with one decimal (`0.1 GiB` at the least, so no part reads as nothing)."""
    return f"{max(n / GIB, 0.1):.1f} GiB"


@functools.lru_cache(maxsize=64)  # a run checks before and after loading: the same models, built once
def count_parameters(variant: str, model_cfg: ModelConfig, shape: tuple[int, ...], likelihood: str) -> int:
    """Parameters of the variant's model for samples of `shape`: exact, the model built on the meta device."""
    import torch

    from .models import build_model

    with torch.device("meta"):  # shapes only: a 38 GiB model costs nothing to count
        model = build_model(variant, model_cfg, shape, likelihood)
    return sum(p.numel() for p in model.parameters())


def hidden_activations(shape: tuple[int, ...], model_cfg: ModelConfig) -> int:
    """Hidden activations of one sample in the backbone's encoder: the MLP's widths, or each conv's C x H x W."""
    from .models.backbones import resolve_backbone

    if resolve_backbone(shape, model_cfg) == "mlp":
        return sum(model_cfg.hidden)
    _, h, w = shape
    total = 0
    for ch in model_cfg.channels:
        h, w = (h + 1) // 2, (w + 1) // 2  # stride 2, kernel 3, padding 1
        total += ch * h * w
    return total


def activation_bytes(shape: tuple[int, ...], model_cfg: ModelConfig, likelihood: str, batch_size: int) -> int:
    """Bytes one training batch keeps for the backward pass (an upper estimate, see PER_ELEMENT)."""
    d = math.prod(shape)
    levels = len(getattr(model_cfg, "resolved_level_dims", lambda: (0,))())  # hierarchical: a pass per level
    per_sample = PER_ELEMENT[likelihood] * d + PER_HIDDEN * levels * hidden_activations(shape, model_cfg)
    return batch_size * FLOAT32 * (per_sample + 8 * model_cfg.latent_dim)


def _likelihood(model_cfg: ModelConfig) -> str:
    # before the data is read, "auto" may become any of them: the costliest
    return "discretized_logistic" if model_cfg.likelihood == "auto" else model_cfg.likelihood


def estimate_memory(
    n_rows: int,
    shape: tuple[int, ...],
    cfg: ExperimentConfig,
    *,
    variants_at_once: int = 1,
    itemsize: int = 8,
    labels: bool = True,
) -> MemoryEstimate:
    """Peak memory of training and evaluating `cfg`'s variants on `n_rows` samples of `shape` (storage dtype of
    `itemsize` bytes), `variants_at_once` models training side by side; `labels`: the label tasks run."""
    d = math.prod(shape)
    sizes = [(0, 0)]  # (parameters, activation bytes) per variant
    for variant in cfg.models.variants:
        mc = cfg.models.model_config_for(variant)
        lik = _likelihood(mc)
        try:
            params = count_parameters(variant, mc, shape, f"{lik}:256" if lik == "discretized_logistic" else lik)
        except Exception as e:  # noqa: BLE001 - a plug-in that cannot be built on the meta device is not sized
            log.debug("%s: not sized (%s: %s)", variant, e.__class__.__name__, e)
            continue
        sizes.append((params, activation_bytes(shape, mc, lik, min(cfg.train.batch_size, n_rows))))
    at_once = sorted(sizes, reverse=True)[: max(1, variants_at_once)]
    model = sum(p for p, _ in at_once) * FLOAT32 * MODEL_COPIES
    activations = sum(a for _, a in at_once)
    data = n_rows * d * (itemsize + FLOAT32)
    ev = cfg.eval
    copies = [min(n_rows, EXTRACT_BATCH) * d * FLOAT32 * 2]
    if {"raw", "pca", "ica"} & set(ev.baselines):
        # the raw baseline's table as written and read back (float32) and a standardized / centred float64 copy
        copies.append(n_rows * d * (2 * FLOAT32 + 8))
    if labels and ev.fewshot_finetune:
        copies.append(ev.fewshot_seeds * max(p for p, _ in sizes) * FLOAT32 * MODEL_COPIES)
    return MemoryEstimate(model, activations, data, max(copies))


def available_memory() -> int:
    """Bytes this process may still use: MemAvailable, capped by the cgroup's limit less its usage."""
    avail = _meminfo_available()
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and limit < _UNLIMITED:
            avail = min(avail, max(0, limit - (usage or 0)))
            break
    return avail


def _meminfo_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    # no /proc (not Linux): physical memory, as the OS reports it
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def check_fits(
    what: str,
    n_rows: int,
    shape: tuple[int, ...],
    cfg: ExperimentConfig,
    *,
    variants_at_once: int = 1,
    itemsize: int = 8,
    labels: bool = True,
    available: int | None = None,
    gpu_available: int | None = None,
) -> MemoryEstimate:
    """The run's estimate; DataError in one line when it exceeds the memory available. With `gpu_available`
    (training on a GPU) the models and their activations are compared with it, the rest with `available`."""
    est = estimate_memory(n_rows, shape, cfg, variants_at_once=variants_at_once, itemsize=itemsize, labels=labels)
    avail = available_memory() if available is None else available
    host = est.total if gpu_available is None else est.data + est.evaluation
    gpu = 0 if gpu_available is None else est.model + est.activations
    if host > avail or (gpu_available is not None and gpu > gpu_available):
        size = f"{n_rows} x {math.prod(shape)} features" if len(shape) == 1 else \
            f"{n_rows} images of {' x '.join(map(str, shape))}"
        where = f"{gib(avail)} available" if gpu_available is None else \
            f"{gib(gpu)} of it on the GPU, {gib(gpu_available)} free there, {gib(avail)} available in memory"
        raise DataError(f"{what}: {size} would need {est.describe()}; {where}; reduce the features "
                        "(or models.hidden / channels, train.batch_size) or use a machine with more memory")
    return est


def gpu_free_memory(device: str) -> int | None:
    """Free bytes on the GPU training will use (`train.device`; auto: CUDA when present), None on the CPU."""
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        return None  # (a missing GPU for "cuda" is the trainer's error to report)
    return int(torch.cuda.mem_get_info()[0])


def check_dataset_fits(
    cfg: ExperimentConfig, *, data: Dataset | None = None, variants_at_once: int = 1
) -> MemoryEstimate | None:
    """`check_fits` for the config's data set: sized from its headers before it is read (`data` None; None when
    they cannot tell, e.g. a CSV file), else from the loaded data."""
    from .data import parse_dataset_spec, peek_dataset

    spec = cfg.data.dataset
    parsed = parse_dataset_spec(spec)
    what = str(parsed.path) if parsed.path is not None else spec
    if data is None:
        head = peek_dataset(spec)
        if head is None:
            return None
        n, shape, itemsize, labels = head.n, head.shape, head.itemsize, head.labels
    else:
        n, shape, itemsize, labels = len(data), data.shape, data.x.dtype.itemsize, data.labels is not None
    return check_fits(what, n, shape, cfg, variants_at_once=variants_at_once, itemsize=itemsize, labels=labels,
                      gpu_available=gpu_free_memory(cfg.train.device))


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None on a C library without it."""
    try:
        return ctypes.CDLL(None).malloc_trim  # the symbols this process has loaded: the C library's
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Return memory this process has freed to the system: Arrow's pool (where Parquet reads allocate) and
    the C heap (glibc `malloc_trim`). Without it, freed memory stays in the process and each step's peak
    adds to the next: the evaluation calls this after every task, where steps side by side would otherwise
    stack their high-water marks."""
    if (pa := sys.modules.get("pyarrow")) is not None:
        pa.default_memory_pool().release_unused()
    if (trim := _malloc_trim()) is not None:
        trim(0)
