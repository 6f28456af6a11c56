"""The worklist web pages: ``/`` (studies by priority) and ``/studies/<id>`` (one study), plus
the preview PNGs a study page shows.

Read-only, served by :mod:`daemon.web.http_api` under its rules (loopback, or a bearer token).
Jinja2 templates with autoescaping; no script. The view data handed to a template is built here
from :mod:`db.worklist` and holds no identifier unless ``worklist.show_identifiers`` is on: no
patient data ever, and no study, series or SOP Instance UID or accession number when hidden.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from sqlalchemy.orm import Session, sessionmaker

from daemon.config import Config
from daemon.web import page_text as text
from db import worklist
from db.engine import read_only
from db.models import Result

REFRESH_S = 30
"""The worklist and study pages reload themselves this often (a meta refresh, no script)."""
LIMIT = 200
"""Rows per level group on the worklist page, as /api/v1/worklist's default."""
CSP = ("default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")
HEADERS = [("Content-Security-Policy", CSP), ("X-Content-Type-Options", "nosniff"),
           ("Referrer-Policy", "no-referrer"), ("Cache-Control", "no-store")]
"""Sent with every page and preview image."""
STUDY_KEY = re.compile(r"^[0-9.]{1,64}$")
PREVIEWS = "previews"
"""The spool folder preview PNGs live in; a preview path outside it is never served."""
PREVIEW_MAX_BYTES = 32 * 2**20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SINCE_CHOICES = (("", "any time"), ("1h", "last hour"), ("6h", "last 6 hours"),
                 ("24h", "last 24 hours"), ("7d", "last 7 days"), ("30d", "last 30 days"))
_UID = re.compile(r"^[0-9]+(\.[0-9]+){2,}$")


@dataclass(frozen=True)
class Page:
    status: str
    content_type: str
    body: bytes


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("daemon.web", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.globals.update(refresh_s=REFRESH_S)
    return env


class Pages:
    """Renders the pages from the database; each method returns a whole :class:`Page`."""

    def __init__(self, config: Config, sessions: sessionmaker[Session]) -> None:
        self.config = config
        self.sessions = sessions
        self.show = config.worklist.show_identifiers
        self.env = _environment()

    def render(self, template: str, status: str = "200 OK", **data: Any) -> Page:
        body = self.env.get_template(template).render(show_identifiers=self.show, **data)
        return Page(status, "text/html; charset=utf-8", body.encode())

    def not_found(self, what: str) -> Page:
        return self.render("error.html", "404 Not Found", title="Not found", message=what)

    def bad_request(self, what: str) -> Page:
        return self.render("error.html", "400 Bad Request", title="Bad request", message=what)

    def worklist_page(self, query: dict[str, list[str]]) -> Page:
        """``/``: the scored studies grouped by level, with counts, the filter form and the
        studies not scored. ``level`` and ``since`` as /api/v1/worklist takes them; a bad value
        gives a 400 page that says which and what is accepted."""
        now = datetime.now(UTC)
        levels = [v for value in query.get("level", []) for v in value.split(",") if v]
        unknown = sorted(set(levels) - set(worklist.LEVELS))
        if unknown:
            return self.bad_request(f"Unknown level {unknown[0]!r}; levels are "
                                    f"{', '.join(worklist.LEVELS)}.")
        since_text = query.get("since", [""])[0].strip()
        try:
            since = worklist.parse_since(since_text, now) if since_text else None
        except ValueError:
            return self.bad_request(f"Cannot read the time window {since_text!r}; give 30m, 2h, "
                                    "7d or an ISO 8601 time.")
        with read_only(self.sessions) as session:
            counts = worklist.level_counts(session, since)
            groups: list[dict[str, Any]] = []
            for level in levels or worklist.LEVELS:
                entries = worklist.worklist(session, [level], since, LIMIT)
                groups.append({"level": level, "badge": text.badge(text.LEVELS, level),
                               "count": counts.get(level, 0),
                               "rows": [self._row(e, now) for e in entries]})
            waiting = [] if levels else [self._unscored(u, now)
                                         for u in worklist.unscored(session, since, LIMIT)]
        choices = list(SINCE_CHOICES)
        if since_text and since_text not in dict(choices):
            choices.append((since_text, since_text))
        return self.render(
            "worklist.html", title="Worklist", generated=_when(now), groups=groups,
            counts=[{"level": level, "badge": text.badge(text.LEVELS, level), "count": n,
                     "href": "/?" + urlencode({"level": level, "since": since_text})}
                    for level, n in counts.items()],
            total=sum(counts.values()), levels=levels, since=since_text, since_choices=choices,
            unscored=waiting, validated=all(r["validated"] for g in groups for r in g["rows"]))

    def _row(self, e: worklist.WorklistEntry, now: datetime) -> dict[str, Any]:
        return {"href": f"/studies/{e.study_id}", "number": e.study_id,
                "study_uid": e.study_uid if self.show else None,
                "accession": (e.accession_number or "") if self.show else None,
                "age": text.age((now - e.received_at).total_seconds()),
                "received": _when(e.received_at),
                "probability": _percent(e.probability), "decision": _decision(e.decision),
                "deliveries": [{"kind": kind, "badge": text.badge(text.DELIVERIES, state)}
                               for kind, state in e.deliveries.items()],
                "model": e.model, "validated": e.model_validated}

    def _unscored(self, u: worklist.UnscoredEntry, now: datetime) -> dict[str, Any]:
        if u.job_state is not None:
            status = text.sentence(text.JOB_STATES, u.job_state)
            if u.failure_reason:
                status += " " + text.sentence(text.JOB_FAILURES, u.failure_reason)
        else:
            status = text.sentence(text.STUDY_STATES, u.state)
        return {"href": f"/studies/{u.study_id}", "number": u.study_id, "status": status,
                "age": text.age((now - u.received_at).total_seconds()),
                "ineligible": [text.sentence(text.INELIGIBLE, r) for r in u.ineligible_reasons]}

    def study_page(self, key: str) -> Page:
        """``/studies/<id>``: one study by its number (or Study Instance UID); a 404 page when
        there is none."""
        if not STUDY_KEY.match(key):
            return self.not_found("There is no study with that number.")
        with read_only(self.sessions) as session:
            study = worklist.find_study(session, key)
            if study is None:
                return self.not_found("There is no study with that number.")
            uid = study.study_uid
            history = worklist.study_history(session, study, self.show)
        return self.render("study.html", title=f"Study {history['study']}",
                           **StudyView(history, uid, self.show, self.config.spool_dir).data())

    def preview(self, key: str, result_id: int, which: str) -> Page:
        """``/studies/<id>/results/<result>/input.png`` or ``heatmap.png``: the PNG the result's
        detail names, when it lies inside the spool's preview folder; 404 otherwise."""
        with read_only(self.sessions) as session:
            study = worklist.find_study(session, key) if STUDY_KEY.match(key) else None
            result = session.get(Result, result_id) if study is not None else None
            if study is None or result is None or result.study_id != study.id:
                result = None  # another study's result is not this study's preview
            summary = (worklist.summary_of(worklist.detail_of(result)) if result else None) or {}
        path = preview_file(self.config.spool_dir, summary.get(f"{which}_png"))
        if path is None:
            return self.not_found("There is no such preview image.")
        try:
            data = path.read_bytes()
        except OSError:
            return self.not_found("The preview image cannot be read.")
        if not data.startswith(PNG_SIGNATURE):
            return self.not_found("The preview file is not a PNG image.")
        return Page("200 OK", "image/png", data)


def preview_file(spool: Path, relative: str | None) -> Path | None:
    """The preview file ``relative`` (to the spool root) names, or None when there is none, it
    is not a file, is too large, or resolves (through ``..`` or links) outside ``previews/``."""
    if not relative:
        return None
    try:
        root = (spool / PREVIEWS).resolve()
        path = (spool / relative).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            return None
        return path if path.stat().st_size <= PREVIEW_MAX_BYTES else None
    except (OSError, ValueError):  # a NUL byte, a loop of links, an unreadable folder
        return None


class StudyView:
    """The study page's data from :func:`db.worklist.study_history`, with every UID replaced by
    a neutral label ("image 2") unless identifiers are shown."""

    def __init__(self, history: dict[str, Any], study_uid: str, show: bool, spool: Path) -> None:
        self.h, self.show, self.spool = history, show, spool
        self.labels: dict[str, str] = {study_uid: "this study"}
        for n, instance in enumerate(history["instances"], start=1):
            self.labels.setdefault(instance["sop_instance_uid"], f"image {n}")

    def label(self, uid: str | None) -> str:
        if uid is None:
            return ""
        if self.show:
            return uid
        return self.labels.get(uid, "(UID hidden)")

    def mask(self, value: Any) -> Any:
        """A JSON value with every UID (as a string or a key) shown as its label when hidden."""
        if isinstance(value, dict):
            return {self.mask(k): self.mask(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.mask(v) for v in value]
        if isinstance(value, str) and _UID.match(value):
            return self.label(value)
        return value

    def data(self) -> dict[str, Any]:
        h = self.h
        results = [self._result(r) for r in reversed(h["results"])]
        latest_job = h["jobs"][-1] if h["jobs"] else None
        return {
            "number": h["study"], "study_uid": h.get("study_uid"),
            "accession": (h.get("accession_number") or "") if self.show else None,
            "state": text.sentence(text.STUDY_STATES, h["state"]), "revision": h["revision"],
            "received": _when_text(h["first_received_at"]),
            "last_received": _when_text(h["last_received_at"]),
            "instances": [{"label": f"image {n}", "uid": i["sop_instance_uid"] if self.show else None,
                           "modality": i["modality"] or "?", "view": i["view"] or "?",
                           "eligible": i["eligible"],
                           "reason": None if i["eligible"] else text.sentence(text.INELIGIBLE, i["reason"]),
                           "code": i["reason"], "held": i["held"],
                           "superseded": i["superseded_at"] is not None}
                          for n, i in enumerate(h["instances"], start=1)],
            "results": results,
            "unscored": None if results else self._why_unscored(latest_job),
            "jobs": [{"id": j["id"], "revision": j["revision"], "state": j["state"],
                      "state_text": text.sentence(text.JOB_STATES, j["state"]),
                      "attempts": j["attempts"],
                      "failure": text.sentence(text.JOB_FAILURES, j["failure_reason"])
                      if j["failure_reason"] else None, "failure_code": j["failure_reason"],
                      "error": j["last_error"] if self.show else None,
                      "updated": _when_text(j["updated_at"])} for j in h["jobs"]],
            "audit": [{"at": _when_text(e["at"]), "action": e["action"].replace("_", " "),
                       "actor": e["actor"], "image": self.label(e["sop_instance_uid"]),
                       "detail": _flatten(self.mask(e["detail"]))} for e in h["audit"]],
        }

    def _why_unscored(self, job: dict[str, Any] | None) -> str:
        if job is None:
            return text.sentence(text.STUDY_STATES, self.h["state"])
        why = text.sentence(text.JOB_STATES, job["state"])
        if job["failure_reason"]:
            why += " " + text.sentence(text.JOB_FAILURES, job["failure_reason"])
        return why

    def _result(self, r: dict[str, Any]) -> dict[str, Any]:
        images = r["images"] if isinstance(r["images"], dict) else {}
        summary = r.get("summary")
        base = f"/studies/{self.h['study']}/results/{r['id']}"
        previews = []
        if summary is None:
            preview_note = "No preview: this result was made without a summary image."
        else:
            preview_note = summary["reason"]
            for which, caption in (("input", "Network input"), ("heatmap", "Heatmap")):
                if summary[f"{which}_png"] is None:
                    continue
                present = preview_file(self.spool, summary[f"{which}_png"]) is not None
                previews.append({"caption": caption, "src": f"{base}/{which}.png" if present else None})
            if not previews and not preview_note:
                preview_note = "No preview: none was recorded for this result."
        return {
            "id": r["id"], "revision": r["revision"], "model": r["model"],
            "validated": r["model_validated"], "created": _when_text(r["created_at"]),
            "badge": text.badge(text.LEVELS, r["priority"]),
            "probability": _percent(r["probability"]), "decision": _decision(r["decision"]),
            "thresholds": r["thresholds"],
            "images": [self._image(uid, v) for uid, v in sorted(images.items(), key=self._order)],
            "summary_image": self.label(summary["image"]) if summary and summary["image"] else None,
            "previews": previews, "preview_note": preview_note,
            "deliveries": [{"destination": d["destination"], "kind": d["kind"],
                            "badge": text.badge(text.DELIVERIES, d["state"]),
                            "attempts": d["attempts"], "reason": d["last_reason"],
                            "control_id": d["message_control_id"],
                            "delivered": _when_text(d["delivered_at"])}
                           for d in self.h["deliveries"] if d["result"] == r["id"]],
        }

    def _order(self, item: tuple[str, Any]) -> tuple[int, str]:
        """Images in the order they were received (their labels' order), unknown ones last."""
        label = self.labels.get(item[0], "")
        return (int(label[6:]), "") if label.startswith("image ") else (1 << 30, item[0])

    def _image(self, uid: str, value: Any) -> dict[str, Any]:
        entry = value if isinstance(value, dict) else {}
        probability = entry.get("probability")
        refused = entry.get("refused")
        notes = entry.get("notes")
        return {"label": self.label(uid),
                "probability": _percent(probability) if isinstance(probability, int | float) else None,
                "refusal": None if probability is not None else
                text.sentence(text.REFUSALS, refused if isinstance(refused, str) else None),
                "code": refused if isinstance(refused, str) else None,
                "notes": [str(n) for n in notes] if isinstance(notes, list) else []}


def _flatten(detail: Any) -> list[tuple[str, str]]:
    """An audit detail as (key, value) pairs to print; nested values as compact text."""
    if detail is None:
        return []
    if not isinstance(detail, dict):
        return [("", _compact(detail))]
    return [(str(k), _compact(v)) for k, v in detail.items()]


def _compact(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_compact(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(_compact(v) for v in value)
    return "" if value is None else str(value)


def _percent(p: float | None) -> str | None:
    return None if p is None else f"{100 * p:.1f} %"


def _decision(d: bool | None) -> str:
    return "no decision" if d is None else ("opacity likely" if d else "no opacity")


def _when(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _when_text(value: str | None) -> str:
    if not value:
        return ""
    try:
        return _when(datetime.fromisoformat(value))
    except ValueError:
        return value
