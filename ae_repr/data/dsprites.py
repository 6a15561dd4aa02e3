"""Procedural dSprites: 64x64 binary sprites (square, ellipse, heart) sampled from a five-factor grid.

After Matthey et al., "dSprites: Disentanglement testing Sprites dataset" (2017). The images are drawn
here, not downloaded: each sprite is an implicit inside-test evaluated at pixel centres after the
pixel coordinates are moved into the sprite's frame (translate, inverse-rotate, divide by scale).
Only a small window around each sprite is evaluated, in chunks, so 100,000 images cost about
410 MB (uint8) plus a few MB of work space.

Factors are kept as integer grid indices, shape (N, 5) int64, columns in `FACTOR_NAMES` order;
`factor_values` turns them into the physical values (shape index, scale, radians, position in [0, 1]).
"""

from __future__ import annotations

import math

import numpy as np

IMAGE_SIZE = 64
SHAPES = ("square", "ellipse", "heart")
FACTOR_NAMES = ("shape", "scale", "orientation", "pos_x", "pos_y")
SCALES = np.linspace(0.5, 1.0, 6)
# 40 distinct poses in [0, 2*pi): unlike the original release, 2*pi is not repeated as a copy of 0
ORIENTATIONS = np.linspace(0.0, 2.0 * math.pi, 40, endpoint=False)
POSITIONS = np.linspace(0.0, 1.0, 32)
FACTOR_VALUES: tuple[np.ndarray, ...] = (
    np.arange(len(SHAPES), dtype=np.float64),
    SCALES,
    ORIENTATIONS,
    POSITIONS,
    POSITIONS,
)
FACTOR_SIZES = tuple(len(v) for v in FACTOR_VALUES)  # (3, 6, 40, 32, 32)
GRID_SIZE = math.prod(FACTOR_SIZES)  # 737,280 distinct sprites

_BASE_RADIUS = 0.12  # sprite half-size at scale 1, as a fraction of the image side
_MARGIN = 0.2  # centres range over [0.2, 0.8] so every sprite, rotated, stays inside the image
# every shape lies within this radius of its centre in its own unit frame (the square's corner)
_MAX_EXTENT = math.sqrt(2.0)
_WINDOW = 2 * math.ceil(_MAX_EXTENT * _BASE_RADIUS * IMAGE_SIZE) + 4  # pixels evaluated around each centre
_CHUNK = 2048


def factor_values(factors: np.ndarray) -> np.ndarray:
    """Map (N, 5) integer factor indices to values: shape index, scale, orientation (rad), pos_x, pos_y in [0, 1]."""
    factors = np.asarray(factors)
    return np.stack([vals[factors[:, j]] for j, vals in enumerate(FACTOR_VALUES)], axis=1)


def sample_factors(n: int, seed: int = 0) -> np.ndarray:
    """Draw n grid points uniformly (without replacement while n fits the grid) as (n, 5) int64 indices."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    flat = rng.choice(GRID_SIZE, size=n, replace=n > GRID_SIZE)
    return np.stack(np.unravel_index(flat, FACTOR_SIZES), axis=1).astype(np.int64)


def render(factors: np.ndarray, *, full_grid: bool = False) -> np.ndarray:
    """Draw sprites for (N, 5) factor indices as (N, 1, 64, 64) uint8 images of 0/1."""
    factors = np.asarray(factors, dtype=np.int64)
    n = len(factors)
    images = np.zeros((n, 1, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for start in range(0, n, _CHUNK):
        chunk = factors[start : start + _CHUNK]
        out = images[start : start + len(chunk), 0]  # (B, 64, 64) view
        if full_grid:  # reference path: evaluate every pixel (used by tests to check the window)
            out[:] = _draw(chunk, np.zeros(len(chunk), np.int64), np.zeros(len(chunk), np.int64), IMAGE_SIZE)
        else:
            _render_windowed(chunk, out)
    return images


def generate_dsprites(n: int = 20_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sample n sprites from the factor grid: images (N, 1, 64, 64) uint8 in {0, 1}, factors (N, 5) int64 indices."""
    factors = sample_factors(n, seed)
    return render(factors), factors


def _render_windowed(factors: np.ndarray, out: np.ndarray) -> None:
    """Evaluate only a _WINDOW x _WINDOW patch around each sprite and paste it into `out` (B, 64, 64)."""
    cx, cy = _centres(factors)
    ox = np.clip(np.round(cx * IMAGE_SIZE).astype(np.int64) - _WINDOW // 2, 0, IMAGE_SIZE - _WINDOW)
    oy = np.clip(np.round(cy * IMAGE_SIZE).astype(np.int64) - _WINDOW // 2, 0, IMAGE_SIZE - _WINDOW)
    patch = _draw(factors, ox, oy, _WINDOW)  # (B, W, W)
    rows = oy[:, None, None] + np.arange(_WINDOW)[None, :, None]  # (B, W, 1)
    cols = ox[:, None, None] + np.arange(_WINDOW)[None, None, :]  # (B, 1, W)
    out[np.arange(len(factors))[:, None, None], rows, cols] = patch


def _centres(factors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    span = 1.0 - 2.0 * _MARGIN
    return _MARGIN + span * POSITIONS[factors[:, 3]], _MARGIN + span * POSITIONS[factors[:, 4]]


def _draw(factors: np.ndarray, ox: np.ndarray, oy: np.ndarray, size: int) -> np.ndarray:
    """Inside-test at the centres of a size x size pixel patch whose top-left pixel is (oy, ox): (B, size, size) uint8."""
    cx, cy = _centres(factors)
    radius = (_BASE_RADIUS * SCALES[factors[:, 1]]).astype(np.float32)[:, None, None]
    theta = ORIENTATIONS[factors[:, 2]]
    cos = np.cos(theta).astype(np.float32)[:, None, None]  # (B, 1, 1)
    sin = np.sin(theta).astype(np.float32)[:, None, None]
    grid = (
        np.arange(size, dtype=np.float32) + 0.5
    ) / IMAGE_SIZE  # pixel centres of the patch, from its origin
    # offsets from the sprite centre: columns vary along the last axis, rows along the middle one
    dx = (
        grid[None, None, :] + ((ox + 0.0) / IMAGE_SIZE - cx).astype(np.float32)[:, None, None]
    )  # (B, 1, size)
    dy = (
        grid[None, :, None] + ((oy + 0.0) / IMAGE_SIZE - cy).astype(np.float32)[:, None, None]
    )  # (B, size, 1)
    # into the sprite's unit frame: rotate by -theta (image y points down), then undo the scale
    u = (cos * dx + sin * dy) / radius  # (B, size, size)
    v = (cos * dy - sin * dx) / radius
    shape = factors[:, 0]
    inside = np.zeros(u.shape, dtype=bool)
    for k, test in enumerate((_square, _ellipse, _heart)):
        sel = np.flatnonzero(shape == k)
        if len(sel):
            inside[sel] = test(u[sel], v[sel])
    return inside.view(np.uint8)


def _square(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(u), np.abs(v)) <= 1.0


def _ellipse(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return u * u + 4.0 * v * v <= 1.0  # semi-axes 1 and 0.5


def _heart(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0, with y up (image v down) and shifted so the heart sits on the centre
    x = 1.15 * u
    y = 0.12 - 1.15 * v
    r = x * x + y * y - 1.0
    return r * r * r - x * x * y * y * y <= 0.0
