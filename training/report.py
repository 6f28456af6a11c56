"""`report.md`: our figures next to the thesis's, with the data, the split, the phases and
the plots."""

from __future__ import annotations

import csv
import json
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from training.config import Config
from training.metrics import MIN_MEANINGFUL
from training.run import RunPaths

THESIS = {
    "phase1_valid_accuracy": "76.67 %",
    "phase1_valid_confusion": "[[965 429] [795 3057]]",
    "phase1_test_accuracy": "75.20 %",
    "phase1_test_confusion": "[[238 98] [213 705]]",
    "final_test_accuracy": "77.83 %",
    "final_test_confusion": "[[215 121] [157 761]]",
    "final_sensitivity_specificity": "82.9 % / 64.0 %",
    "auc": "not reported",
}
"""The thesis's figures, all at argmax, confusion matrices none first (rows truth)."""

THESIS_NOTES = [
    "The thesis's two test matrices each add up to 1,254 images, not the 1,267 (20 % of the "
    "competition data) it states.",
    "Its phase-1 validation split was Keras's `validation_split=0.2` over a dataframe with the "
    "competition images first: all 5,067 competition training images plus 179 external ones "
    "(the 1,394 'none' of its validation matrix are exactly the competition's training "
    "negatives), so its phase 1 trained on the external database only. `split.strategy = "
    "\"thesis\"` reproduces that order and cut.",
    "Its phase 2 was validated on the final test set. No run here lets the final test set choose "
    "a checkpoint or a threshold, whatever the strategy.",
]


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f} %"


def _auc(summary: dict[str, Any]) -> str:
    if summary["auc"] is None:
        return "n/a (one class)"
    ci = summary["auc_95ci"]
    return f"{summary['auc']:.3f}" + (f" (95 % CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else "")


def _row(name: str, s: dict[str, Any]) -> str:
    d = s["decision"]
    flag = "" if s.get("meaningful", True) else f" **not meaningful: n < {MIN_MEANINGFUL}**"
    clusters = s.get("clusters", s["images"])
    patients = f", {clusters} groups" if clusters != s["images"] else ""
    return (f"| {name}{flag} | {s['images']} ({s['opacity']} opacity{patients}) | "
            f"{_pct(s['argmax']['accuracy'])} | {_auc(s)} | {_pct(d['sensitivity'])} | "
            f"{_pct(d['specificity'])} | `{d['confusion_matrix']}` |")


def _matrix(s: dict[str, Any]) -> str:
    (tn, fp), (fn, tp) = s["argmax"]["confusion_matrix"]
    return f"[[{tn} {fp}] [{fn} {tp}]]"


def _data(config: Config, paths: RunPaths) -> list[str]:
    with paths.summary.open(newline="") as fh:
        summary = list(csv.DictReader(fh))
    kinds: Counter[str] = Counter()
    if paths.problems.is_file():
        with paths.problems.open(newline="") as fh:
            kinds.update(r["problem"] for r in csv.DictReader(fh))
    lines = ["## Data", "", "| source | images | none | opacity | opacity % | train | valid | test |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['source']} | {r['images']} | {r['none']} | {r['opacity']} | {r['opacity_percent']} | "
              f"{r['train']} | {r['valid']} | {r['test']} |" for r in summary]
    listed = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "none"
    lines += ["", f"Problems listed in `data/problems.csv`: {listed}.", ""]
    if paths.notes.is_file() and paths.notes.read_text().strip():
        lines += ["Notes from the dataset adapters and the split:", ""]
        lines += [f"- {n}" for n in paths.notes.read_text().splitlines()]
        lines.append("")
    strategy = config.split.strategy
    if config.split.test_fold >= 0:
        split = (f"Predefined patient-level folds: test fold {config.split.test_fold}, validation fold "
                 f"{config.split.valid_fold}, the rest train.")
    elif strategy == "thesis":
        split = ("`split.strategy = \"thesis\"`: the thesis's order and validation cut (test sources "
                 "first, the first 20 % validates phase 1); phase 2's sources are split again for "
                 "phase 2's validation, never the final test.")
    else:
        split = ("`split.strategy = \"grouped\"`: stratified and grouped by patient (or study, or "
                 "image) merged with near-duplicate clusters; nothing on two sides.")
    return [*lines, "Split: " + split, ""]


def _thesis_table(metrics: dict[str, Any]) -> list[str]:
    phase1, final = metrics["phase1"], metrics["test"]
    d = final["argmax"]
    return [
        "## Next to the thesis", "",
        "All at argmax (as the thesis reported), confusion matrices none first.", "",
        "| figure | thesis | this run |", "|---|---|---|",
        f"| phase 1, validation accuracy | {THESIS['phase1_valid_accuracy']} | "
        f"{_pct(phase1['valid']['argmax']['accuracy'])} |",
        f"| phase 1, validation confusion | {THESIS['phase1_valid_confusion']} | "
        f"{_matrix(phase1['valid'])} |",
        f"| phase 1, final-test accuracy | {THESIS['phase1_test_accuracy']} | "
        f"{_pct(phase1['test']['argmax']['accuracy'])} |",
        f"| phase 1, final-test confusion | {THESIS['phase1_test_confusion']} | {_matrix(phase1['test'])} |",
        f"| final model, final-test accuracy | {THESIS['final_test_accuracy']} | {_pct(d['accuracy'])} |",
        f"| final model, final-test confusion | {THESIS['final_test_confusion']} | {_matrix(final)} |",
        f"| final model, sensitivity / specificity | {THESIS['final_sensitivity_specificity']} | "
        f"{_pct(d['sensitivity'])} / {_pct(d['specificity'])} |",
        f"| final model, ROC AUC | {THESIS['auc']} | {_auc(final)} |", "",
        *[f"- {note}" for note in THESIS_NOTES], "",
    ]


def write_report(config: Config, paths: RunPaths, metrics: dict[str, Any], plots: list[Path]) -> None:
    fit_file = paths.root / "fit.json"
    fit_record = json.loads(fit_file.read_text()) if fit_file.is_file() else {}
    thesis_data = bool(config.data.siim and config.data.radiography)
    lines = [
        f"# Training run `{paths.root.name}`",
        "",
        f"Written {datetime.now(UTC).isoformat(timespec='seconds')} by `python -m training evaluate`. "
        f"Keras {fit_record.get('keras_version', '?')} on the {fit_record.get('backend', '?')} backend "
        f"({fit_record.get('device', 'device not recorded')}, precision "
        f"{fit_record.get('precision', 'float32')}); input {config.model.input_size} px "
        f"({config.model.aspect}); backbone weights: `{config.model.weights}`; evaluated checkpoint "
        f"`{metrics['checkpoint']}`.",
        "",
    ]
    if not thesis_data:
        lines += ["**Not the thesis's data**: the figures below are not comparable with the thesis's "
                  "numbers, which are listed for orientation only.", ""]
    if config.model.weights.lower() == "none":
        lines += ["**Trained from scratch** (no ImageNet weights), unlike the thesis.", ""]
    lines += _data(config, paths)
    lines += ["## Training", "", "| phase | epochs run | best validation AUC | training images/s |",
              "|---|---|---|---|"]
    for number, phase in sorted(fit_record.get("phases", {}).items()):
        best = phase.get("best_val_auc")
        lines.append(f"| {number} | {phase.get('epochs_run')} | "
                     f"{'n/a' if best is None else f'{best:.3f}'} | {phase.get('images_per_second')} |")
    thresholds = metrics["bundle_thresholds"]
    lines += ["", "## Final test", "",
              f"Decision threshold {thresholds['decision']:.6f} (validation sensitivity "
              f"{config.evaluate.decision_sensitivity}); accuracy is also given at argmax (0.5) "
              "as the thesis reported it. Confusion matrices: rows truth, columns prediction, "
              "none first. AUC intervals: bootstrap over patients (studies, or images where a "
              f"source has no patient ids); figures on fewer than {MIN_MEANINGFUL} images are "
              "listed but not meaningful.", "",
              "| set | images | accuracy (argmax) | ROC AUC | sensitivity | specificity "
              "| confusion at decision |",
              "|---|---|---|---|---|---|---|",
              _row("test, pooled", metrics["test"])]
    lines += [_row(f"test, {source}", s) for source, s in metrics["test_by_source"].items()]
    lines.append(_row("validation", metrics["valid"]))
    phase1 = metrics.get("phase1")
    if phase1 and phase1["checkpoint"] != metrics["checkpoint"]:
        lines += [_row("phase 1, test", phase1["test"]), _row("phase 1, validation", phase1["valid"])]
    low_high = metrics.get("test_probability_range")
    if low_high:
        lines += ["", f"Test probabilities span {low_high[0]:.4f}-{low_high[1]:.4f}."]
    collapse = metrics.get("collapse")
    if collapse:
        lines += ["", f"**Collapsed: every test image gets almost the same probability.** Why: "
                  f"{collapse['reason']}. Accuracy at 0.5 says nothing here; the AUC and the figures at "
                  "the validation-chosen threshold do."]
    lines += ["", "Thresholds chosen on the validation split: " + ", ".join(
                  f"sensitivity {k} -> {v:.6f}" for k, v in metrics["thresholds_for_sensitivity"].items())
              + f". Bundle priorities: urgent >= {thresholds['urgent']:.6f}, elevated >= "
              f"{thresholds['elevated']:.6f} (stored unrounded in the bundle).", ""]
    if phase1:
        lines += _thesis_table(metrics)
    lines += ["## Plots", ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    lines.append("")
    paths.report.write_text("\n".join(lines))
