"""A short, fixed-seed fuzzing run of the receiver (the long one: `python -m bench.fuzz`).

Mutated copies of real files go out as raw bytes in C-STOREs, mutated PDUs over raw sockets;
every C-STORE gets a status, the daemon keeps answering C-ECHO and never exits.
"""

from __future__ import annotations

from pathlib import Path

from bench.fuzz import fuzz
from tests.daemon_process import DaemonProcess, start_daemon


def test_mutated_data_sets_and_pdus_get_answers_and_the_daemon_keeps_serving(
        tmp_path: Path, daemons: list[DaemonProcess], demo_bundle: Path, shared_dicom: Path) -> None:
    daemon, _ = start_daemon(tmp_path, daemons, "[worker]\nembedded = false\n", bundle=demo_bundle)
    assert daemon.proc is not None
    proc = daemon.proc
    report = fuzz(daemon.port, sorted(shared_dicom.glob("*.dcm")), tmp_path / "fuzz", seed=20261203,
                  datasets=120, pdus=120, alive=lambda: proc.poll() is None, hold_fraction=0.0)
    assert report.findings == [], report.summary()
    answered = sum(n for name, n in report.outcomes.items() if name.startswith("0x"))
    assert answered >= 100, report.summary()
