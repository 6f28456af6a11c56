"""Receiving integrity (issue 10): an acknowledged instance is never replaced or lost.

Everything runs against the real `opacityd serve` (or the real receiver in process where a test
needs a full disk), DCMTK storescu as the modality, real chest radiographs, and a second
process holding SQLite's write lock.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import sqlalchemy as sa
from pydicom.uid import UID, generate_uid
from sqlalchemy.orm import Session, joinedload, sessionmaker

from daemon.config import Config, load_config
from daemon.spool import MARKER, Spool
from db import queue
from db.engine import create_db_engine, make_session_factory, read_only, unit_of_work
from db.models import AuditEvent, Instance, Job, Result, Study
from db.states import AuditAction, JobState, StudyState
from tests.conftest import DCMTK_ENV, OPACITYD, STORESCU, mounted_tmpfs, storescu, wait_until
from tests.daemon_process import DaemonProcess, start_daemon

CHEST = "derived/DERIVED_fuji-cr-mono1-10_part10-explicit.dcm"
"""A real CR chest PA, uncompressed, so that a copy with other pixel bytes is easy to make."""
SMALL_CHEST = "siimacr_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
"""A real chest PA, JPEG Baseline (127 KB): storescu sends it with ``-xy``."""
REFUSED = "Refused: OutOfResources"
NO_WORKER = "[worker]\nembedded = false\n"


def _copy(src: Path, dest: Path, *, study: str | None = None, series: str | None = None,
          sop: str | None = None, other_pixels: bool = False, view: str | None = None) -> Path:
    """``src`` with new UIDs where given and, with ``other_pixels``, other pixel bytes."""
    ds = pydicom.dcmread(src)
    if study:
        ds.StudyInstanceUID = study
    if series:
        ds.SeriesInstanceUID = series
    if sop:
        ds.SOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = UID(sop)
    if view:
        ds.ViewPosition = view
    if other_pixels:
        pixels = ds.pixel_array.copy()
        pixels[:32, :32] = np.iinfo(pixels.dtype).max // 2
        ds.PixelData = pixels.tobytes()
    dest.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dest, enforce_file_format=True)
    return dest


def _dataset_hash(path: Path) -> str:
    """sha256 of a Part 10 file's data set bytes (what follows the file meta)."""
    with path.open("rb") as fh:
        pydicom.filereader.read_preamble(fh, False)
        pydicom.filereader._read_file_meta_info(fh)
        return hashlib.sha256(fh.read()).hexdigest()


def _sessions(cfg: Path) -> tuple[Config, sessionmaker[Session]]:
    config = load_config(cfg, env={})
    return config, make_session_factory(create_db_engine(config.database_url))


def _rows(sessions: sessionmaker[Session], sop_uid: str | None = None) -> list[Instance]:
    with read_only(sessions) as s:
        query = sa.select(Instance).options(joinedload(Instance.study)).order_by(Instance.id)
        if sop_uid is not None:
            query = query.where(Instance.sop_instance_uid == sop_uid)
        return list(s.scalars(query))


def _audit(sessions: sessionmaker[Session], action: AuditAction) -> list[dict[str, object]]:
    with read_only(sessions) as s:
        return [json.loads(e.detail or "{}") for e in
                s.scalars(sa.select(AuditEvent).where(AuditEvent.action == action))]


def _metrics(config: Config) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{config.http.port}/metrics", timeout=30) as r:
        return str(r.read().decode())


def _get_json(url: str) -> dict[str, Any]:
    """The JSON body of a GET, whatever its status (/readyz answers 503 with a body)."""
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return dict(json.loads(r.read()))
    except urllib.error.HTTPError as e:
        return dict(json.loads(e.read()))


@contextmanager
def _write_lock_held(database: Path) -> Iterator[None]:
    """Another process holds ``BEGIN EXCLUSIVE`` on the SQLite file until the block ends."""
    script = textwrap.dedent(f"""
        import sqlite3, sys
        conn = sqlite3.connect({str(database)!r}, isolation_level=None)
        conn.execute("BEGIN EXCLUSIVE")
        print("locked", flush=True)
        sys.stdin.read()
        conn.execute("ROLLBACK")
    """)
    holder = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        yield
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)


def _spool_files(config: Config) -> dict[str, bytes]:
    """Every file in the spool but the receiver's mount marker."""
    return {str(p.relative_to(config.spool_dir)): p.read_bytes()
            for p in config.spool_dir.rglob("*") if p.is_file() and p.name != MARKER}


def test_resend_while_another_process_holds_the_database_lock_keeps_the_acknowledged_copy(
        tmp_path: Path, shared_dicom: Path, demo_bundle: Path,
        daemons: list[DaemonProcess]) -> None:
    daemon, cfg = start_daemon(tmp_path, daemons, f"[database]\nbusy_timeout_ms = 300\n{NO_WORKER}",
                               bundle=demo_bundle)
    config, sessions = _sessions(cfg)
    first = _copy(shared_dicom / CHEST, tmp_path / "in" / "first.dcm")
    other = _copy(first, tmp_path / "in" / "other.dcm", other_pixels=True)
    sop_uid = str(pydicom.dcmread(first, stop_before_pixels=True).SOPInstanceUID)
    _, acks = storescu(daemon.port, [first])
    assert acks == {first: "Success"}
    (row,) = _rows(sessions)
    acknowledged = config.spool_dir / str(row.spool_path)
    held = acknowledged.read_bytes()

    with _write_lock_held(Path(config.database_url.removeprefix("sqlite:///"))):
        _, same_ack = storescu(daemon.port, [first])
        _, other_ack = storescu(daemon.port, [other])
        # Reading goes on while the lock is held: none of these takes the write lock.
        assert "opacityd_instances_received_total" in _metrics(config)
        base = f"http://127.0.0.1:{config.http.port}"
        assert _get_json(f"{base}/readyz")["checks"]["database"]["ok"] is True
        assert _get_json(f"{base}/api/v1/worklist")["studies"] == []
        assert len(_get_json(f"{base}/api/v1/studies/{row.study.study_uid}")["instances"]) == 1
        for command in (["worklist", "--json"], ["status"], ["studies"],
                        ["audit", row.study.study_uid], ["deliveries"]):
            proc = subprocess.run([OPACITYD, "--config", str(cfg), *command],
                                  capture_output=True, text=True, timeout=60)
            assert proc.returncode == 0, (command, proc.stderr)

    assert same_ack == {first: REFUSED} and other_ack == {other: REFUSED}
    assert acknowledged.read_bytes() == held
    (after,) = _rows(sessions)
    assert (after.id, after.spool_path, after.content_hash) == (row.id, row.spool_path,
                                                                row.content_hash)
    assert list(_spool_files(config)) == [row.spool_path]  # no temp file, no second copy

    _, acks = storescu(daemon.port, [first])
    assert acks == {first: "Success"}
    (counted,) = _rows(sessions, sop_uid)
    assert counted.receive_count == 2 and acknowledged.read_bytes() == held
    assert 'opacityd_instances_refused_total{reason="database_error"} 2.0' in _metrics(config)


def test_resend_with_other_bytes_under_keep_first_keeps_the_first_copy_and_says_so(
        tmp_path: Path, shared_dicom: Path, demo_bundle: Path,
        daemons: list[DaemonProcess]) -> None:
    daemon, cfg = start_daemon(tmp_path, daemons, NO_WORKER, bundle=demo_bundle)
    config, sessions = _sessions(cfg)
    first = _copy(shared_dicom / CHEST, tmp_path / "in" / "first.dcm")
    other = _copy(first, tmp_path / "in" / "other.dcm", other_pixels=True)
    _, acks = storescu(daemon.port, [first])
    assert acks == {first: "Success"}
    (row,) = _rows(sessions)
    stored = config.spool_dir / str(row.spool_path)
    held = stored.read_bytes()
    assert row.content_hash == _dataset_hash(first) == _dataset_hash(stored)

    _, acks = storescu(daemon.port, [other, first])
    assert acks == {other: "Success", first: "Success"}

    assert stored.read_bytes() == held
    (after,) = _rows(sessions)
    assert (after.version, after.superseded_at, after.receive_count) == (1, None, 2)
    assert list(_spool_files(config)) == [row.spool_path]
    (conflict,) = _audit(sessions, AuditAction.INSTANCE_CONFLICT)
    assert conflict["policy"] == "keep_first" and conflict["kept"] == "held"
    assert conflict["held_hash"] == _dataset_hash(first)[:16]
    assert conflict["received_hash"] == _dataset_hash(other)[:16]
    assert len(_audit(sessions, AuditAction.INSTANCE_DUPLICATE)) == 1
    assert 'opacityd_duplicate_conflicts_total{policy="keep_first"} 1.0' in _metrics(config)


def test_resend_with_other_bytes_under_replace_and_rescore_keeps_both_and_scores_again(
        tmp_path: Path, shared_dicom: Path, demo_bundle: Path,
        daemons: list[DaemonProcess]) -> None:
    daemon, cfg = start_daemon(tmp_path, daemons,
                               'duplicate_policy = "replace_and_rescore"\n'
                               "[worker]\npoll_interval_s = 0.2\n", bundle=demo_bundle)
    config, sessions = _sessions(cfg)
    first = _copy(shared_dicom / CHEST, tmp_path / "in" / "first.dcm")
    other = _copy(first, tmp_path / "in" / "other.dcm", other_pixels=True)

    def results() -> list[Result]:
        with read_only(sessions) as s:
            return list(s.scalars(sa.select(Result).order_by(Result.id)))

    _, acks = storescu(daemon.port, [first])
    assert acks == {first: "Success"}
    wait_until(results, timeout=180, what="the first scoring")
    (v1,) = _rows(sessions)
    first_bytes = (config.spool_dir / str(v1.spool_path)).read_bytes()

    _, acks = storescu(daemon.port, [other])
    assert acks == {other: "Success"}

    old, new = _rows(sessions)
    assert (old.id, old.version, new.version) == (v1.id, 1, 2)
    assert old.superseded_at is not None and new.superseded_at is None
    assert new.content_hash == _dataset_hash(other) != old.content_hash
    assert old.spool_path != new.spool_path
    assert (config.spool_dir / str(old.spool_path)).read_bytes() == first_bytes
    assert _dataset_hash(config.spool_dir / str(new.spool_path)) == new.content_hash
    (conflict,) = _audit(sessions, AuditAction.INSTANCE_CONFLICT)
    assert conflict["policy"] == "replace_and_rescore" and conflict["version"] == 2

    def jobs() -> list[tuple[int, JobState]]:
        with read_only(sessions) as s:
            return [(j.study_revision, j.state) for j in s.scalars(sa.select(Job).order_by(Job.id))]

    wait_until(lambda: jobs() == [(1, JobState.DONE), (2, JobState.DONE)], timeout=180,
               what="the study scored again")
    with read_only(sessions) as s:
        study = s.scalar(sa.select(Study))
    assert study is not None and (study.state, study.revision) == (StudyState.COMPLETE, 2)
    # Other bytes were scored, so the result is another one, with its own SR.
    scored = wait_until(lambda: len(results()) == 2 and results(), what="the second result")
    assert [r.study_revision for r in scored] == [1, 2]
    assert scored[0].sr_sop_instance_uid != scored[1].sr_sop_instance_uid
    assert 'opacityd_duplicate_conflicts_total{policy="replace_and_rescore"} 1.0' in _metrics(config)


def test_a_late_lateral_sent_to_serve_is_recorded_without_reopening_the_study(
        tmp_path: Path, shared_dicom: Path, demo_bundle: Path,
        daemons: list[DaemonProcess]) -> None:
    daemon, cfg = start_daemon(tmp_path, daemons, NO_WORKER, bundle=demo_bundle)
    _, sessions = _sessions(cfg)
    frontal = _copy(shared_dicom / CHEST, tmp_path / "in" / "pa.dcm")
    lateral = _copy(frontal, tmp_path / "in" / "ll.dcm", sop=generate_uid(), view="LL")

    def study() -> tuple[StudyState, int, int]:
        with read_only(sessions) as s:
            row = s.scalar(sa.select(Study))
            assert row is not None
            return row.state, row.revision, len(s.scalars(sa.select(Job)).all())

    _, acks = storescu(daemon.port, [frontal])
    assert acks == {frontal: "Success"}
    wait_until(lambda: study() == (StudyState.COMPLETE, 1, 1), what="the study completed")
    _, acks = storescu(daemon.port, [lateral])
    assert acks == {lateral: "Success"}
    late = _rows(sessions)[-1]
    assert (late.eligible, late.eligibility_reason, late.study_revision) == (
        False, "lateral_view", 1)
    assert study() == (StudyState.COMPLETE, 1, 1)
    assert _audit(sessions, AuditAction.STUDY_REOPENED) == []
    (received,) = [d for d in _audit(sessions, AuditAction.INSTANCE_RECEIVED)
                   if d["reason"] == "lateral_view"]
    assert received["reopened"] is False


_POLLER = textwrap.dedent("""
    import os, subprocess, sys, time, urllib.request
    kind, target, stop, report = sys.argv[1:5]
    ok = failed = 0
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if kind == "metrics":
                with urllib.request.urlopen(target, timeout=30) as r:
                    good = r.status == 200 and b"opacityd_studies" in r.read()
            else:
                proc = subprocess.run([sys.argv[5], "--config", target, "worklist", "--json"],
                                      capture_output=True, timeout=60)
                good = proc.returncode == 0
        except Exception:  # the poll's boundary: any failure is counted as a failed poll
            good = False
        ok, failed = ok + good, failed + (not good)
        with open(report + ".tmp", "w") as fh:  # renamed into place: never read half-written
            fh.write(f"{ok} {failed}")
        os.replace(report + ".tmp", report)
        try:
            open(stop).close()
            break
        except FileNotFoundError:
            pass
""")


def _poll_counts(report: Path) -> tuple[int, int]:
    try:
        ok, failed = report.read_text().split()
    except (FileNotFoundError, ValueError):
        return (0, 0)  # not written yet
    return int(ok), int(failed)


def test_streaming_300_instances_while_metrics_and_the_worklist_are_polled_refuses_none(
        tmp_path: Path, shared_dicom: Path, demo_bundle: Path,
        daemons: list[DaemonProcess]) -> None:
    daemon, cfg = start_daemon(tmp_path, daemons, NO_WORKER, bundle=demo_bundle)
    config, sessions = _sessions(cfg)
    source = shared_dicom / SMALL_CHEST
    files: list[list[Path]] = []
    for group in range(3):
        batch = []
        for n in range(10):
            study = generate_uid()
            series = generate_uid()
            batch += [_copy(source, tmp_path / "in" / f"{group}" / f"{n}_{i}.dcm", study=study,
                            series=series, sop=generate_uid()) for i in range(10)]
        files.append(batch)
    stop = tmp_path / "stop"
    reports = {"metrics": tmp_path / "metrics.report", "worklist": tmp_path / "worklist.report"}
    targets = {"metrics": f"http://127.0.0.1:{config.http.port}/metrics", "worklist": str(cfg)}
    pollers = [subprocess.Popen([sys.executable, "-c", _POLLER, kind, targets[kind], str(stop),
                                 str(reports[kind]), OPACITYD]) for kind in reports]
    try:
        wait_until(lambda: all(_poll_counts(r)[0] for r in reports.values()), timeout=120,
                   what="both pollers to answer once")
        senders = [subprocess.Popen(
            [STORESCU, "-v", "-xy", "-aet", "MODALITY", "-aec", "OPACITYD", "127.0.0.1",
             str(daemon.port), *map(str, batch)], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, env=DCMTK_ENV) for batch in files]
        before = _poll_counts(reports["metrics"])[0]
        outputs = [s.communicate(timeout=300)[0] for s in senders]
        during = _poll_counts(reports["metrics"])[0] - before
        stop.touch()
        for p in pollers:
            p.wait(timeout=120)
    finally:
        stop.touch()
        for p in pollers:
            if p.poll() is None:
                p.kill()
    statuses = [line for out in outputs for line in out.splitlines()
                if "Received Store Response" in line]
    assert len(statuses) == 300 and all("(Success)" in line for line in statuses), \
        ([line for line in statuses if "(Success)" not in line][:5], outputs[0][-1500:])
    assert len(_rows(sessions)) == 300
    assert "opacityd_instances_refused_total{" not in _metrics(config)
    assert during > 0  # /metrics was scraped while the instances streamed in
    for kind, report in reports.items():
        ok, failed = _poll_counts(report)
        assert ok > 0 and failed == 0, (kind, ok, failed)


def test_disk_full_on_a_resend_leaves_the_acknowledged_copy_and_no_temp_file(
        tmp_path: Path, shared_dicom: Path, demo_bundle: Path,
        daemons: list[DaemonProcess]) -> None:
    with mounted_tmpfs(tmp_path / "d" / "state" / "spool", "4m") as spool:
        daemon, cfg = start_daemon(tmp_path, daemons, f"min_free_disk_mb = 0\n{NO_WORKER}",
                                   bundle=demo_bundle)
        config, sessions = _sessions(cfg)
        assert config.spool_dir == spool
        first = _copy(shared_dicom / CHEST, tmp_path / "in" / "first.dcm")
        other = _copy(first, tmp_path / "in" / "other.dcm", other_pixels=True)
        _, acks = storescu(daemon.port, [first])
        assert acks == {first: "Success"}
        (row,) = _rows(sessions)
        held = (spool / str(row.spool_path)).read_bytes()

        filler = spool / "filler"
        with filler.open("wb") as fh:
            with pytest.raises(OSError, match="No space left"):
                while True:
                    fh.write(b"\0" * 65536)
                    fh.flush()
        _, acks = storescu(daemon.port, [first, other], "--no-halt")
        assert acks == {first: REFUSED, other: REFUSED}
        assert (spool / str(row.spool_path)).read_bytes() == held
        assert sorted(_spool_files(config)) == sorted([str(row.spool_path), "filler"])

        filler.unlink()
        _, acks = storescu(daemon.port, [first])
        assert acks == {first: "Success"}
        (after,) = _rows(sessions)
        assert after.receive_count == 2 and (spool / str(row.spool_path)).read_bytes() == held
        assert daemon.terminate() == 0


def _record(study: str, sop: str, *, eligible: bool = True) -> queue.InstanceRecord:
    return queue.InstanceRecord(
        study_uid=study, series_uid=f"{study}.1", sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1", transfer_syntax_uid="1.2.840.10008.1.2.1",
        modality="CR", body_part="CHEST", view_position="PA" if eligible else "LL",
        accession_number=None, eligible=eligible,
        eligibility_reason="eligible" if eligible else "lateral_view", spool_path=f"{sop}.dcm",
        size_bytes=10, calling_ae="TEST", content_hash=hashlib.sha256(sop.encode()).hexdigest())


@pytest.fixture
def sessions(database_url: str) -> Iterator[sessionmaker[Session]]:
    """A migrated database on each engine (tests/conftest.py: ``database_url``)."""
    from db import migrate

    engine = create_db_engine(database_url)
    migrate.upgrade(engine)
    yield make_session_factory(engine)
    engine.dispose()


NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
QUIET = timedelta(seconds=1)


def _close(sessions: sessionmaker[Session], at: datetime) -> list[queue.Completion]:
    with unit_of_work(sessions) as s:
        return queue.complete_quiet_studies(s, QUIET, at)


def test_a_late_lateral_is_recorded_without_reopening_but_a_late_frontal_reopens(
        sessions: sessionmaker[Session]) -> None:
    with unit_of_work(sessions) as s:
        queue.record_instance(s, _record("1.1", "1.1.1"), NOW)
    (done,) = _close(sessions, NOW + QUIET)
    assert done.state is StudyState.COMPLETE
    with unit_of_work(sessions) as s:
        late = queue.record_instance(s, _record("1.1", "1.1.2", eligible=False), NOW + 10 * QUIET)
    assert late.outcome is queue.StoreOutcome.NEW and not late.reopened
    assert _close(sessions, NOW + 20 * QUIET) == []
    with read_only(sessions) as s:
        study = s.scalar(sa.select(Study))
        assert study is not None
        assert (study.state, study.revision, study.last_received_at) == (
            StudyState.COMPLETE, 1, NOW)
        assert s.scalar(sa.select(sa.func.count()).select_from(Instance)) == 2
    with unit_of_work(sessions) as s:
        frontal = queue.record_instance(s, _record("1.1", "1.1.3"), NOW + 30 * QUIET)
    assert frontal.reopened
    (again,) = _close(sessions, NOW + 40 * QUIET)
    assert (again.state, again.revision) == (StudyState.COMPLETE, 2)


def test_a_study_whose_images_retention_purged_is_not_queued_to_fail_again(
        sessions: sessionmaker[Session]) -> None:
    with unit_of_work(sessions) as s:
        queue.record_instance(s, _record("2.1", "2.1.1"), NOW)
        s.execute(sa.update(Instance).values(purged_at=NOW))
    (done,) = _close(sessions, NOW + QUIET)
    assert (done.state, done.job_id) == (StudyState.IGNORED, None)


def test_replacing_an_eligible_copy_by_an_ineligible_one_reopens_but_queues_nothing(
        sessions: sessionmaker[Session]) -> None:
    with unit_of_work(sessions) as s:
        queue.record_instance(s, _record("3.1", "3.1.1"), NOW)
    _close(sessions, NOW + QUIET)
    lateral = dataclasses.replace(_record("3.1", "3.1.1", eligible=False), content_hash="f" * 64)
    with unit_of_work(sessions) as s:
        stored = queue.record_instance(s, lateral, NOW + 10 * QUIET, policy="replace_and_rescore",
                                       place=lambda version: f"3.1.1.v{version}.dcm")
    assert (stored.outcome, stored.version, stored.spool_path, stored.reopened) == (
        queue.StoreOutcome.NEW_VERSION, 2, "3.1.1.v2.dcm", True)
    (done,) = _close(sessions, NOW + 20 * QUIET)
    assert (done.state, done.revision, done.job_id) == (StudyState.IGNORED, 2, None)


def test_placing_a_file_never_replaces_one_that_holds_its_name(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    ids = ("1.2", "1.2.3", "1.2.3.4")
    names = []
    for version, content in ((1, b"first"), (2, b"second")):
        temp = tmp_path / f".incoming-{version}.partial"
        temp.write_bytes(content)
        names.append(spool.place(temp, *ids, version=version))
        spool.discard(temp)
    first, second = names
    assert first == "1.2/1.2.3/1.2.3.4.dcm" and second.startswith("1.2/1.2.3/1.2.3.4.v2.")
    assert (tmp_path / first).read_bytes() == b"first"
    assert (tmp_path / second).read_bytes() == b"second"
    assert sorted(p.name for p in (tmp_path / "1.2" / "1.2.3").iterdir()) == sorted(
        Path(n).name for n in names)
