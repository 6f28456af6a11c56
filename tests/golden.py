"""Golden fingerprints of the model input for the real DICOM files.

Regenerate only deliberately, when the pipeline is meant to change:

    python -m tests.golden --write
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from model.preprocess import Preprocessed, PreprocessSpec, preprocess
from tests.conftest import DICOM_DIR

GOLDEN_FILE = Path(__file__).with_name("golden_model_inputs.json")
SPEC = PreprocessSpec(input_size=128)


def fingerprint(result: Preprocessed) -> dict[str, object]:
    """Mean/std of the model input and an 8x8 grid of block means quantised to 4 levels."""
    eq = result.equalized
    blocks = eq.reshape(8, eq.shape[0] // 8, 8, eq.shape[1] // 8).mean(axis=(1, 3))
    grid = "".join(str(int(v)) for v in np.clip(blocks * 4, 0, 3).astype(int).ravel())
    return {"mean": round(float(result.array.mean()), 5), "std": round(float(result.array.std()), 5),
            "voi": result.voi, "grid": grid}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="overwrite the golden file")
    args = parser.parse_args()
    files = sorted(p for p in DICOM_DIR.rglob("*.dcm"))
    golden = {str(p.relative_to(DICOM_DIR)): fingerprint(preprocess(p, SPEC)) for p in files}
    text = json.dumps(golden, indent=2, sort_keys=True) + "\n"
    if args.write:
        GOLDEN_FILE.write_text(text)
        print(f"wrote {GOLDEN_FILE} ({len(golden)} files)")
    else:
        print(text)


if __name__ == "__main__":
    main()
