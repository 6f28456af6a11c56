"""A heatmap drawn over the network-input image in viridis, with a low-to-high legend bar.

Viridis is perceptually uniform (equal steps in value look like equal steps in
colour, and its lightness rises monotonically, so it also reads in grayscale
and for common colour-vision deficiencies). The daemon has no matplotlib (it is
a train/dev extra), so the map is a table of 33 of matplotlib's 256 viridis
entries (every 8th and the last), interpolated linearly; it stays within 2/255
of matplotlib's table (tested where matplotlib is installed).
"""

from __future__ import annotations

import numpy as np

_VIRIDIS_ANCHORS = np.array([
    (0.2670, 0.0049, 0.3294), (0.2770, 0.0503, 0.3757), (0.2823, 0.0950, 0.4173),
    (0.2829, 0.1359, 0.4534), (0.2788, 0.1755, 0.4834), (0.2706, 0.2141, 0.5071),
    (0.2590, 0.2515, 0.5247), (0.2450, 0.2877, 0.5373), (0.2297, 0.3224, 0.5457),
    (0.2143, 0.3556, 0.5512), (0.1994, 0.3876, 0.5546), (0.1856, 0.4186, 0.5568),
    (0.1727, 0.4488, 0.5579), (0.1607, 0.4785, 0.5581), (0.1490, 0.5081, 0.5573),
    (0.1378, 0.5375, 0.5549), (0.1276, 0.5669, 0.5506), (0.1206, 0.5964, 0.5436),
    (0.1206, 0.6258, 0.5335), (0.1323, 0.6550, 0.5197), (0.1579, 0.6838, 0.5017),
    (0.1966, 0.7118, 0.4792), (0.2461, 0.7389, 0.4520), (0.3041, 0.7647, 0.4199),
    (0.3692, 0.7889, 0.3829), (0.4401, 0.8111, 0.3410), (0.5160, 0.8312, 0.2943),
    (0.5958, 0.8487, 0.2433), (0.6785, 0.8637, 0.1895), (0.7624, 0.8764, 0.1371),
    (0.8456, 0.8873, 0.0997), (0.9261, 0.8973, 0.1041), (0.9932, 0.9062, 0.1439),
])
_ANCHOR_POSITIONS = np.array([*range(0, 256, 8), 255], dtype=np.float64) / 255.0

LEGEND_GAP = 4
"""Black columns between the image and the legend bar."""


def viridis(values: np.ndarray) -> np.ndarray:
    """RGB floats in [0, 1], shape ``values.shape + (3,)``, for values in [0, 1] (clipped)."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    return np.stack([np.interp(v, _ANCHOR_POSITIONS, _VIRIDIS_ANCHORS[:, k]) for k in range(3)],
                    axis=-1)


def render_heatmap(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45,
                   legend_width: int | None = None) -> np.ndarray:
    """The grayscale ``image`` with ``heatmap`` blended over it, and a legend bar on the right.

    ``image``: (H, W) in [0, 1], e.g. ``Preprocessed.equalized`` (what the network saw);
    ``heatmap``: (H, W) in [0, 1], e.g. one map of :func:`model.gradcam.grad_cam`. Each pixel is
    ``(1 - alpha) * gray + alpha * viridis(heat)``. The legend (default width max(8, W // 16))
    runs from the colour of 0 at the bottom to the colour of 1 at the top, after
    :data:`LEGEND_GAP` black columns. Returns uint8 RGB (H, W + LEGEND_GAP + legend, 3).
    Raises ValueError when the shapes differ or ``alpha`` is outside [0, 1].
    """
    if image.ndim != 2 or image.shape != heatmap.shape:
        raise ValueError(f"image {image.shape} and heatmap {heatmap.shape} must be the same 2-D shape")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha {alpha} is outside [0, 1]")
    height, width = image.shape
    gray = np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0)[..., None]
    blended = (1.0 - alpha) * gray + alpha * viridis(heatmap)
    bar_width = legend_width if legend_width is not None else max(8, width // 16)
    ramp = np.linspace(1.0, 0.0, height)[:, None].repeat(bar_width, axis=1)
    gap = np.zeros((height, LEGEND_GAP, 3))
    canvas = np.concatenate([blended, gap, viridis(ramp)], axis=1)
    return np.round(canvas * 255.0).astype(np.uint8)
