"""Near-duplicate radiographs: one image re-encoded, resized or slightly shifted, under two ids.

The COVID-19 Radiography Database's COVID class includes BIMCV images, and SIIM-FISABIO-RSNA is
built from BIMCV and RICORD, so copies of one radiograph can sit in both datasets, under
different names and encodings, where byte hashes do not see them. They are found on the
cached equalised images (every source already resized and equalised the same way):

1. candidates: a 64-bit perceptual hash (``imagehash.phash``) of the centre of image A against
   the hashes of 25 crops of image B shifted by up to 4 % of its side in each direction; a pair
   is a candidate when the smallest Hamming distance is at most ``max_distance``;
2. verification: the correlation of A's centre with B's best-matching shifted crop (48 px
   thumbnails, normalised) must reach ``min_correlation``.

Chest radiographs look alike at 8 x 8 DCT resolution: on the 498 images of
../shared/data/labelled (one image per patient, almost), different images came within hash
distance 4, while re-encoded (JPEG), resized and shifted copies (up to 4 %) stayed within 4 with
correlations of 0.98 or more, and no two different images exceeded 0.973. Hence both steps;
both figures are in problems.csv for every pair found, so a reviewer can judge each one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import imagehash
import numpy as np
from PIL import Image
from tqdm import tqdm

SHIFT_STEP = 0.02
"""Crops are shifted in steps of this fraction of the side, -2..+2 steps on each axis."""
SHIFTS = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]
CENTRE = SHIFTS.index((0, 0))
HASH_THUMBNAIL = 32
CORRELATION_THUMBNAIL = 48


@dataclass(frozen=True)
class NearDuplicate:
    first: int
    second: int
    distance: int
    """Smallest Hamming distance between the first's centre hash and the second's shifted hashes."""
    correlation: float


def _crops(image: np.ndarray) -> list[np.ndarray]:
    """The 25 shifted crops (each 1 - 8 % of the side, so every shift stays inside the image)."""
    side = image.shape[0]
    step = max(1, round(SHIFT_STEP * side))
    inner = side - 4 * step
    return [image[2 * step + dy * step: 2 * step + dy * step + inner,
                  2 * step + dx * step: 2 * step + dx * step + inner] for dy, dx in SHIFTS]


def _thumbnail(crop: np.ndarray, size: int) -> Image.Image:
    pixels = (np.clip(crop, 0.0, 1.0) * 255).astype(np.uint8)
    return Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR)


def _hash(thumbnail: Image.Image) -> int:
    bits = imagehash.phash(thumbnail, hash_size=8).hash.flatten()
    return int(np.packbits(bits).view(">u8")[0])


def _normalised(crop: np.ndarray) -> np.ndarray:
    t = np.asarray(_thumbnail(crop, CORRELATION_THUMBNAIL), dtype=np.float32).ravel()
    t = t - t.mean()
    norm = float(np.linalg.norm(t))
    return t / norm if norm > 0 else t


def shifted_hashes(images: np.ndarray, indices: Sequence[int]) -> np.ndarray:
    """(len(indices), 25) uint64 perceptual hashes of each image's shifted crops."""
    out = np.zeros((len(indices), len(SHIFTS)), dtype=np.uint64)
    for row, i in enumerate(tqdm(indices, desc="perceptual hashes", unit="img")):
        out[row] = [_hash(_thumbnail(c, HASH_THUMBNAIL)) for c in _crops(np.asarray(images[i]))]
    return out


def correlation(images: np.ndarray, first: int, second: int) -> float:
    """Largest correlation of ``first``'s centre with any shifted crop of ``second``."""
    centre = _normalised(_crops(np.asarray(images[first]))[CENTRE])
    return max(float(centre @ _normalised(c)) for c in _crops(np.asarray(images[second])))


def _candidates(hashes: np.ndarray, max_distance: int) -> list[tuple[int, int, int]]:
    """(a, b, distance) with a < b whose distance either way is at most ``max_distance``."""
    n = len(hashes)
    centre = hashes[:, CENTRE]
    chunk = max(1, 20_000_000 // max(1, n * len(SHIFTS)))
    found: dict[tuple[int, int], int] = {}
    for start in range(0, n, chunk):
        block = np.bitwise_count(centre[start:start + chunk, None, None] ^ hashes[None, :, :]).min(axis=2)
        for a, b in zip(*np.nonzero(block <= max_distance), strict=True):
            i, j = start + int(a), int(b)
            if i != j:
                key = (min(i, j), max(i, j))
                found[key] = min(found.get(key, 64), int(block[a, b]))
    return [(i, j, d) for (i, j), d in sorted(found.items())]


def find(images: np.ndarray, indices: Sequence[int], max_distance: int,
         min_correlation: float) -> list[NearDuplicate]:
    """Verified near-duplicate pairs among ``images[indices]`` (indices into ``images``)."""
    if len(indices) < 2:
        return []
    hashes = shifted_hashes(images, indices)
    pairs = []
    for a, b, distance in _candidates(hashes, max_distance):
        i, j = indices[a], indices[b]
        value = max(correlation(images, i, j), correlation(images, j, i))
        if value >= min_correlation:
            pairs.append(NearDuplicate(i, j, distance, value))
    return pairs


def clusters(count: int, pairs: Sequence[NearDuplicate]) -> list[int]:
    """A cluster number per image (union-find over the pairs); images without a pair keep
    their own index."""
    parent = list(range(count))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for pair in pairs:
        a, b = root(pair.first), root(pair.second)
        if a != b:
            parent[max(a, b)] = min(a, b)
    return [root(i) for i in range(count)]
