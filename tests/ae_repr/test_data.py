"""The data layer: built-in data sets, IDX files, user files, their validation, splits and content hashes."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ae_repr.data import (
    DATASET_FORMS,
    Dataset,
    content_sha256,
    factor_values,
    generate_dsprites,
    load_dataset,
    parse_dataset_spec,
)
from ae_repr.data import dsprites as dsp
from ae_repr.data.idx import read_idx, write_idx
from ae_repr.errors import DataError, UserError


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


# ---------------------------------------------------------------------------------------------- digits


def test_digits_shape_dtype_labels(digits: Dataset) -> None:
    assert digits.x.shape == (1797, 1, 8, 8) and digits.x.dtype == np.uint8
    assert digits.x.min() == 0 and digits.x.max() == 16
    assert digits.is_image and digits.shape == (1, 8, 8)
    assert digits.labels is not None and digits.labels.dtype == np.int64
    assert set(np.unique(digits.labels)) == set(range(10))
    assert digits.sample_id.dtype == np.int64 and np.array_equal(digits.sample_id, np.arange(1797))
    assert digits.name == "digits" and digits.factors is None


def test_digits_split_is_stratified_25_percent(digits: Dataset) -> None:
    assert set(np.unique(digits.split)) == {"train", "test"}
    assert len(digits.test_idx) / len(digits) == pytest.approx(0.25, abs=0.005)
    for c in range(10):
        in_class = digits.labels == c
        frac = (digits.split[in_class] == "test").mean()
        assert frac == pytest.approx(0.25, abs=0.02), c


def test_digits_deterministic_and_seed_dependent(digits: Dataset) -> None:
    again = load_dataset("digits")
    assert np.array_equal(again.split, digits.split) and again.sha256 == digits.sha256
    other = load_dataset("digits", seed=1)
    assert not np.array_equal(other.split, digits.split) and other.sha256 != digits.sha256
    half = load_dataset("digits", test_fraction=0.5)
    assert len(half.test_idx) / len(half) == pytest.approx(0.5, abs=0.005)


# ---------------------------------------------------------------------------------------------- content hash


def test_sha256_ignores_layout_and_byte_order_but_sees_content(digits: Dataset) -> None:
    x, y, s = digits.x, digits.labels, digits.split
    base = content_sha256(x, y, s)
    assert base == digits.sha256 and len(base) == 64
    f = np.arange(12.0).reshape(3, 4)
    assert content_sha256(f, None, np.array(["train"] * 3)) == content_sha256(
        np.asfortranarray(f).astype(">f8"), None, np.array(["train"] * 3)
    )
    x2 = x.copy()
    x2[5, 0, 3, 3] ^= 1
    y2 = y.copy()
    y2[0] = (y2[0] + 1) % 10
    s2 = s.copy()
    s2[0] = "test" if s2[0] == "train" else "train"
    changed = {
        content_sha256(x2, y, s),
        content_sha256(x, y2, s),
        content_sha256(x, None, s),
        content_sha256(x, y, s2),
        content_sha256(x.reshape(len(x), 64), y, s),  # same bytes, other shape
        content_sha256(x.astype(np.int16), y, s),  # same values, other dtype
        content_sha256(x, y, s, np.arange(len(x)) + 100),  # custom sample ids
    }
    assert base not in changed and len(changed) == 7
    assert content_sha256(x, y, s, np.arange(len(x))) == base  # default ids add nothing


# ---------------------------------------------------------------------------------------------- dsprites


def test_dsprites_deterministic_by_seed_and_binary() -> None:
    x1, f1 = generate_dsprites(400, seed=3)
    x2, f2 = generate_dsprites(400, seed=3)
    x3, f3 = generate_dsprites(400, seed=4)
    assert x1.shape == (400, 1, 64, 64) and x1.dtype == np.uint8 and set(np.unique(x1)) == {0, 1}
    assert f1.shape == (400, 5) and f1.dtype == np.int64
    assert np.array_equal(x1, x2) and np.array_equal(f1, f2)
    assert not np.array_equal(f1, f3) and not np.array_equal(x1, x3)
    assert (x1.sum(axis=(1, 2, 3)) > 0).all()
    # every sprite fits inside the image: nothing touches the border
    assert x1[:, 0, [0, -1], :].sum() == 0 and x1[:, 0, :, [0, -1]].sum() == 0


def test_dsprites_factor_coverage_and_values() -> None:
    f = dsp.sample_factors(6000, seed=0)
    assert len(np.unique(f @ np.array([1, 3, 18, 720, 23040]))) == 6000  # distinct grid points
    for j, size in enumerate(dsp.FACTOR_SIZES):
        assert set(np.unique(f[:, j])) == set(range(size)), dsp.FACTOR_NAMES[j]
    v = factor_values(np.array([[2, 5, 10, 31, 0], [0, 0, 0, 0, 31]]))
    assert np.allclose(v, [[2, 1.0, np.pi / 2, 1.0, 0.0], [0, 0.5, 0.0, 0.0, 1.0]])
    assert dsp.FACTOR_SIZES == (3, 6, 40, 32, 32)
    assert dsp.ORIENTATIONS.max() < 2 * np.pi  # 40 distinct poses


def _grid(**fixed: int) -> tuple[np.ndarray, np.ndarray]:
    """Factors with one factor swept over all its values and the others fixed (defaults mid-grid)."""
    base = {"shape": 0, "scale": 3, "orientation": 0, "pos_x": 16, "pos_y": 16} | fixed
    (sweep,) = [k for k, v in base.items() if v is None]
    j = dsp.FACTOR_NAMES.index(sweep)
    f = np.array([[base[k] if k != sweep else 0 for k in dsp.FACTOR_NAMES]] * dsp.FACTOR_SIZES[j])
    f[:, j] = np.arange(dsp.FACTOR_SIZES[j])
    return f, dsp.render(f)[:, 0].astype(np.float64)


def test_dsprites_position_moves_the_centroid() -> None:
    cols, rows = np.arange(64.0), np.arange(64.0)
    for shape in range(3):
        _, img = _grid(shape=shape, pos_x=None)
        cx = (img.sum(axis=1) * cols).sum(axis=1) / img.sum(axis=(1, 2))
        assert (np.diff(cx) > 0.5).all(), shape  # ~1.2 pixels per step, left to right
        assert cx[-1] - cx[0] > 30
        _, img = _grid(shape=shape, pos_y=None)
        cy = (img.sum(axis=2) * rows).sum(axis=1) / img.sum(axis=(1, 2))
        assert (np.diff(cy) > 0.5).all(), shape


def test_dsprites_scale_changes_area_and_shapes_differ() -> None:
    for shape in range(3):
        _, img = _grid(shape=shape, scale=None)
        area = img.sum(axis=(1, 2))
        assert (np.diff(area) > 0).all()
        assert area[-1] / area[0] == pytest.approx(4.0, rel=0.2)  # area grows with scale squared
    f = np.array([[s, 5, 3, 16, 16] for s in range(3)])
    img = dsp.render(f)
    assert not np.array_equal(img[0], img[1]) and not np.array_equal(img[1], img[2])


def test_dsprites_orientation_rotates_every_shape() -> None:
    for shape in range(3):
        _, img = _grid(shape=shape, scale=5, orientation=None)
        distinct = {im.tobytes() for im in img}
        # squares repeat every quarter turn and ellipses every half turn; hearts never
        assert len(distinct) >= {0: 8, 1: 16, 2: 35}[shape], shape
        assert not np.array_equal(img[0], img[5])
        area = img.sum(axis=(1, 2))
        assert area.max() / area.min() < 1.1, shape  # a rotation, not a shear: the area stays
    _, img = _grid(shape=0, scale=5, orientation=None)
    assert np.abs(img[10] - img[0]).sum() <= 4  # a quarter turn maps the square onto itself
    assert np.abs(img[5] - img[0]).sum() > 20  # an eighth turn does not


def test_dsprites_window_matches_full_grid() -> None:
    f = dsp.sample_factors(1500, seed=7)
    assert np.array_equal(dsp.render(f), dsp.render(f, full_grid=True))


def test_dsprites_dataset() -> None:
    ds = load_dataset("dsprites:600")
    assert ds.x.shape == (600, 1, 64, 64) and ds.x.dtype == np.uint8
    assert ds.factor_names == ("shape", "scale", "orientation", "pos_x", "pos_y")
    assert ds.factors.shape == (600, 5) and np.array_equal(ds.labels, ds.factors[:, 0])
    assert len(ds.test_idx) == 150
    again = load_dataset("dsprites:600")
    assert again.sha256 == ds.sha256 and np.array_equal(again.split, ds.split)
    assert parse_dataset_spec("dsprites").n == 20_000


@pytest.mark.parametrize(
    "spec", ["dsprites:abc", "dsprites:0", "dsprites:-3", "dsprites:", "dsprites:10000000"]
)
def test_dsprites_bad_size(spec: str) -> None:
    with pytest.raises(DataError, match="dsprites:N"):
        load_dataset(spec)


@pytest.mark.parametrize("spec", ["cifar", "digits:5", "", "idx:"])
def test_unknown_spec_lists_accepted_forms(spec: str) -> None:
    with pytest.raises(DataError) as e:
        load_dataset(spec)
    assert issubclass(DataError, UserError)
    msg = str(e.value)
    assert "\n" not in msg
    if spec != "idx:":
        assert DATASET_FORMS in msg and repr(spec) in msg


# ---------------------------------------------------------------------------------------------- idx


def _write_mnist_like(d: Path, *, gz: bool, prefixes: tuple[str, ...] = ("train", "t10k"), seed: int = 0):
    rng = np.random.default_rng(seed)
    out = {}
    for i, p in enumerate(prefixes):
        n = 40 if i == 0 else 12
        x = rng.integers(0, 256, size=(n, 7, 5), dtype=np.uint8)
        y = rng.integers(0, 10, size=n).astype(np.uint8)
        ext = ".gz" if gz else ""
        write_idx(d / f"{p}-images-idx3-ubyte{ext}", x)
        write_idx(d / f"{p}-labels-idx1-ubyte{ext}", y)
        out[p] = (x, y)
    return out


@pytest.mark.parametrize("gz", [False, True])
def test_idx_train_test_pairs(tmp_path: Path, gz: bool) -> None:
    data = _write_mnist_like(tmp_path, gz=gz)
    (tmp_path / "README.txt").write_text("not data\n")
    ds = load_dataset(f"idx:{tmp_path}")
    (xtr, ytr), (xte, yte) = data["train"], data["t10k"]
    assert ds.x.shape == (52, 1, 7, 5) and ds.x.dtype == np.uint8
    assert np.array_equal(ds.x[:40, 0], xtr) and np.array_equal(ds.x[40:, 0], xte)
    assert np.array_equal(ds.labels, np.concatenate([ytr, yte]).astype(np.int64))
    assert list(ds.split) == ["train"] * 40 + ["test"] * 12  # the files' own split, not a made one


def test_idx_gzip_found_by_magic_not_name(tmp_path: Path) -> None:
    x = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a-images-idx3-ubyte", x, compress=True)  # gzipped, no .gz
    write_idx(tmp_path / "b-images-idx3-ubyte.gz", x, compress=False)  # plain, named .gz
    assert (tmp_path / "a-images-idx3-ubyte").read_bytes()[:2] == b"\x1f\x8b"
    assert np.array_equal(read_idx(tmp_path / "a-images-idx3-ubyte"), x)
    assert np.array_equal(read_idx(tmp_path / "b-images-idx3-ubyte.gz"), x)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip_dtypes(tmp_path: Path, dtype) -> None:
    a = (np.arange(24) - 5).astype(dtype).reshape(2, 3, 4)
    b = read_idx(write_idx(tmp_path / "a.idx", a))
    assert b.dtype == np.dtype(dtype) and np.array_equal(a, b)
    raw = (tmp_path / "a.idx").read_bytes()
    assert raw[:4] == bytes([0, 0, raw[2], 3]) and struct.unpack(">3I", raw[4:16]) == (2, 3, 4)


def test_idx_single_pair_gets_a_stratified_split(tmp_path: Path) -> None:
    data = _write_mnist_like(tmp_path, gz=True, prefixes=("emnist",))
    ds = load_dataset(f"idx:{tmp_path}")
    assert len(ds) == 40 and len(ds.test_idx) == pytest.approx(10, abs=3)
    assert np.array_equal(ds.x[:, 0], data["emnist"][0])


def test_idx_images_without_labels(tmp_path: Path) -> None:
    write_idx(tmp_path / "images-idx3-ubyte", np.zeros((8, 4, 4), np.uint8))
    ds = load_dataset(f"idx:{tmp_path}")
    assert ds.labels is None and len(ds.test_idx) == 2


def test_idx_bad_magic(tmp_path: Path) -> None:
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x12\x34\x56\x78" + bytes(100))
    with pytest.raises(
        DataError, match=r"train-images-idx3-ubyte: not an IDX file \(bad magic number 0x12345678\)"
    ):
        load_dataset(f"idx:{tmp_path}")


def test_idx_unsupported_type(tmp_path: Path) -> None:
    (tmp_path / "x-images-idx3-ubyte").write_bytes(
        bytes([0, 0, 0x07, 3]) + struct.pack(">3I", 1, 2, 2) + bytes(4)
    )
    with pytest.raises(DataError, match=r"x-images-idx3-ubyte: unsupported IDX data type 0x07"):
        load_dataset(f"idx:{tmp_path}")


@pytest.mark.parametrize("gz", [False, True])
def test_idx_truncated_body_names_byte_counts(tmp_path: Path, gz: bool) -> None:
    payload = bytes([0, 0, 8, 3]) + struct.pack(">3I", 10, 4, 4) + bytes(100)  # needs 160
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(gzip.compress(payload) if gz else payload)
    with pytest.raises(
        DataError, match=r"train-images-idx3-ubyte: IDX file truncated.*needs 160 data bytes, found 100"
    ):
        load_dataset(f"idx:{tmp_path}")


def test_idx_cut_gzip_stream(tmp_path: Path) -> None:
    p = tmp_path / "train-images-idx3-ubyte.gz"
    write_idx(p, np.random.default_rng(0).integers(0, 256, (50, 8, 8), dtype=np.uint8))
    p.write_bytes(p.read_bytes()[:-40])
    with pytest.raises(
        DataError, match=r"train-images-idx3-ubyte.gz: IDX file truncated \(gzip stream cut short\)"
    ):
        read_idx(p)


def test_idx_label_count_mismatch(tmp_path: Path) -> None:
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((8, 4, 4), np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(7, np.uint8))
    with pytest.raises(
        DataError, match=r"train-labels-idx1-ubyte: 7 labels but train-images-idx3-ubyte holds 8"
    ):
        load_dataset(f"idx:{tmp_path}")


def test_idx_folder_problems(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such directory"):
        load_dataset(f"idx:{tmp_path / 'nope'}")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="no IDX images file"):
        load_dataset(f"idx:{tmp_path}")
    with pytest.raises(DataError, match="not a directory"):
        load_dataset(f"idx:{tmp_path / 'notes.txt'}")


# ---------------------------------------------------------------------------------------------- user files


def _frame(n: int = 40, *, label: bool = True, split: bool = False, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(
        {"a": rng.normal(size=n), "b": rng.normal(size=n), "c": rng.integers(0, 5, n).astype(float)}
    )
    if label:
        df["label"] = np.arange(n) % 3
    if split:
        df["split"] = np.where(np.arange(n) % 4 == 0, "test", "train")
    return df


def _write_frame(df: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".parquet":
        df.to_parquet(path, index=False)
    elif path.suffix == ".csv":
        df.to_csv(path, index=False)
    elif path.suffix == ".npz":
        arrays = {"x": df[["a", "b", "c"]].to_numpy()}
        if "label" in df:
            arrays["y"] = np.array(df["label"].tolist())  # strings as a plain unicode array, not objects
        if "split" in df:
            arrays["split"] = df["split"].to_numpy(dtype=str)
        np.savez(path, **arrays)
    else:
        np.save(path, df[["a", "b", "c"]].to_numpy())
    return path


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".npz", ".npy"])
@pytest.mark.parametrize("label,split", [(True, True), (True, False), (False, True), (False, False)])
def test_tabular_round_trip(tmp_path: Path, suffix: str, label: bool, split: bool) -> None:
    if suffix == ".npy" and (label or split):
        label = split = False  # a .npy file holds features only
    df = _frame(label=label, split=split)
    path = _write_frame(df, tmp_path / f"data{suffix}")
    ds = load_dataset(str(path))
    assert ds.name == str(path) and not ds.is_image
    assert ds.x.shape == (40, 3) and ds.x.dtype == np.float64
    assert np.allclose(ds.x, df[["a", "b", "c"]].to_numpy(), rtol=0, atol=1e-12)
    assert np.array_equal(ds.sample_id, np.arange(40))
    if label:
        assert ds.labels.dtype == np.int64 and np.array_equal(ds.labels, df["label"].to_numpy())
    else:
        assert ds.labels is None
    if split:
        assert np.array_equal(ds.split, df["split"].to_numpy(dtype=str))
    else:
        assert len(ds.test_idx) == 10
        if label:  # stratified: a quarter of each class (of 14, 13 and 13 rows)
            per_class = [int((ds.split[ds.labels == c] == "test").sum()) for c in range(3)]
            assert per_class == [4, 3, 3]
    again = load_dataset(str(path))
    assert again.sha256 == ds.sha256 and np.array_equal(again.split, ds.split)


def test_same_content_same_sha_across_formats(tmp_path: Path) -> None:
    df = _frame(label=True, split=True)
    shas = {
        load_dataset(str(_write_frame(df, tmp_path / f"d{s}"))).sha256 for s in (".parquet", ".csv", ".npz")
    }
    assert len(shas) == 1


def test_tabular_sample_id_column(tmp_path: Path) -> None:
    df = _frame()
    df.insert(0, "sample_id", np.arange(40) * 7 + 1000)
    ds = load_dataset(str(_write_frame(df, tmp_path / "d.parquet")))
    assert ds.x.shape == (40, 3) and np.array_equal(ds.sample_id, df["sample_id"].to_numpy())
    df["sample_id"] = 5
    with pytest.raises(DataError, match=r"d.csv: column 'sample_id' is not unique"):
        load_dataset(str(_write_frame(df, tmp_path / "d.csv")))


def test_integer_and_bool_columns_are_features(tmp_path: Path) -> None:
    df = pd.DataFrame({"i": np.arange(12), "flag": np.arange(12) % 2 == 0, "label": np.arange(12) % 2})
    ds = load_dataset(str(_write_frame(df, tmp_path / "d.parquet")))
    assert ds.x.shape == (12, 2) and ds.x.dtype == np.int64


def test_split_values_case_and_space_insensitive(tmp_path: Path) -> None:
    df = _frame(split=True)
    df["split"] = df["split"].str.upper() + " "
    ds = load_dataset(str(_write_frame(df, tmp_path / "d.csv")))
    assert set(ds.split) == {"train", "test"} and len(ds.test_idx) == 10


def test_float_labels_that_are_whole_numbers(tmp_path: Path) -> None:
    df = _frame()
    df["label"] = df["label"].astype(float)
    ds = load_dataset(str(_write_frame(df, tmp_path / "d.csv")))
    assert ds.labels.dtype == np.int64 and ds.labels.max() == 2


def test_npy_images(tmp_path: Path) -> None:
    a = np.random.default_rng(0).integers(0, 255, (20, 6, 5), dtype=np.uint8)
    np.save(tmp_path / "im.npy", a)
    ds = load_dataset(str(tmp_path / "im.npy"))
    assert ds.x.shape == (20, 1, 6, 5) and ds.is_image and ds.x.dtype == np.uint8
    np.save(tmp_path / "rgb.npy", np.zeros((8, 10, 12, 3), np.float32))  # channels last
    assert load_dataset(str(tmp_path / "rgb.npy")).x.shape == (8, 3, 10, 12)
    np.save(tmp_path / "nchw.npy", np.zeros((8, 2, 10, 12), np.float32))
    assert load_dataset(str(tmp_path / "nchw.npy")).x.shape == (8, 2, 10, 12)


def test_npz_alternative_keys(tmp_path: Path) -> None:
    x = np.arange(30, dtype=np.float32).reshape(10, 3)
    np.savez_compressed(tmp_path / "d.npz", X=x, labels=np.arange(10) % 2, other=np.zeros(3))
    ds = load_dataset(str(tmp_path / "d.npz"))
    assert (
        ds.x.dtype == np.float32 and np.array_equal(ds.x, x) and np.array_equal(ds.labels, np.arange(10) % 2)
    )


# ---------------------------------------------------------------------------------------------- bad user files


def _expect(path: Path, *fragments: str) -> str:
    with pytest.raises(DataError) as e:
        load_dataset(str(path))
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    for frag in fragments:
        assert frag in msg, msg
    return msg


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".npy", ".npz"])
def test_missing_file(tmp_path: Path, suffix: str) -> None:
    _expect(tmp_path / f"nope{suffix}", "no such file")


def test_unsupported_existing_file(tmp_path: Path) -> None:
    (tmp_path / "data.txt").write_text("1,2\n")
    _expect(tmp_path / "data.txt", "unsupported data file type", ".parquet")


def test_corrupt_files(tmp_path: Path) -> None:
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    _expect(tmp_path / "bad.parquet", "cannot read Parquet file")
    good = _write_frame(_frame(), tmp_path / "cut.parquet")
    good.write_bytes(good.read_bytes()[:-30])
    _expect(good, "cannot read Parquet file")
    (tmp_path / "bin.csv").write_bytes(b"a,b\n\xff\xfe\x00\x81,1\n")
    _expect(tmp_path / "bin.csv", "cannot read CSV file")
    (tmp_path / "empty.csv").write_text("")
    _expect(tmp_path / "empty.csv", "empty CSV file")
    (tmp_path / "text.npy").write_text("1 2 3\n")
    _expect(tmp_path / "text.npy", "not a .npy file")
    (tmp_path / "text.npz").write_text("1 2 3\n")
    _expect(tmp_path / "text.npz", "not a .npz (zip) file")
    np.save(tmp_path / "cut.npy", np.zeros((100, 10)))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "cut.npy").read_bytes()[:500])
    _expect(tmp_path / "cut.npy", "cannot read NumPy file")


def test_no_feature_columns(tmp_path: Path) -> None:
    df = pd.DataFrame({"label": [0, 1, 0, 1], "split": ["train", "train", "test", "train"]})
    _expect(_write_frame(df, tmp_path / "d.parquet"), "no feature columns", "label, split")


def test_non_numeric_feature_column(tmp_path: Path) -> None:
    df = _frame()
    df["colour"] = "red"
    _expect(_write_frame(df, tmp_path / "d.csv"), "column 'colour' is not numeric")


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_in_column(tmp_path: Path, suffix: str, bad: float) -> None:
    df = _frame()
    df.loc[7, "b"] = bad
    _expect(_write_frame(df, tmp_path / f"d{suffix}"), "column 'b'", "row 7")


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_nan_in_array(tmp_path: Path, suffix: str) -> None:
    df = _frame()
    df.loc[3, "c"] = np.nan
    _expect(_write_frame(df, tmp_path / f"d{suffix}"), "NaN/Inf", "row 3, column 2")


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".npz"])
def test_non_integer_labels(tmp_path: Path, suffix: str) -> None:
    df = _frame(n=20)
    df["label"] = [0.5, 1.0] * 10
    what = "array 'y'" if suffix == ".npz" else "column 'label'"
    _expect(_write_frame(df, tmp_path / f"d{suffix}"), f"{what} must hold integer class labels", "found 0.5 at row 0")


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".npz"])
def test_class_names_become_codes_in_name_order(tmp_path: Path, suffix: str) -> None:
    df = _frame(n=30)
    df["label"] = np.array(["dog", "cat", "emu"])[np.arange(30) % 3]
    ds = load_dataset(str(_write_frame(df, tmp_path / f"d{suffix}")))
    assert ds.label_names == ("cat", "dog", "emu") and ds.labels.dtype == np.int64
    assert [ds.label_names[c] for c in ds.labels] == df["label"].tolist()
    renamed = df.assign(label=df["label"].str.upper())  # same codes, other names: other data
    assert load_dataset(str(_write_frame(renamed, tmp_path / f"e{suffix}"))).sha256 != ds.sha256


def test_labels_with_gaps_and_negatives_are_kept(tmp_path: Path) -> None:
    df = _frame(n=30)
    df["label"] = np.array([-7, 0, 40])[np.arange(30) % 3]
    ds = load_dataset(str(_write_frame(df, tmp_path / "d.parquet")))
    assert ds.label_names is None and np.array_equal(ds.labels, df["label"].to_numpy())
    assert sorted(int((ds.split[ds.labels == c] == "test").sum()) for c in (-7, 0, 40)) == [2, 2, 2]


def test_missing_labels(tmp_path: Path) -> None:
    df = _frame()
    df["label"] = df["label"].astype(float)
    df.loc[4, "label"] = np.nan
    _expect(_write_frame(df, tmp_path / "d.parquet"), "column 'label' has missing values", "row 4")


@pytest.mark.parametrize("suffix", [".csv", ".npz"])
def test_bad_split_values(tmp_path: Path, suffix: str) -> None:
    df = _frame(split=True)
    df.loc[5, "split"] = "validation"
    _expect(_write_frame(df, tmp_path / f"d{suffix}"), "'validation' at row 5", "expected 'train' or 'test'")
    df["split"] = "train"
    _expect(_write_frame(df, tmp_path / f"e{suffix}"), "no 'test' rows")


@pytest.mark.parametrize("suffix", [".csv", ".npy"])
def test_too_few_rows_to_split(tmp_path: Path, suffix: str) -> None:
    _expect(_write_frame(_frame(n=2, label=False), tmp_path / f"d{suffix}"), "too few rows to split")


def test_pickled_npy_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    _expect(tmp_path / "obj.npy", "contains Python objects; refusing to unpickle")


def test_pickled_npz_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "obj.npz", x=np.zeros((5, 2)), y=np.array(["a", 1, None], dtype=object))
    _expect(tmp_path / "obj.npz", "contains Python objects; refusing to unpickle")


def test_npz_problems(tmp_path: Path) -> None:
    np.savez(tmp_path / "nox.npz", features_v2=np.zeros((5, 2)))
    _expect(tmp_path / "nox.npz", "no features array", "found: features_v2")
    np.savez(tmp_path / "len.npz", x=np.zeros((10, 2)), y=np.zeros(9, dtype=int))
    _expect(tmp_path / "len.npz", "array 'y' has shape (9,)")
    np.save(tmp_path / "vec.npy", np.zeros(10))
    _expect(tmp_path / "vec.npy", "has shape (10,)")
    np.save(tmp_path / "cplx.npy", np.zeros((10, 2), complex))
    _expect(tmp_path / "cplx.npy", "features must be numeric")


def test_feature_files_keep_the_class_names(tmp_path: Path) -> None:
    """Named classes reach the feature file: `label` holds the codes, the metadata the names behind them."""
    from ae_repr.config import ExperimentConfig
    from ae_repr.features import extract_features
    from ae_repr.io import read_features
    from ae_repr.train import train_variant

    df = _frame(n=60)
    df["label"] = np.array(["setosa", "virginica"])[np.arange(60) % 2]
    ds = load_dataset(str(_write_frame(df, tmp_path / "d.parquet")))
    cfg = ExperimentConfig.model_validate({"models": {"variants": ["ae"], "latent_dim": 2,
                                                      "overrides": {"ae": {"hidden": [8]}}},
                                           "train": {"epochs": 1, "device": "cpu"}})
    model = train_variant("ae", ds, cfg, tmp_path / "ae", progress=False).model_dir
    ff = read_features(extract_features(model, ds, tmp_path / "ae.parquet"))
    frame, meta = ff.frame, ff.meta
    assert json.loads(meta["label_names"]) == ["setosa", "virginica"]
    assert frame["label"].tolist() == ds.labels.tolist() and set(frame["label"]) == {0, 1}
