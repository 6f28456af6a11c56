"""`opacityd worklist`, `opacityd audit`, `opacityd purge`: what operators and the reading room ask."""

from __future__ import annotations

import argparse
import getpass
import json
from datetime import UTC, datetime

from sqlalchemy.orm import Session, sessionmaker

from daemon.config import Config
from daemon.output import emit
from daemon.retention import purge
from daemon.spool import Spool
from db import queue, worklist
from db.engine import read_only, unit_of_work
from db.states import AuditAction

EXIT_OK, EXIT_ERROR = 0, 1


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    wl = sub.add_parser("worklist", help="scored studies by priority, then oldest first")
    wl.add_argument("--level", action="append", choices=worklist.LEVELS, help="only this level (repeatable)")
    wl.add_argument("--since", help="arrived within this window (30m, 2h, 7d) or since an ISO time")
    wl.add_argument("--limit", type=int, default=50)
    wl.add_argument("--json", action="store_true")
    audit = sub.add_parser("audit", help="a study's history end to end: receive, score, deliver, purge")
    audit.add_argument("study", help="Study Instance UID (or the study number the worklist shows)")
    audit.add_argument("--json", action="store_true")
    pg = sub.add_parser("purge", help="delete spooled images that retention allows (see [retention])")
    pg.add_argument("--dry-run", action="store_true", help="list what would be deleted; delete nothing")


def operator() -> str:
    return f"operator:{getpass.getuser()}"


def record_command(session: Session, command: str, study_uid: str | None,
                   outcome: dict[str, int]) -> None:
    """The audit row of an operator command, in the caller's transaction."""
    queue.audit(session, AuditAction.OPERATOR_COMMAND, operator(), datetime.now(UTC),
                study_uid=study_uid, command=command, outcome=outcome)


def age_text(seconds: int) -> str:
    """``42s``, ``5m``, ``3h``, ``2d``: the largest whole unit."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def run_worklist(args: argparse.Namespace, config: Config, sessions: sessionmaker[Session]) -> int:
    now = datetime.now(UTC)
    since = worklist.parse_since(args.since, now) if args.since else None
    show = config.worklist.show_identifiers
    with read_only(sessions) as session:
        document = worklist.worklist_document(session, args.level, since, args.limit, show, now)
    if args.json:
        emit(json.dumps(document, indent=2))
        return EXIT_OK
    ident = f"{'STUDY UID':<64} {'ACCESSION':<16} " if show else ""
    emit(f"{'#':>6} {ident}{'PRIORITY':<15} {'P(OPACITY)':>10} {'AGE':>6} {'DELIVERY':<10} MODEL")
    for row in document["studies"]:
        ident = f"{row['study_uid']:<64} {(row['accession_number'] or '-'):<16} " if show else ""
        probability = "-" if row["probability"] is None else f"{row['probability']:.3f}"
        validated = "" if row["model_validated"] else " (NOT FOR CLINICAL USE)"
        emit(f"{row['study']:>6} {ident}{row['priority']:<15} {probability:>10} "
             f"{age_text(row['age_s']):>6} {row['delivery']:<10} {row['model']}{validated}")
    if not document["studies"]:
        emit("(no scored studies match)")
    return EXIT_OK


def run_audit(args: argparse.Namespace, config: Config, sessions: sessionmaker[Session]) -> int:
    with read_only(sessions) as session:
        study = worklist.find_study(session, args.study)
        if study is None:
            emit(f"opacityd: no study {args.study!r}", error=True)
            return EXIT_ERROR
        history = worklist.study_history(session, study, show_identifiers=True)
    if args.json:
        emit(json.dumps(history, indent=2))
        return EXIT_OK
    emit(f"study #{history['study']} {history['study_uid']}: {history['state']}, revision "
         f"{history['revision']}, {len(history['instances'])} instance(s)")
    for r in history["results"]:
        emit(f"result {r['id']}: {r['priority']} p={r['probability']} by {r['model']} "
             f"thresholds {r['thresholds']}")
    for d in history["deliveries"]:
        control = f" (message {d['message_control_id']})" if d["message_control_id"] else ""
        emit(f"{d['kind']} delivery to {d['destination']}{control}: {d['state']} after "
             f"{d['attempts']} attempt(s)")
    emit(f"{'WHEN (UTC)':<25} {'ACTION':<22} {'ACTOR':<24} DETAIL")
    for event in history["audit"]:
        detail = json.dumps(event["detail"], sort_keys=True) if event["detail"] else ""
        if event["sop_instance_uid"]:
            detail = f"sop={event['sop_instance_uid']} {detail}"
        emit(f"{event['at']:<25} {event['action']:<22} {event['actor']:<24} {detail}")
    return EXIT_OK


def run_purge(args: argparse.Namespace, config: Config, sessions: sessionmaker[Session]) -> int:
    summary = purge(config, sessions, Spool(config.spool_dir), dry_run=args.dry_run, actor=operator())
    verb = "would delete" if args.dry_run else "deleted"
    emit(f"{verb} {summary.files} spooled file(s), {summary.bytes / 2**20:.1f} MB, "
         f"from {summary.studies} study(ies)")
    if args.dry_run:
        for c in summary.candidates[:200]:
            emit(f"  {c.reason.value:<10} {c.spool_path}")
    else:
        with unit_of_work(sessions) as session:
            record_command(session, "purge", None, {"files": summary.files, "bytes": summary.bytes})
    return EXIT_OK
