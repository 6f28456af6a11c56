"""`status`: where a run stands, read from its files only (no Keras, safe while it trains)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from training.config import load_config
from training.run import RunPaths
from training.state import read_state


def _prepared(paths: RunPaths) -> str:
    if not paths.config.is_file():
        if paths.data.exists():
            return "prepare: not finished (interrupted or failed); run prepare again into this folder"
        return "prepare: not run"
    with paths.summary.open(newline="") as fh:
        total = next(r for r in csv.DictReader(fh) if r["source"] == "ALL")
    with paths.problems.open(newline="") as fh:
        problems = sum(1 for _ in csv.DictReader(fh))
    return (f"prepared: {total['images']} images, {total['opacity_percent']} % opacity "
            f"(train {total['train']} / valid {total['valid']} / test {total['test']}); "
            f"{problems} problems in {paths.problems.name}")


def _auc(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "n/a"


def _phase(paths: RunPaths, number: int, epochs: int) -> str:
    if epochs == 0:
        return f"phase {number}: not configured (epochs = 0)"
    if paths.done(number).is_file():
        done = json.loads(paths.done(number).read_text())
        return (f"phase {number}: done, {done['epochs_run']}/{epochs} epochs, best val_auc "
                f"{_auc(done['best_val_auc'])}, {done['images_per_second']} training images/s")
    state = read_state(paths.phase(number))
    if state is None:
        return f"phase {number}: not started"
    best = state.best_epoch()
    at = f" (epoch {best + 1})" if best is not None else ""
    return (f"phase {number}: {state.epochs_done}/{epochs} epochs committed, best val_auc "
            f"{_auc(state.best_val_auc)}{at}; running, or interrupted (fit resumes it)")


def _evaluated(paths: RunPaths) -> str:
    if not paths.metrics.is_file():
        return "evaluation: not run"
    test = json.loads(paths.metrics.read_text())["test"]
    interval = test.get("auc_95ci")
    ci = f" (95 % CI {interval[0]:.3f}-{interval[1]:.3f})" if interval else ""
    return (f"evaluated: final test {test['images']} images, AUC {_auc(test['auc'])}{ci}, "
            f"accuracy {test['argmax']['accuracy']:.4f}; {paths.report}")


def _last_log_line(log: Path) -> str | None:
    if not log.is_file():
        return None
    lines = log.read_text().splitlines()
    return f"last fit.log line: {lines[-1]}" if lines else None


def status_lines(paths: RunPaths) -> list[str]:
    lines = [f"run {paths.root}", _prepared(paths)]
    if paths.config.is_file():
        config = load_config(paths.config)
        lines += [_phase(paths, 1, config.phase1.epochs), _phase(paths, 2, config.phase2.epochs),
                  _evaluated(paths)]
        last = _last_log_line(paths.root / "fit.log")
        if last:
            lines.append(last)
    return lines
