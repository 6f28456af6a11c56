"""`python -m training` (or `opacityd-train`): prepare, fit, evaluate, export, or all four;
`status` shows where a run stands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model.durable import write_text_durably
from model.errors import BundleError, WeightsUnavailable
from training.config import ConfigError, load_config
from training.records import LayoutError
from training.run import RunPaths, run_config
from training.state import ResumeError

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opacityd-train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    prepare = sub.add_parser("prepare", help="read the datasets, cache the images, split; writes RUN/data")
    prepare.add_argument("--config", type=Path, help="training TOML (default: training/default.toml)")
    prepare.add_argument("--run", type=Path, required=True, help="run folder to create")
    for name, text in (("fit", "train phase 1 and phase 2 (resumes an interrupted run)"),
                       ("evaluate", "metrics, thresholds, plots and report.md on the final test"),
                       ("status", "where a run stands: prepared, epochs committed, evaluated")):
        command = sub.add_parser(name, help=text)
        command.add_argument("--run", type=Path, required=True)
    export = sub.add_parser("export", help="write a model bundle the daemon serves")
    everything = sub.add_parser("all", help="prepare, fit, evaluate and export in one go")
    everything.add_argument("--config", type=Path)
    for command in (export, everything):
        command.add_argument("--run", type=Path, required=True)
        command.add_argument("--bundle", type=Path, required=True)
        command.add_argument("--name", default="opacity-xception")
        command.add_argument("--version", required=True)
    return parser


def _prepare(config_path: Path | None, paths: RunPaths) -> None:
    from training.prepare import prepare

    config = load_config(config_path)
    if paths.config.exists():
        raise ConfigError(f"{paths.root} already holds a run; choose a new --run folder")
    paths.root.mkdir(parents=True, exist_ok=True)
    prepared = prepare(config, paths)
    # Written last and durably: a run folder with config.toml is a finished prepare, and a
    # prepare killed before it can be run again into the same folder.
    write_text_durably(paths.config, config.text)
    print(paths.summary.read_text(), end="")
    print(f"{len(prepared.problems)} problems listed in {paths.problems}")
    for note in prepared.notes:
        print(f"note: {note}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    paths = RunPaths(args.run)
    try:
        if args.command == "status":
            from training.status import status_lines

            print("\n".join(status_lines(paths)))
        if args.command in ("prepare", "all"):
            _prepare(args.config, paths)
        if args.command in ("fit", "all"):
            from training.fit import fit

            fit(run_config(paths), paths)
        if args.command in ("evaluate", "all"):
            from training.evaluate import evaluate

            metrics = evaluate(run_config(paths), paths)
            test = metrics["test"]
            print(f"final test: {test['images']} images, accuracy {test['argmax']['accuracy']:.4f}, "
                  f"AUC {test['auc']}; report {paths.report}")
        if args.command in ("export", "all"):
            from training.export import export

            manifest = export(run_config(paths), paths, args.bundle, args.name, args.version)
            print(f"wrote bundle {args.bundle}: {manifest.label}")
    except (ConfigError, LayoutError) as e:
        print(f"opacityd-train: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, ValueError, WeightsUnavailable, BundleError, ResumeError) as e:
        print(f"opacityd-train: {e}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK
