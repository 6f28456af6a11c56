"""training/: the figures that choose checkpoints, thresholds and intervals."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from training.config import ConfigError, load_config
from training.dataset import Row
from training.diagnose import collapse_diagnosis
from training.evaluate import choose_thresholds
from training.metrics import at_threshold, bootstrap_auc, summarize
from training.records import Label, Split
from training.state import PhaseState


class _Inverted:
    """A stand-in model whose P(opacity) is highest for the none images: AUC exactly 0.0."""

    def predict_on_batch(self, batch: np.ndarray) -> np.ndarray:
        p = batch[:, 0, 0, 0] * 0.5 + 0.5  # network input is in [-1, 1]: back to the cache's [0, 1]
        return np.stack([1 - p, p], axis=1)


def _rows(labels: list[Label]) -> list[Row]:
    return [Row(str(i), "", "s", label, Split.VALID, i) for i, label in enumerate(labels)]


def test_an_auc_of_zero_stays_zero_and_loses_the_checkpoint_choice() -> None:
    from training.fit import ValidationMetrics

    labels = [Label.NONE, Label.OPACITY] * 4
    cache = np.stack([np.full((4, 4), 0.9 if label is Label.NONE else 0.1, np.float32)
                      for label in labels])
    callback = ValidationMetrics(cache, _rows(labels), batch_size=3)
    callback.set_model(_Inverted())
    logs: dict[str, Any] = {}
    callback.on_epoch_end(0, logs)
    assert logs["val_auc"] == 0.0 and logs["val_accuracy"] == 0.0
    state = PhaseState(history=[{"epoch": 0, "val_auc": 0.0}, {"epoch": 1, "val_auc": 0.3}])
    assert state.best_epoch() == 1
    state = PhaseState(history=[{"epoch": 0, "val_auc": 0.5}, {"epoch": 1, "val_auc": 0.0}])
    assert state.best_epoch() == 0 and state.epochs_without_improvement() == 1


def test_a_validation_split_with_one_class_is_refused_before_training() -> None:
    from training.fit import check_validation

    with pytest.raises(ValueError, match="only none images; ROC AUC, which chooses checkpoints"):
        check_validation(2, _rows([Label.NONE] * 3))
    check_validation(1, _rows([Label.NONE, Label.OPACITY]))


def test_bundle_thresholds_keep_the_validation_sensitivity_at_its_target() -> None:
    """Rounded to 6 decimals, 0.1234567 would become 0.123457 and lose that positive."""
    config = load_config(None, {"data": {"siim": "x"}})
    y = np.array([0] * 5 + [1] * 20)
    p = np.concatenate([np.linspace(0.01, 0.05, 5), np.linspace(0.9, 0.2, 19), [0.1234567]])
    chosen, bundle = choose_thresholds(y, p, config)
    stored = json.loads(json.dumps(bundle))  # as the manifest keeps it
    for name, target in (("urgent", 0.90), ("decision", 0.95), ("elevated", 0.98)):
        assert at_threshold(y, p, stored[name])["sensitivity"] >= target, (name, stored[name])
    assert stored["elevated"] == 0.1234567 and chosen[0.98] == 0.1234567


def test_the_interval_resamples_patients_not_images() -> None:
    """Five identical images per patient: resampling images pretends there are 100
    independent cases and gives too narrow an interval; resampling patients does not."""
    rng = np.random.default_rng(3)
    y_patient = np.array([0, 1] * 10)
    p_patient = np.clip(y_patient * 0.2 + rng.normal(0.4, 0.2, 20), 0, 1)
    y, p = np.repeat(y_patient, 5), np.repeat(p_patient, 5)
    groups = np.repeat(np.arange(20), 5)
    images = bootstrap_auc(y, p, 400, 0)
    patients = bootstrap_auc(y, p, 400, 0, groups)
    single = bootstrap_auc(y_patient, p_patient, 400, 0)
    assert images and patients and single
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert width(patients) > 1.5 * width(images)
    assert abs(width(patients) - width(single)) < 0.35 * width(single)


def test_figures_on_fewer_than_30_images_are_flagged_not_meaningful() -> None:
    y = np.array([0, 1] * 14)
    p = np.linspace(0, 1, 28)
    small = summarize(y, p, 0.5, 20, 0, np.arange(28) // 2)  # 14 patients of 2 images
    large = summarize(np.tile(y, 2), np.tile(p, 2), 0.5, 20, 0)
    assert small["meaningful"] is False and large["meaningful"] is True
    assert small["clusters"] == 14


def test_a_collapse_is_blamed_on_batchnorm_only_when_batch_statistics_separate_the_images() -> None:
    y = np.array([0, 1] * 10)
    flat = 0.508 + 0.001 * np.arange(20) / 20
    separated = np.where(y == 1, 0.8, 0.2) + 0.01 * np.arange(20) / 20
    bn = collapse_diagnosis(y, flat, separated, 0.99, 200)
    assert bn["reason"].startswith("BatchNormalization moving statistics")
    assert bn["auc_batch_statistics"] == 1.0
    dead = collapse_diagnosis(y, flat, flat, 0.9, 200)
    assert dead["reason"].startswith("the network itself")


def test_training_from_scratch_with_a_frozen_phase_1_backbone_is_refused() -> None:
    with pytest.raises(ConfigError, match=r'model.weights = "none" with phase1.train_base = false'):
        load_config(None, {"data": {"siim": "x"}, "model": {"weights": "none"}})
    load_config(None, {"data": {"siim": "x"}, "model": {"weights": "none"}, "phase1": {"train_base": True}})
    with pytest.raises(ConfigError, match="split.strategy = 'random': expected 'grouped' or 'thesis'"):
        load_config(None, {"data": {"siim": "x"}, "split": {"strategy": "random"}})
