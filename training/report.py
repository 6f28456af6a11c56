"""`report.md`: our figures next to the thesis's, with the data, the phases and the plots."""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from training.config import Config
from training.run import RunPaths

THESIS = {
    "phase 1 final-test accuracy": "75.20 %",
    "phase 2 final-test accuracy": "77.83 %",
    "phase 2 confusion (none first)": "[[215 121] [157 761]]",
    "AUC, sensitivity, specificity": "not reported",
}


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f} %"


def _auc(summary: dict[str, Any]) -> str:
    if summary["auc"] is None:
        return "n/a (one class)"
    ci = summary["auc_95ci"]
    return f"{summary['auc']:.3f}" + (f" (95 % CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else "")


def _row(name: str, s: dict[str, Any]) -> str:
    d = s["decision"]
    return (f"| {name} | {s['images']} ({s['opacity']} opacity) | {_pct(s['argmax']['accuracy'])} | "
            f"{_auc(s)} | {_pct(d['sensitivity'])} | {_pct(d['specificity'])} | "
            f"`{d['confusion_matrix']}` |")


def write_report(config: Config, paths: RunPaths, metrics: dict[str, Any], plots: list[Path]) -> None:
    fit_file = paths.root / "fit.json"
    fit_record = json.loads(fit_file.read_text()) if fit_file.is_file() else {}
    with paths.summary.open(newline="") as fh:
        summary = list(csv.DictReader(fh))
    problems = 0
    if paths.problems.is_file():
        problems = max(0, len(paths.problems.read_text().splitlines()) - 1)
    thesis_data = bool(config.data.siim and config.data.radiography)
    lines = [
        f"# Training run `{paths.root.name}`",
        "",
        f"Written {datetime.now(UTC).isoformat(timespec='seconds')} by `python -m training evaluate`. "
        f"Keras {fit_record.get('keras_version', '?')} on the {fit_record.get('backend', '?')} backend; "
        f"input {config.model.input_size} px ({config.model.aspect}); backbone weights: "
        f"`{config.model.weights}`; evaluated checkpoint `{metrics['checkpoint']}`.",
        "",
    ]
    if not thesis_data:
        lines += ["**Not the thesis's data**: the figures below are not comparable with the thesis's "
                  "numbers, which are listed for orientation only.", ""]
    if config.model.weights.lower() == "none":
        lines += ["**Trained from scratch** (no ImageNet weights), unlike the thesis.", ""]
    lines += ["## Data", "", "| source | images | none | opacity | opacity % | train | valid | test |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['source']} | {r['images']} | {r['none']} | {r['opacity']} | {r['opacity_percent']} | "
              f"{r['train']} | {r['valid']} | {r['test']} |" for r in summary]
    lines += ["", f"{problems} listed images were missing, unreadable or duplicates "
              "(`data/problems.csv`).", ""]
    if paths.notes.is_file() and paths.notes.read_text().strip():
        lines += ["Notes from the dataset adapters:", ""]
        lines += [f"- {n}" for n in paths.notes.read_text().splitlines()]
        lines.append("")
    lines += ["## Training", "", "| phase | epochs run | best validation AUC | training images/s |",
              "|---|---|---|---|"]
    for number, phase in sorted(fit_record.get("phases", {}).items()):
        best = phase.get("best_val_auc")
        lines.append(f"| {number} | {phase.get('epochs_run')} | "
                     f"{'n/a' if best is None else f'{best:.3f}'} | {phase.get('images_per_second')} |")
    thresholds = metrics["bundle_thresholds"]
    lines += ["", "## Final test", "",
              f"Decision threshold {thresholds['decision']:.4f} (validation sensitivity "
              f"{config.evaluate.decision_sensitivity}); accuracy is also given at argmax (0.5) "
              "as the thesis reported it. Confusion matrices: rows truth, columns prediction, "
              "none first.", "",
              "| set | images | accuracy (argmax) | ROC AUC | sensitivity | specificity "
              "| confusion at decision |",
              "|---|---|---|---|---|---|---|",
              _row("test, pooled", metrics["test"])]
    lines += [_row(f"test, {source}", s) for source, s in metrics["test_by_source"].items()]
    argmax = metrics["test"]["argmax"]["confusion_matrix"]
    low_high = metrics.get("test_probability_range")
    if low_high and (argmax[0][0] + argmax[1][0] == 0 or argmax[0][1] + argmax[1][1] == 0):
        lines += ["", f"**At argmax every test image gets the same class**: the test probabilities span only "
                  f"{low_high[0]:.4f}-{low_high[1]:.4f}, so accuracy at 0.5 says nothing about the "
                  "ranking; the AUC and the figures at the validation-chosen threshold do."]
    lines += [_row("validation", metrics["valid"]), "",
              "Thresholds chosen on the validation split: " + ", ".join(
                  f"sensitivity {k} -> {v:.4f}" for k, v in metrics["thresholds_for_sensitivity"].items())
              + f". Bundle priorities: urgent >= {thresholds['urgent']:.4f}, elevated >= "
              f"{thresholds['elevated']:.4f}.", "",
              "## Next to the thesis", "", "| figure | thesis | this run |", "|---|---|---|",
              f"| final-test accuracy (argmax) | {THESIS['phase 2 final-test accuracy']} (phase 2), "
              f"{THESIS['phase 1 final-test accuracy']} (phase 1) | "
              f"{_pct(metrics['test']['argmax']['accuracy'])} |",
              f"| confusion (none first) | {THESIS['phase 2 confusion (none first)']} | "
              f"`{metrics['test']['argmax']['confusion_matrix']}` |",
              f"| ROC AUC | {THESIS['AUC, sensitivity, specificity']} | {_auc(metrics['test'])} |", "",
              "## Plots", ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    lines.append("")
    paths.report.write_text("\n".join(lines))
