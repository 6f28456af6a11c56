"""Training benchmark: images/s for phase 1 (base frozen) and phase 2 (whole network) at 299 px.

    python -m bench.train [--input-size 299] [--batch 16] [--steps 4] [--workers 2]
                          [--precision auto]

For each phase, two figures measured in this process after a warm-up (graph compilation):
- pipeline: ``model.fit`` over training/'s PyDataset (cached equalised images -> Keras 3
  augmentation layers, seeded per batch -> network scaling), with ``--workers`` loader threads
  preparing batches ahead of the step, as ``python -m training fit`` runs it;
- bare: ``train_on_batch`` on one ready tensor (the network and optimizer alone);
and their ratio. Synthetic images: speed does not depend on the pixels. Any Keras backend
(``KERAS_BACKEND=jax`` on a GPU host); ``--precision auto`` is mixed_float16 on a GPU and
float32 elsewhere, as training's ``train.precision``.

Then the cost of committing one epoch (training.resume, an improving epoch: weights with the
optimizer state plus the best model, each fsynced and renamed) next to a plain Keras
``save_weights`` (what BackupAndRestore wrote, in place and without fsync), in the same
folder (``--out``, default the current directory's file system).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import keras
import numpy as np

from model.device import describe_device
from model.durable import save_model_durably, save_weights_durably
from model.network import build_xception
from training.augment import build_augmenter
from training.config import AugmentConfig
from training.dataset import Batches, Row
from training.fit import _set_trainable
from training.precision import POLICIES, precision, resolve_policy
from training.records import Label, Split


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _rate(images: int, seconds: float) -> float:
    return images / seconds if seconds else float("nan")


def commit_seconds(model: keras.Model, folder: Path, repeats: int = 3) -> tuple[float, float]:
    """Median seconds of one epoch commit, and of a plain save_weights, in ``folder``."""
    commit, plain = [], []
    with tempfile.TemporaryDirectory(dir=folder) as temp:
        for i in range(repeats):
            started = time.perf_counter()
            save_weights_durably(model, Path(temp) / f"epoch-{i}.weights.h5")
            save_model_durably(model, Path(temp) / f"best-{i}.keras")
            commit.append(time.perf_counter() - started)
            started = time.perf_counter()
            model.save_weights(Path(temp) / f"plain-{i}.weights.h5")
            plain.append(time.perf_counter() - started)
    return float(np.median(commit)), float(np.median(plain))


def measure(phase: int, size: int, batch: int, steps: int, out: Path,
            workers: int) -> tuple[float, float, tuple[float, float]]:
    keras.utils.set_random_seed(phase)
    model = build_xception(size, weights=None)
    _set_trainable(model, train_base=phase == 2)
    model.compile(optimizer=keras.optimizers.Nadam(1e-3 if phase == 1 else 0.01),
                  loss="categorical_crossentropy", metrics=["accuracy"])
    count = batch * steps
    cache = np.random.default_rng(0).random((count, size, size), dtype=np.float32)
    rows = [Row(str(i), "", "bench", Label.OPACITY if i % 2 else Label.NONE, Split.TRAIN, i)
            for i in range(count)]
    augmenter = build_augmenter(AugmentConfig(True, 0.1, 0.05, (0.8, 1.1)), seed=phase)
    batches = Batches(cache, rows, batch, augmenter, seed=phase, workers=workers,
                      max_queue_size=2 * workers)
    _progress(f"phase {phase}: warm-up (compiling the training step)")
    model.fit(batches, epochs=1, steps_per_epoch=1, verbose=0)
    _progress(f"phase {phase}: pipeline, {steps} steps of {batch}")
    started = time.perf_counter()
    model.fit(batches, epochs=1, verbose=0)
    pipeline = _rate(count, time.perf_counter() - started)
    x, y = batches[0]
    model.train_on_batch(x, y)
    _progress(f"phase {phase}: bare train_on_batch, {steps} steps of {batch}")
    started = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    bare = _rate(count, time.perf_counter() - started)
    _progress(f"phase {phase}: epoch commit vs plain save_weights")
    return pipeline, bare, commit_seconds(model, out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input-size", type=int, default=299)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="loader threads (train.loader_workers)")
    parser.add_argument("--precision", choices=POLICIES, default="auto")
    parser.add_argument("--out", type=Path, default=Path("."),
                        help="folder on the file system whose writes the commit figure measures")
    args = parser.parse_args()
    policy = resolve_policy(args.precision)
    print(f"host: {platform.node()} ({os.cpu_count()} CPUs), Keras {keras.__version__} on "
          f"{keras.backend.backend()}, device {describe_device()}, precision {policy}; input "
          f"{args.input_size} px, batch {args.batch}, {args.steps} timed steps, {args.workers} "
          "loader threads")
    print("| phase | pipeline images/s | bare train_on_batch images/s | pipeline / bare |")
    print("|---|---|---|---|")
    commits = {}
    rates = {}
    for phase in (1, 2):
        with precision(policy):
            pipeline, bare, commits[phase] = measure(phase, args.input_size, args.batch, args.steps,
                                                     args.out, args.workers)
        rates[phase] = (pipeline, bare)
        print(f"| {phase} ({'base frozen' if phase == 1 else 'all trainable'}) | {pipeline:.2f} | "
              f"{bare:.2f} | {pipeline / bare:.2f} |", flush=True)
    print("\n| phase | epoch commit s (weights + optimizer + best model, fsynced) | "
          "plain save_weights s | commit / plain |")
    print("|---|---|---|---|")
    for phase, (commit, plain) in commits.items():
        print(f"| {phase} | {commit:.2f} | {plain:.2f} | {commit / plain:.2f} |")
    print(json.dumps({"bench": "train", "backend": keras.backend.backend(), "device": describe_device(),
                      "precision": str(policy), "input_size": args.input_size, "batch": args.batch,
                      "phases": {str(phase): {"pipeline_images_per_s": round(pipe, 3),
                                              "bare_images_per_s": round(bare_rate, 3),
                                              "commit_s": round(commits[phase][0], 3),
                                              "plain_save_s": round(commits[phase][1], 3)}
                                 for phase, (pipe, bare_rate) in rates.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
