"""Figures a reader understands: seamless labelled image grids, named map methods with a class legend, one
scale where panels are compared. Figures are caught before saving, so their axes can be read."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from eval_synth import Synth, write_ff
from matplotlib.figure import Figure

from ae_repr.config import EvalConfig
from evaluation import app_plots, plots, variant_plots
from evaluation.inputs import load_feature_file
from evaluation.variant_plots import GAP_RGB, HIDDEN_RGB, tile


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> list[Figure]:
    """Every Figure the plotting modules would save, in order (nothing is written)."""
    caught: list[Figure] = []

    def catch(fig: Figure, path: object, dpi: int = 80) -> Path:
        caught.append(fig)
        fig.canvas.draw()  # lay out as saving would: titles move above top tick labels
        return Path(str(path))

    for module in (plots, variant_plots, app_plots):
        monkeypatch.setattr(module, "save_figure", catch)
    return caught


def _labels(ticks: list) -> list[str]:
    return [t.get_text() for t in ticks]


def test_tile_has_uniform_slate_seams_and_no_white_separators():
    """Tiles keep their pixels (mapped to [0, 1]); every seam pixel and a short row's missing cell is GAP_RGB."""
    white, black = np.ones((3, 4, 5)), np.zeros((2, 4, 5))  # (n, H, W)
    out = tile([white, black], lo=0.0, hi=1.0)
    assert out.shape == (2 * 5 - 1, 3 * 6 - 1, 3)
    seams = np.zeros(out.shape[:2], dtype=bool)
    seams[4, :] = True
    seams[:, [5, 11]] = True
    seams[5:, 12:] = True  # the black row has two images: its third cell is empty
    assert np.all(out[seams] == np.asarray(GAP_RGB, dtype=np.float32))
    assert not np.any(np.all(out[seams] == 1.0, axis=-1))  # no white separator pixel
    assert np.all(out[:4, :5] == 1.0) and np.all(out[5:, :5] == 0.0)
    assert np.isfinite(out).all()


def test_tile_marks_hidden_pixels_and_maps_the_shared_range():
    img = np.array([[[0.0, np.nan], [2.0, 4.0]]])  # (1, 2, 2)
    out = tile([img], lo=0.0, hi=2.0)
    assert np.allclose(out[0, 1], HIDDEN_RGB)
    assert np.allclose(out[0, 0], 0.0) and np.allclose(out[1, 0], 1.0)
    assert np.allclose(out[1, 1], 1.0)  # above the range: clipped


def _pictures(rng: np.random.Generator, names=("ae", "vae"), n=6, steps=7) -> dict[str, np.ndarray]:
    img = lambda *shape: rng.random((*shape, 1, 8, 8)).astype(np.float32)  # noqa: E731
    pics = {"inputs/inpaint_original": img(n), "inputs/inpaint_mask_block": np.ones((n, 1, 8, 8), np.float32)}
    pics["inputs/inpaint_mask_block"][:, :, 4:, 4:] = 0.0
    pics["inputs/inpaint_mask_random"] = (rng.random((n, 1, 8, 8)) > 0.5).astype(np.float32)
    for name in names:
        pics[f"{name}/interpolations"] = img(4, 8)
        pics[f"{name}/traversals"] = img(3, steps)
        pics[f"{name}/traversal_dims"] = np.array([5, 0, 2])
        pics[f"{name}/inpaint_fill_block"] = img(n)
        pics[f"{name}/inpaint_fill_random"] = img(n)
    return pics


def test_interpolation_grid_names_its_ends_and_rows(figures, tmp_path):
    app_plots.plot_interpolations(_pictures(np.random.default_rng(0)), tmp_path / "i.png")
    (ax,) = figures[0].axes
    assert len(ax.images) == 1  # one tiled array: no per-image axes with white gaps between them
    cols = _labels(ax.get_xticklabels())
    assert len(cols) == 8 and cols[0] == "start (t=0)" and cols[-1] == "end (t=1)" and cols[1] == "t=0.14"
    assert _labels(ax.get_yticklabels()) == ["ae pair 1", "ae pair 2", "vae pair 1", "vae pair 2"]
    assert ax.get_xlabel()


def test_traversal_columns_are_the_offsets_drawn(figures, tmp_path):
    """Column labels are generation's traversal offsets (-span..span), rows the dimensions moved."""
    from evaluation.generation import traversals

    made = app_plots.plot_traversals(_pictures(np.random.default_rng(0), names=("vae",)), tmp_path)
    assert [p.name for p in made] == ["traversals_vae.png"]
    (ax,) = figures[0].axes
    span = inspect.signature(traversals).parameters["span"].default
    cols = [float(c) for c in _labels(ax.get_xticklabels())]
    assert np.allclose(cols, np.linspace(-span, span, 7), atol=0.01)
    assert _labels(ax.get_yticklabels()) == ["z_005", "z_000", "z_002"]
    assert "offset" in ax.get_xlabel()


def test_inpainting_rows_are_examples_and_columns_original_masked_fills(figures, tmp_path):
    pics = _pictures(np.random.default_rng(0))
    app_plots.plot_inpainting(pics, tmp_path / "inp.png")
    axes = figures[0].axes
    assert [ax.get_title() for ax in axes] == ["block mask (hidden pixels orange)", "random mask (hidden pixels orange)"]
    for ax in axes:
        assert _labels(ax.get_xticklabels()) == ["original", "masked", "ae", "vae"]
        assert _labels(ax.get_yticklabels()) == [f"example {i + 1}" for i in range(6)]
    arr = np.asarray(axes[0].images[0].get_array())
    assert arr.shape == (6 * 9 - 1, 4 * 9 - 1, 3)  # (examples, columns) tiles of 8 x 8
    masked = arr[:8, 9:17]  # example 1, column "masked": the hidden block is marked, the rest is the original
    assert np.allclose(masked[4:, 4:], HIDDEN_RGB)
    lo, hi = pics["inputs/inpaint_original"].min(), pics["inputs/inpaint_original"].max()
    assert np.allclose(masked[:4, :4, 0], (pics["inputs/inpaint_original"][0, 0, :4, :4] - lo) / (hi - lo), atol=1e-6)


def test_kl_panels_share_one_scale(figures, tmp_path):
    pics = {"vae/kl_per_dim": np.array([3.0, 0.1, 0.0]), "beta_vae/kl_per_dim": np.array([0.3, 0.2, 0.1])}
    app_plots.plot_kl_per_dim(pics, tmp_path / "kl.png")
    limits = {ax.get_ylim() for ax in figures[0].axes}
    assert len(limits) == 1 and limits.pop()[1] >= 3.0


def test_dci_panels_share_one_colour_scale(figures, tmp_path):
    pics = {"vae/dci_importance": np.array([[0.9, 0.1], [0.0, 0.5]]), "ae/dci_importance": np.full((2, 2), 0.2),
            "inputs/factor_names": np.array(["shape", "scale"])}
    app_plots.plot_dci_importance(pics, tmp_path / "dci.png")
    clims = {ax.images[0].get_clim() for ax in figures[0].axes if ax.images}
    assert clims == {(0.0, 0.9)}
    assert _labels(figures[0].axes[0].get_xticklabels()) == ["shape", "scale"]


def test_dci_panels_without_factor_names_number_the_factors(figures, tmp_path):
    app_plots.plot_dci_importance({"vae/dci_importance": np.eye(3)}, tmp_path / "dci.png")
    assert _labels(figures[0].axes[0].get_xticklabels()) == ["0", "1", "2"]


def _map(labels: list[int], method: str | None = "tsne") -> pd.DataFrame:
    m = pd.DataFrame({"sample_id": range(len(labels)), "label": pd.array(labels, dtype="Int64"),
                      "x": np.arange(len(labels), dtype=np.float32), "y": np.zeros(len(labels), np.float32)})
    return m if method is None else m.assign(method=method)


def test_latent_maps_name_the_method_and_have_one_legend_entry_per_class(figures, tmp_path):
    """Class 2 is missing from one panel: the legend still lists every class, and a class keeps its colour."""
    plots.plot_latent_maps({"ae": _map([0, 1, 2, 0]), "vae": _map([1, 0, 0])}, tmp_path / "maps.png")
    fig = figures[0]
    assert "t-SNE" in fig.get_suptitle()
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["0", "1", "2"]
    ae, vae = (ax.collections[0].get_facecolors() for ax in fig.axes)
    assert np.allclose(ae[0], vae[1]) and np.allclose(ae[1], vae[0])  # class 0 and class 1 alike in both


def test_latent_maps_from_files_without_a_method_say_so(figures, tmp_path):
    plots.plot_latent_maps({"ae": _map([0, 1], method=None)}, tmp_path / "maps.png")
    assert "method not recorded" in figures[0].get_suptitle()


def test_embed_2d_records_the_method_it_used(synth: Synth, tmp_path):
    z = np.random.default_rng(0).normal(size=(len(synth.y), 4)).astype(np.float32)
    ff = load_feature_file(write_ff(tmp_path / "f.parquet", synth, z))
    coords = plots.embed_2d(ff, EvalConfig(map_max_rows=40, map_iters=250))
    assert coords is not None and set(coords["method"]) == {"tsne"}


def test_variant_latent_map_names_pca_and_its_classes(figures, tmp_path):
    z = np.random.default_rng(0).normal(size=(30, 5))
    variant_plots.plot_latent_map(z, np.repeat([3, 7, 9], 10), tmp_path / "m.png", title="ae: latent map")
    fig = figures[0]
    assert fig.axes[0].get_title() == "ae: latent map (PCA)"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["3", "7", "9"]


def test_tabular_rows_draw_as_labelled_strips(figures, tmp_path):
    """A flat row is a 1 x D strip; the grid still tiles, labels and seams them."""
    x = np.random.default_rng(0).normal(size=(4, 16))
    variant_plots.image_grid([("input", variant_plots.as_images(x))], tmp_path / "g.png", "t",
                             columns=variant_plots.numbered(4))
    (ax,) = figures[0].axes
    assert np.asarray(ax.images[0].get_array()).shape == (1, 4 * 17 - 1, 3)
    assert _labels(ax.get_xticklabels()) == ["#1", "#2", "#3", "#4"]


def test_seams_grow_with_the_images_but_not_for_strips():
    """A 1-pixel seam vanishes when 64 x 64 tiles are drawn at digit size; a strip's seam stays one pixel."""
    assert variant_plots.seam(8, 8) == 1 and variant_plots.seam(64, 64) == 4 and variant_plots.seam(1, 64) == 1


def _rd_results(points: dict[str, tuple[float, float]]) -> pd.DataFrame:
    """Rate-distortion rows: {representation: (rate, distortion)}."""
    from evaluation.results import result_frame, result_row

    return result_frame([result_row(name, "rate_distortion", metric, value)
                         for name, (rate, dist) in points.items()
                         for metric, value in (("rate", rate), ("distortion", dist), ("active_units", 4.0))])


# the demo run's numbers, but beta 0.5 at a lower rate than vae (a sweep model gets half the steps): ordered by
# rate, the curve would visit vae before beta 0.5
RD = {"beta_vae@beta=0.5": (16.0, 68.4), "vae": (17.1, 68.4), "beta_vae": (11.7, 73.4),
      "beta_vae@beta=3": (3.8, 91.2), "beta_vae@beta=6": (1.7, 100.6), "hier_vae": (12.5, 74.3)}


def test_rate_distortion_curve_runs_through_the_vae_family_in_beta_order(figures, tmp_path):
    """vae (beta 1) and beta_vae (its configured beta) are the sweep's model: one curve through all five points,
    ordered by beta and labelled with it; hier_vae is a marker of its own; the legend covers no point or label."""
    betas = {"vae": 1.0, "beta_vae": 1.5, "hier_vae": 1.0}  # hier_vae has a beta too, but is another model
    app_plots.plot_rate_distortion(_rd_results(RD), tmp_path / "rd.png", betas)
    (ax,) = figures[0].axes
    curves = [line for line in ax.get_lines() if len(line.get_xdata()) > 1 and line.get_linestyle() != "None"]
    assert len(curves) == 1
    order = ["beta_vae@beta=0.5", "vae", "beta_vae", "beta_vae@beta=3", "beta_vae@beta=6"]
    np.testing.assert_allclose(curves[0].get_xydata(), [RD[n] for n in order])
    assert [t.get_text() for t in ax.texts] == ["β=0.5", "β=1 vae", "β=1.5 beta_vae", "β=3", "β=6"]
    (hier,) = [line for line in ax.get_lines() if line.get_label() == "hier_vae"]
    np.testing.assert_allclose(hier.get_xydata(), [RD["hier_vae"]])
    assert "nats" in ax.get_xlabel() and "nats" in ax.get_ylabel() and ax.get_xlim()[0] <= 0.0
    legend = ax.get_legend().get_window_extent()
    points = ax.transData.transform([RD[n] for n in RD])
    assert not any(legend.contains(x, y) for x, y in points)
    assert not any(legend.overlaps(t.get_window_extent()) for t in ax.texts)


def test_rate_distortion_family_member_of_unknown_beta_is_not_on_the_curve():
    """Without its beta, beta_vae has no place on the curve: it is drawn apart, not guessed."""
    curve, others = app_plots.rate_distortion_points(_rd_results(RD), {"vae": 1.0})
    assert list(curve.index) == ["beta_vae@beta=0.5", "vae", "beta_vae@beta=3", "beta_vae@beta=6"]
    assert list(curve["beta"]) == [0.5, 1.0, 3.0, 6.0]
    assert sorted(others.index) == ["beta_vae", "hier_vae"]


def test_model_betas_are_read_from_each_models_own_config(synth: Synth, tmp_path):
    """The beta a variant was trained with (its model's config.json), keyed by variant; a seed grid's member
    speaks for its variant; models without a beta and files without a model give none."""
    from ae_repr.io import write_json
    from evaluation.pipeline import model_betas

    features = tmp_path / "features"
    z = np.zeros((len(synth.y), 2), np.float32)
    for name, variant, cfg in (("beta_vae", "beta_vae", {"beta": 1.5}), ("vae@seed=0", "vae", {"beta": 1.0}),
                               ("ae", "ae", {"latent_dim": 2})):
        write_json(tmp_path / "models" / name / "config.json", {"variant": variant, "model_config": cfg})
        write_ff(features / f"{name}.parquet", synth, z, variant=variant, model_dir=f"../models/{name}")
    write_ff(features / "pca.parquet", synth, z)
    names = ["beta_vae", "vae@seed=0", "ae", "pca", "missing"]
    assert model_betas(features, names) == {"beta_vae": 1.5, "vae": 1.0}
