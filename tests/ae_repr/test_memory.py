"""The run's memory estimate against the real tensors it sizes, the memory available, and the refusal up front."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from traced import traced_peak

from ae_repr import memory
from ae_repr.checkpoint import load_model
from ae_repr.cli import main
from ae_repr.config import ExperimentConfig, validate_config
from ae_repr.data import Normalizer, peek_dataset
from ae_repr.errors import DataError
from ae_repr.memory import (
    FLOAT32,
    MODEL_COPIES,
    activation_bytes,
    available_memory,
    check_dataset_fits,
    check_fits,
    count_parameters,
    estimate_memory,
)
from ae_repr.models import build_model
from ae_repr.variants import variant_names


def _cfg(variants: list[str], hidden: list[int] = (32,), **train: object) -> ExperimentConfig:
    return validate_config({
        "models": {"variants": variants, "latent_dim": 4, "overrides": {v: {"hidden": list(hidden)} for v in variants}},
        "train": {"batch_size": 16, **train},
        "eval": {"baselines": ["pca"], "fewshot_finetune": False},
    })


@pytest.mark.parametrize("variant", variant_names())
@pytest.mark.parametrize("shape", [(37,), (1, 12, 10)])
def test_parameter_count_is_exact(variant: str, shape: tuple[int, ...]) -> None:
    """Counted on the meta device, the count is the real model's, for every registered variant and backbone."""
    mc = ExperimentConfig().models.model_config_for(variant)
    for likelihood in ("bernoulli", "gaussian", "discretized_logistic:17"):
        real = build_model(variant, mc, shape, likelihood, seed=0)
        assert count_parameters(variant, mc, shape, likelihood) == sum(p.numel() for p in real.parameters())


def test_model_and_data_terms_are_the_real_tensors_bytes() -> None:
    """model = weights + gradients + Adam's two moments + the best epoch's copy; data = raw + normalized copy."""
    n, d = 50, 30
    cfg = _cfg(["vae"], hidden=[24, 12])
    mc = cfg.models.model_config_for("vae")
    model = build_model("vae", mc, (d,), "discretized_logistic:256", seed=0)  # "auto" is sized as the costliest
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.loss(torch.rand(8, d))["loss"].backward()
    opt.step()
    weights = sum(p.nbytes for p in model.parameters())
    grads = sum(p.grad.nbytes for p in model.parameters())
    moments = sum(t.nbytes for s in opt.state.values() for k, t in s.items() if k != "step")
    best = sum(t.nbytes for t in model.state_dict().values())  # the trainer's copy of the best weights
    est = estimate_memory(n, (d,), cfg, variants_at_once=1, itemsize=8, labels=True)
    assert est.model == weights + grads + moments + best == MODEL_COPIES * FLOAT32 * sum(p.numel() for p in model.parameters())

    x = np.random.default_rng(0).normal(size=(n, d))  # float64, as a table loads
    normalized = Normalizer.fit(x).numpy(x)
    assert est.data == x.nbytes + normalized.nbytes
    # two models side by side hold twice the model
    assert estimate_memory(n, (d,), _cfg(["vae", "beta_vae"], hidden=[24, 12]), variants_at_once=2).model == 2 * est.model


def _saved_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct tensors a loss keeps for its backward pass (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.loss(x, generator=torch.Generator().manual_seed(0))
    return sum(seen.values())


@pytest.mark.parametrize("variant", ["ae", "vae", "hier_vae"])
@pytest.mark.parametrize("shape", [(300,), (1, 16, 16)])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "discretized_logistic"])
def test_activation_estimate_bounds_the_saved_tensors(variant: str, shape: tuple[int, ...], likelihood: str) -> None:
    """The per-batch activation estimate is at least what autograd keeps, and not more than twice it."""
    batch = 16
    mc = ExperimentConfig().models.model_config_for(variant)
    spec = "discretized_logistic:17" if likelihood == "discretized_logistic" else likelihood
    model = build_model(variant, mc, shape, spec, seed=0)
    x = torch.rand(batch, *shape)
    if likelihood == "bernoulli":
        x = (x > 0.5).float()
    measured = _saved_bytes(model, x)
    est = activation_bytes(shape, mc, likelihood, batch)
    assert measured <= est <= 2 * measured, (measured, est, est / measured)


def test_available_memory_takes_the_cgroup_limit_less_its_usage(monkeypatch: pytest.MonkeyPatch) -> None:
    gib = memory.GIB
    files = {"/sys/fs/cgroup/memory.max": 4 * gib, "/sys/fs/cgroup/memory.current": 3 * gib}
    monkeypatch.setattr(memory, "_meminfo_available", lambda: 20 * gib)
    monkeypatch.setattr(memory, "_read_int", files.get)
    assert available_memory() == 1 * gib
    files["/sys/fs/cgroup/memory.max"] = None  # "max": no limit
    assert available_memory() == 20 * gib
    files.clear()
    files["/sys/fs/cgroup/memory/memory.limit_in_bytes"] = 9223372036854771712  # cgroup v1's "no limit"
    assert available_memory() == 20 * gib
    files["/sys/fs/cgroup/memory/memory.limit_in_bytes"] = 2 * gib  # v1 with a limit
    files["/sys/fs/cgroup/memory/memory.usage_in_bytes"] = gib // 2
    assert available_memory() == gib + gib // 2


def test_a_run_that_cannot_fit_is_refused_in_one_line() -> None:
    cfg = _cfg(["ae"])
    est = check_fits("data.npy", 200, (5000,), cfg, available=10 * memory.GIB)
    with pytest.raises(DataError) as e:
        check_fits("data.npy", 200, (5000,), cfg, available=est.total - 1)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("data.npy: 200 x 5000 features would need about")
    assert "model" in msg and "data" in msg and "GiB available" in msg and "more memory" in msg


def _wide_npy(path: Path, rows: int, cols: int) -> Path:
    """A valid float32 .npy of rows x cols, written sparse: its data costs no disk and is never read here."""
    np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, cols)).flush()
    return path


def test_the_size_comes_from_the_header_without_reading_the_data(tmp_path: Path, monkeypatch) -> None:
    path = _wide_npy(tmp_path / "wide.npy", 40, 1_000_000)  # 160 MB of zeros, none of it on disk
    head = peek_dataset(str(path))
    assert (head.n, head.shape, head.itemsize, head.labels) == (40, (1_000_000,), 4, False)

    def no_load(*a: object, **k: object) -> None:
        raise AssertionError("the data was read before the memory check")

    monkeypatch.setattr(np, "load", no_load)
    # a hidden layer of 10^5 units on 10^6 inputs: ~3e11 parameters, more than any machine holds
    cfg = validate_config({"data": {"dataset": str(path)},
                           "models": {"variants": ["ae"], "overrides": {"ae": {"hidden": [100_000]}}}})
    with pytest.raises(DataError, match=r"wide\.npy: 40 x 1000000 features would need about .* GiB available"):
        check_dataset_fits(cfg)


def test_a_moderately_wide_table_trains(tmp_path: Path) -> None:
    """120 rows x 5,000 columns: within memory, `train` runs an epoch and writes the model."""
    x = np.random.default_rng(0).normal(size=(120, 5000)).astype(np.float32)
    np.save(tmp_path / "wide.npy", x)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("models: {latent_dim: 4, overrides: {ae: {hidden: [16]}}}\ntrain: {epochs: 1, batch_size: 64}\n")
    out = tmp_path / "out"
    code = main(["train", "--variant", "ae", "--config", str(cfg), "--dataset", str(tmp_path / "wide.npy"),
                 "--out", str(out)])
    assert code == 0
    assert load_model(out / "models" / "ae").model.input_shape == (5000,)


def test_on_a_gpu_the_models_are_compared_with_its_free_memory() -> None:
    """Training on a GPU: models and activations must fit its free memory, the data and evaluation the host's."""
    cfg = _cfg(["ae"])
    est = estimate_memory(200, (5000,), cfg)
    on_gpu, on_host = est.model + est.activations, est.data + est.evaluation
    check_fits("data.npy", 200, (5000,), cfg, available=on_host, gpu_available=on_gpu)  # each just fits
    with pytest.raises(DataError, match="on the GPU, .* free there"):
        check_fits("data.npy", 200, (5000,), cfg, available=10 * est.total, gpu_available=on_gpu - 1)
    with pytest.raises(DataError, match="GiB available in memory"):
        check_fits("data.npy", 200, (5000,), cfg, available=on_host - 1, gpu_available=10 * est.total)


@pytest.mark.parametrize("kind", ["images", "table"])
def test_normalizing_holds_one_float32_copy_and_no_temporaries(kind: str) -> None:
    """`Normalizer.numpy` allocates its float32 result once and normalizes in it (a 20,000-image dSprites set
    is 0.33 GB as float32; each temporary of that size was another 0.33 GB at the task's peak)."""
    rng = np.random.default_rng(0)
    x = (rng.integers(0, 256, size=(500, 1, 32, 32), dtype=np.uint8) if kind == "images"
         else rng.normal(size=(2000, 256)))
    norm = Normalizer.fit(x)
    expected = (x.astype(np.float64) - norm.shift) * norm.scale  # the same map, computed independently
    out, peak = traced_peak(lambda: norm.numpy(x))
    assert out.dtype == np.float32 and out.shape == x.shape
    assert peak < 1.1 * out.nbytes
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_release_free_memory_returns_the_heap_holes_to_the_system() -> None:
    """Arrays below malloc's mmap threshold live on the C heap; freed between arrays still alive, their pages stay
    in the process until `release_free_memory` hands them back."""
    arrays = [np.ones(12_000) for _ in range(3000)]  # 96 KB each, so on the heap: 288 MB in all
    arrays = arrays[::10]  # nine in ten freed, in holes between the ones still alive
    freed = 2700 * arrays[0].nbytes
    before = _rss()
    memory.release_free_memory()
    after = _rss()
    assert before - after > freed / 2, (before, after, freed)
