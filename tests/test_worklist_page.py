"""The worklist pages in a real browser: headless Debian chromium against a real `opacityd serve`
(embedded worker, demo bundle) that scored the real files in ../shared/data/dicom plus a study
of laterals only and a study whose only image is refused, delivering to a DCMTK PACS.

Checks the rendered DOM (levels and counts against /api/v1/worklist, refusal reasons, the level
filter, the 404 page, no identifier when hidden and the study UID when shown) and takes a
screenshot of each page into tmp_path, and into $OPACITYD_SCREENSHOTS when that names a folder
(docs/worklist.png and docs/study.png come from there).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import sqlalchemy as sa

from daemon.config import load_config
from db.engine import create_db_engine, make_session_factory, unit_of_work
from db.models import Delivery, Job, Study
from db.states import DeliveryState, JobState, StudyState
from tests.conftest import Pacs, free_port, storescu, wait_until
from tests.daemon_process import DaemonProcess, start_daemon
from tests.factories import SENTINEL_PHI, make_dx

CHROMIUM = "/usr/bin/chromium"
FUJI = "fodicom_CR-MONO1-10-chest.dcm"
# storescu proposes one compressed family per run (../shared/RECIPES.md)
FAMILIES = {"1.2.840.10008.1.2.4.50": "-xy", "1.2.840.10008.1.2.4.90": "-xv",
            "1.2.840.10008.1.2.5": "-xr", "1.2.840.10008.1.2.1.99": "-xd"}
SCORED_LEVELS = ("urgent", "elevated", "routine", "not_analysable")


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Pacs]:
    p = Pacs(tmp_path / "pacs", free_port()).start()
    yield p
    p.stop()


def _config(pacs: Pacs, worker: str) -> str:
    return (f'[[destinations]]\nname = "pacs"\nhost = "127.0.0.1"\nport = {pacs.port}\n'
            'called_ae = "PACS"\ncalling_ae = "OPACITYD"\n'
            '[delivery]\npoll_interval_s = 0.2\nretry_base_s = 0.5\nretry_max_s = 2.0\n'
            f'[worker]\npoll_interval_s = 0.2\nlease_s = 10.0\n{worker}')


def _inputs(shared_dicom: Path, folder: Path) -> tuple[list[Path], Path, list[Path]]:
    """The real files (the bare Fuji data set given a file meta header so storescu can send it),
    a one-pixel-wide PA image (refused by the worker) and a study of two laterals."""
    folder.mkdir(parents=True, exist_ok=True)
    real = [p for p in sorted(shared_dicom.rglob("*.dcm")) if p.name != FUJI]
    fuji = pydicom.dcmread(shared_dicom / FUJI, force=True)
    fuji.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    fuji.save_as(folder / FUJI, enforce_file_format=True)
    narrow = folder / "one-pixel-wide.dcm"
    make_dx(64, 1, phi=SENTINEL_PHI).save_as(narrow, enforce_file_format=True)
    study_uid = pydicom.uid.generate_uid()
    laterals = []
    for n in range(2):
        path = folder / f"lateral{n}.dcm"
        make_dx(64, 64, study_uid=study_uid, view="LL", seed=n, phi=SENTINEL_PHI).save_as(
            path, enforce_file_format=True)
        laterals.append(path)
    return [folder / FUJI, *real], narrow, laterals


def _send(port: int, files: list[Path]) -> dict[Path, str]:
    """Each file in a run that proposes its transfer syntax; returns every file's response."""
    by_flag: dict[str, list[Path]] = {}
    for path in files:
        syntax = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        by_flag.setdefault(FAMILIES.get(syntax, ""), []).append(path)
    acks: dict[Path, str] = {}
    for flag, group in by_flag.items():
        acks.update(storescu(port, group, *([flag] if flag else []))[1])
    return acks


def _settled(cfg: Path, expected_results: int) -> bool:
    """Every study closed, every job finished, each delivery delivered, and as many studies
    scored as expected."""
    engine = create_db_engine(load_config(cfg, env={}).database_url)
    try:
        with unit_of_work(make_session_factory(engine)) as s:
            receiving = s.scalar(sa.select(sa.func.count()).where(Study.state == StudyState.RECEIVING))
            busy = s.scalar(sa.select(sa.func.count()).where(
                Job.state.in_([JobState.QUEUED, JobState.RUNNING])))
            undelivered = s.scalar(sa.select(sa.func.count()).where(
                Delivery.state != DeliveryState.DELIVERED))
            scored = s.scalar(sa.select(sa.func.count(sa.distinct(Job.study_id))).where(
                Job.state == JobState.DONE))
        return receiving == 0 and busy == 0 and undelivered == 0 and scored == expected_results
    finally:
        engine.dispose()


def _api(base: str, path: str) -> dict[str, object]:
    with urllib.request.urlopen(f"{base}{path}", timeout=10) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def _chromium(tmp_path: Path, url: str, screenshot: Path | None = None) -> str:
    """The DOM chromium renders at ``url``, or (with ``screenshot``) a PNG of the page there;
    a fresh profile each time."""
    profile = tmp_path / "chromium" / uuid.uuid4().hex
    mode = [f"--screenshot={screenshot}", "--window-size=1280,1200"] if screenshot else ["--dump-dom"]
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                           f"--user-data-dir={profile}", "--hide-scrollbars", *mode, url],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if screenshot:
        assert screenshot.stat().st_size > 10_000, "an empty screenshot"
    return proc.stdout


def _counts(dom: str) -> dict[str, int]:
    return {level: int(n) for level, n in
            re.findall(r'<span class="count" data-level="(\w+)">(\d+)</span>', dom)}


def _rows(dom: str) -> Counter[str]:
    return Counter(re.findall(r'<tr class="study" data-level="(\w+)">', dom))


def _keep(path: Path, name: str) -> None:
    folder = os.environ.get("OPACITYD_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(folder) / name)


def test_worklist_and_study_pages_in_chromium_after_scoring_the_real_files(
        tmp_path: Path, shared_dicom: Path, demo_bundle: Path, pacs: Pacs,
        daemons: list[DaemonProcess]) -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed (scripts/setup.sh installs it)")
    real, narrow, laterals = _inputs(shared_dicom, tmp_path / "in")
    daemon, cfg = start_daemon(tmp_path / "hidden", daemons, _config(pacs, ""), bundle=demo_bundle,
                               quiet_s=1.0)
    base = f"http://127.0.0.1:{load_config(cfg, env={}).http.port}"
    acks = _send(daemon.port, [*real, narrow, *laterals])
    assert len(acks) == len(real) + 3 and acks[narrow] == "Success"

    # Fuji, NIH, SIIM, the Orthanc image and the veterinary thorax (its header does not say
    # it is not human) are scored, and the one-pixel-wide study is not analysable; the study
    # of laterals is never eligible.
    wait_until(lambda: _settled(cfg, 6), timeout=150, interval=0.5, what="all studies scored and delivered")
    api = _api(base, "/api/v1/worklist")["studies"]
    assert isinstance(api, list) and len(api) == 6
    api_levels = Counter(str(e["priority"]) for e in api)

    shots = tmp_path / "screenshots"
    shots.mkdir()
    dom = _chromium(tmp_path, f"{base}/")
    assert _counts(dom) == {level: api_levels.get(level, 0) for level in SCORED_LEVELS}
    assert _rows(dom) == api_levels
    for level in SCORED_LEVELS:
        assert f'id="level-{level}"' in dom
    assert "Not scored: none of its images is eligible." in dom
    assert "A lateral view: only frontal views are scored." in dom
    _chromium(tmp_path, f"{base}/", shots / "worklist.png")
    _keep(shots / "worklist.png", "worklist.png")

    # the refused image's reason on its study page, reached by the worklist's link
    narrow_uid = pydicom.dcmread(narrow, stop_before_pixels=True).StudyInstanceUID
    narrow_number = _api(base, f"/api/v1/studies/{narrow_uid}")["study"]
    assert f'href="/studies/{narrow_number}"' in dom
    refused = _chromium(tmp_path, f"{base}/studies/{narrow_number}")
    assert "Refused: The pixel data are damaged, or the image size is invalid" in refused
    assert "corrupt_pixel_data" in refused and "Not analysable" in refused

    fuji_uid = pydicom.dcmread(real[0], stop_before_pixels=True).StudyInstanceUID
    fuji_number = _api(base, f"/api/v1/studies/{fuji_uid}")["study"]
    fuji = _chromium(tmp_path, f"{base}/studies/{fuji_number}")
    assert fuji.count("<tr><td>image ") >= 4 and "Audit timeline" in fuji
    assert re.search(r"<td>pacs</td><td>sr</td><td><span class=\"badge delivered\">", fuji)
    # the worker's previews of the summary image, served from the spool
    previews = re.findall(r'<img src="(/studies/\d+/results/\d+/(?:input|heatmap)\.png)"', fuji)
    assert len(previews) == 2, "no network-input and heatmap previews on the study page"
    for src in previews:
        with urllib.request.urlopen(f"{base}{src}", timeout=10) as response:
            assert response.headers["Content-Type"] == "image/png"
            assert response.read().startswith(b"\x89PNG")
    _chromium(tmp_path, f"{base}/studies/{fuji_number}", shots / "study.png")
    _keep(shots / "study.png", "study.png")

    # the level filter, as the form submits it
    only = _chromium(tmp_path, f"{base}/?level=not_analysable&since=24h")
    assert _rows(only) == Counter({"not_analysable": api_levels["not_analysable"]})
    assert 'id="level-routine"' not in only and f'href="/studies/{narrow_number}"' in only
    missing = _chromium(tmp_path, f"{base}/studies/987654321")
    assert "<h1>Not found</h1>" in missing

    # nothing identifying anywhere while identifiers are hidden
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in [*real, narrow, *laterals]]
    secrets = {str(h.StudyInstanceUID) for h in headers}
    for h in headers:
        secrets |= {str(h.get(k) or "") for k in ("PatientName", "PatientID", "AccessionNumber")}
    secrets = {s for s in secrets if len(s) >= 5 and s not in ("None", "Anonymized")}
    pages = [dom, refused, fuji, only]
    for page in pages:
        leaked = sorted(s for s in secrets if s in page)
        assert leaked == []
    assert "Anonymized" not in fuji and "SENTINELNAME" not in refused

    # a second serve on the same state with identifiers shown: the study UID appears
    shown, _ = start_daemon(tmp_path / "shown", daemons,
                            _config(pacs, "embedded = false\n[worklist]\nshow_identifiers = true\n"),
                            bundle=demo_bundle, state_dir=tmp_path / "hidden" / "d" / "state")
    shown_base = f"http://127.0.0.1:{load_config(tmp_path / 'shown' / 'd' / 'config.toml', env={}).http.port}"
    assert str(fuji_uid) in _chromium(tmp_path, f"{shown_base}/")
    fuji_shown = _chromium(tmp_path, f"{shown_base}/studies/{fuji_number}")
    assert str(fuji_uid) in fuji_shown and "FUJI95714" in fuji_shown
    assert shown.terminate() == 0 and daemon.terminate() == 0
