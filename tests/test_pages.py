"""The worklist pages at the WSGI level (no browser, no sockets): escaping, headers, identifiers,
preview files, and odd data (no result, failed jobs, refused images, laterals only, unknown or
huge ids) that must give a readable page, never a 500. Rows come from the real queue functions
on a real SQLite file; the browser test is tests/test_worklist_page.py."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from daemon.config import load_config
from daemon.disk import DiskGuard
from daemon.spool import Spool
from daemon.web.health import Check, Health
from daemon.web.http_api import HttpApi
from daemon.web.metrics import Metrics
from db import jobs, migrate, queue
from db.engine import create_db_engine, make_session_factory, unit_of_work
from db.jobs import FailureReason
from db.states import AuditAction
from tests.conftest import write_config

NOW = datetime.now(UTC)
SCRIPT = "<script>alert(1)</script>"
ROOT = "1.2.826.0.1.3680043.8.498.4242"


@dataclass
class Site:
    sessions: sessionmaker[Session]
    spool: Spool
    folder: Path


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    config = load_config(write_config(tmp_path / "base"), env={})
    engine = create_db_engine(config.database_url)
    migrate.upgrade(engine)
    yield Site(make_session_factory(engine), Spool(config.spool_dir), tmp_path / "base")
    engine.dispose()


def _api(site: Site, tmp_path: Path, extra: str = "") -> HttpApi:
    """An HttpApi over ``site``'s state folder with ``extra`` config (never started: the tests
    call its WSGI app)."""
    state = site.folder / "state"
    path = tmp_path / f"cfg-{len(extra)}" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'[paths]\nstate_dir = "{state}"\n{extra}\n')
    config = load_config(path, env={})
    health = Health(site.sessions, DiskGuard(tmp_path, 0), lambda: True, lambda: True,
                    lambda: Check(True, "test"))
    return HttpApi(config, site.sessions, health, Metrics(site.sessions))


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()


def get(api: HttpApi, path: str, query: str = "", token: str | None = None) -> Response:
    captured: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        captured.update(status=int(status.split()[0]), headers=dict(headers))

    environ = {"PATH_INFO": path, "QUERY_STRING": query, "REQUEST_METHOD": "GET"}
    if token:
        environ["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    body = b"".join(api.app(environ, start_response))
    return Response(captured["status"], captured["headers"], body)


def _receive(site: Site, n: int, *, view: str = "PA", eligible: bool = True,
             reason: str = "eligible", accession: str = "") -> tuple[str, str]:
    study_uid, sop_uid = f"{ROOT}.{n}", f"{ROOT}.{n}.1"
    relative = site.spool.relative_path(study_uid, f"{study_uid}.0", sop_uid)
    site.spool.write(relative, [b"x" * 10])
    record = queue.InstanceRecord(
        study_uid=study_uid, series_uid=f"{study_uid}.0", sop_instance_uid=sop_uid,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", transfer_syntax_uid="1.2.840.10008.1.2.1",
        modality="DX", body_part="CHEST", view_position=view, accession_number=accession or None,
        eligible=eligible, eligibility_reason=reason, spool_path=relative, size_bytes=10,
        calling_ae="MODALITY")
    with unit_of_work(site.sessions) as s:
        queue.record_instance(s, record, NOW - timedelta(minutes=10))
    with unit_of_work(site.sessions) as s:
        queue.complete_quiet_studies(s, timedelta(seconds=1), NOW - timedelta(minutes=9))
    return study_uid, sop_uid


def _claim(site: Site) -> jobs.ClaimedJob:
    with unit_of_work(site.sessions) as s:
        (claimed,) = jobs.claim_jobs(s, "test", timedelta(minutes=5), NOW - timedelta(minutes=8), 1)
    return claimed


def _score(site: Site, n: int, probability: float | None, priority: str, detail_for: Any,
           accession: str = "") -> str:
    """A study received, claimed and scored; ``detail_for(sop_uid)`` gives the result detail."""
    study_uid, sop_uid = _receive(site, n, accession=accession)
    claimed = _claim(site)
    record = jobs.ResultRecord(
        model_name="m", model_version="1", model_validated=False, probability=probability,
        decision=None if probability is None else probability >= 0.5, threshold=0.5,
        urgent_threshold=0.9, elevated_threshold=0.6, priority=priority, inference_seconds=0.1,
        sr_sop_instance_uid=f"{study_uid}.99", sr_series_uid=f"{study_uid}.98",
        sr_path=f"sr/{study_uid}/x.dcm", detail=detail_for(sop_uid))
    with unit_of_work(site.sessions) as s:
        jobs.finish_job(s, claimed, "test", record, ["pacs"], NOW - timedelta(minutes=7))
    return study_uid


def _png(path: Path) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8, 8), 128).save(buffer, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def test_a_script_in_a_refusal_reason_or_an_audit_detail_is_escaped(site: Site, tmp_path: Path) -> None:
    uid = _score(site, 1, None, "not_analysable",
                 lambda sop: {"images": {sop: {"refused": SCRIPT, "notes": [SCRIPT]}}})
    with unit_of_work(site.sessions) as s:
        queue.audit(s, AuditAction.OPERATOR_COMMAND, "<b>admin</b>", NOW, study_uid=uid, note=SCRIPT)
    api = _api(site, tmp_path)
    page = get(api, "/studies/1")
    assert page.status == 200, page.text
    assert SCRIPT not in page.text and "<b>admin</b>" not in page.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    assert "&lt;b&gt;admin&lt;/b&gt;" in page.text
    assert "<script" not in page.text.lower()  # the pages carry no script at all


def test_pages_send_a_strict_content_security_policy_and_nosniff(site: Site, tmp_path: Path) -> None:
    _score(site, 1, 0.2, "routine", lambda sop: {"images": {sop: {"probability": 0.2}}})
    api = _api(site, tmp_path)
    for path in ("/", "/studies/1", "/studies/404", "/nowhere"):
        response = get(api, path)
        csp = response.headers["Content-Security-Policy"]
        assert csp.startswith("default-src 'none'; img-src 'self'; style-src 'unsafe-inline'"), path
        assert response.headers["X-Content-Type-Options"] == "nosniff", path
        assert response.headers["Content-Type"] == "text/html; charset=utf-8", path
    assert get(api, "/").status == 200 and get(api, "/nowhere").status == 404


def test_identifiers_appear_only_when_configured(site: Site, tmp_path: Path) -> None:
    uid = _score(site, 1, 0.95, "urgent", lambda sop: {"images": {sop: {"probability": 0.95}}},
                 accession="ACC777")
    hidden, shown = _api(site, tmp_path), _api(site, tmp_path, "[worklist]\nshow_identifiers = true")
    for path in ("/", "/studies/1"):
        assert uid not in get(hidden, path).text and "ACC777" not in get(hidden, path).text, path
        assert uid in get(shown, path).text and "ACC777" in get(shown, path).text, path
    # the SOP Instance UID (as a key of the refusal map and of the audit rows) is hidden too
    assert f"{uid}.1" not in get(hidden, "/studies/1").text
    assert "image 1" in get(hidden, "/studies/1").text
    # a study reached by its UID still shows no UID when hidden
    assert get(hidden, f"/studies/{uid}").status == 200 and uid not in get(hidden, f"/studies/{uid}").text


def test_worklist_groups_counts_and_filters_by_level_and_time(site: Site, tmp_path: Path) -> None:
    _score(site, 1, 0.95, "urgent", lambda sop: {"images": {sop: {"probability": 0.95}}})
    _score(site, 2, 0.2, "routine", lambda sop: {"images": {sop: {"probability": 0.2}}})
    _score(site, 3, 0.3, "routine", lambda sop: {"images": {sop: {"probability": 0.3}}})
    api = _api(site, tmp_path)
    page = get(api, "/").text
    assert '<span class="count" data-level="urgent">1</span>' in page
    assert '<span class="count" data-level="routine">2</span>' in page
    assert '<span class="count" data-level="elevated">0</span>' in page
    assert "95.0 %" in page and "opacity likely" in page
    assert 'sr <span aria-hidden="true">…</span> pending' in page
    routine = get(api, "/", "level=routine").text
    assert 'href="/studies/2"' in routine and 'href="/studies/3"' in routine
    assert 'href="/studies/1"' not in routine
    assert 'href="/studies/1"' not in get(api, "/", "since=1m").text  # all arrived 10 min ago
    assert 'href="/studies/1"' in get(api, "/", "since=1h").text
    bad = get(api, "/", "level=%3Cscript%3E")
    assert bad.status == 400 and "Unknown level" in bad.text and SCRIPT[:8] not in bad.text
    assert get(api, "/", "since=yesterday-ish").status == 400


def test_study_pages_for_odd_data_are_readable_never_500(site: Site, tmp_path: Path) -> None:
    _receive(site, 1, view="LL", eligible=False, reason="lateral_view")      # study 1: laterals only
    _receive(site, 2)                                                         # study 2: job fails
    with unit_of_work(site.sessions) as s:
        jobs.fail_job(s, _claim(site), "test", "boom", transient=False, now=NOW, max_attempts=3,
                      retry_in=timedelta(seconds=1), reason=FailureReason.INFERENCE_ERROR)
    _score(site, 3, None, "not_analysable",                                   # study 3: refused
           lambda sop: {"images": {sop: {"refused": "corrupt_pixel_data"}}})
    _score(site, 4, 0.4, "routine", lambda sop: {"images": {sop: {}}, "summary": "nonsense"})  # odd
    _receive(site, 5)                                                         # study 5: queued
    api = _api(site, tmp_path)

    lateral = get(api, "/studies/1")
    assert lateral.status == 200 and "A lateral view: only frontal views are scored." in lateral.text
    assert "No job was queued for this study." in lateral.text
    failed = get(api, "/studies/2")
    assert failed.status == 200 and "The network failed on one of the study&#39;s images." in failed.text
    assert "No result: Scoring failed." in failed.text
    assert "No result: Queued for scoring." in get(api, "/studies/5").text
    refused = get(api, "/studies/3").text
    assert "Refused: The pixel data are damaged" in refused and "corrupt_pixel_data" in refused
    assert "No preview: this result was made without a summary image." in refused
    odd = get(api, "/studies/4")
    assert odd.status == 200 and "Refused: No reason was recorded." in odd.text
    assert "No preview: this result was made without a summary image." in odd.text

    worklist = get(api, "/").text
    assert '<span class="count" data-level="not_analysable">1</span>' in worklist
    assert "Not scored: none of its images is eligible." in worklist
    assert "Scoring failed. The network failed" in worklist and "Queued for scoring." in worklist

    for path in ("/studies/999", "/studies/" + "9" * 40, "/studies/" + "9" * 5000, "/studies/x<y",
                 "/studies/", "/studies/1/results/999/input.png", "/studies/1/other"):
        response = get(api, path)
        assert response.status == 404 and "Not found" in response.text, path
    assert get(api, "/api/v1/studies/" + "9" * 40).status == 404  # no integer overflow in the API


def test_previews_are_served_from_the_spool_previews_folder_only(site: Site, tmp_path: Path) -> None:
    previews = site.spool.root / "previews"
    png = _png(previews / "a" / "input.png")
    (site.spool.root / "outside.png").write_bytes(png)
    summaries = iter([
        {"image": None, "sop_instance_uid": None, "reason": None,
         "input_png": "previews/a/input.png", "heatmap_png": "previews/a/missing.png"},
        {"image": None, "sop_instance_uid": None, "reason": "Only lateral views: no heatmap.",
         "input_png": "previews/../outside.png", "heatmap_png": "/etc/passwd"},
    ])
    _score(site, 1, 0.7, "elevated", lambda sop: {"images": {sop: {"probability": 0.7}},
                                                   "summary": next(summaries)})
    _score(site, 2, None, "not_analysable", lambda sop: {"images": {}, "summary": next(summaries)})
    api = _api(site, tmp_path)
    served = get(api, "/studies/1/results/1/input.png")
    assert served.status == 200 and served.body == png
    assert served.headers["Content-Type"] == "image/png"
    assert served.headers["X-Content-Type-Options"] == "nosniff"
    assert get(api, "/studies/1/results/1/heatmap.png").status == 404      # file missing
    assert get(api, "/studies/2/results/1/input.png").status == 404        # another study's result
    assert get(api, "/studies/2/results/2/input.png").status == 404        # outside previews/
    assert get(api, "/studies/2/results/2/heatmap.png").status == 404      # absolute path
    page = get(api, "/studies/1").text
    assert 'src="/studies/1/results/1/input.png"' in page and "Heatmap: the preview file is missing." in page
    other = get(api, "/studies/2").text
    assert "Only lateral views: no heatmap." in other and ".png" not in other


def test_pages_need_the_bearer_token_when_one_is_configured(site: Site, tmp_path: Path) -> None:
    api = _api(site, tmp_path, '[http]\ntoken = "t0ken"')
    assert get(api, "/").status == 401 and get(api, "/studies/1").status == 401
    assert get(api, "/", token="wrong").status == 401
    assert get(api, "/", token="t0ken").status == 200


def test_study_history_carries_each_results_summary(site: Site, tmp_path: Path) -> None:
    summary = {"image": f"{ROOT}.1.1", "sop_instance_uid": "2.25.1", "reason": None,
               "input_png": "previews/x.png", "heatmap_png": None}
    _score(site, 1, 0.7, "elevated", lambda sop: {"images": {}, "summary": summary})
    _score(site, 2, 0.7, "elevated", lambda sop: {"images": {}})
    api = _api(site, tmp_path)
    assert json.loads(get(api, "/api/v1/studies/1").body)["results"][0]["summary"] == summary
    assert json.loads(get(api, "/api/v1/studies/2").body)["results"][0]["summary"] is None
