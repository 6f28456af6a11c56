"""The `opacityd` command line. ``main(argv) -> int`` is the console script."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

import structlog
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from daemon import model_cli, ops_cli
from daemon.config import Config, load_config
from daemon.exceptions import ConfigError
from daemon.logs import configure_logging
from daemon.output import emit
from db import deliveries, jobs, migrate, queue
from db.engine import (
    check_reachable,
    create_db_engine,
    make_session_factory,
    read_only,
    unit_of_work,
)
from db.exceptions import DatabaseUnreachable
from db.states import DeliveryState

EXIT_OK, EXIT_ERROR, EXIT_CONFIG = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="opacityd", description=__doc__)
    p.add_argument("-c", "--config", help="config file (default: $OPACITYD_CONFIG, else built-in defaults)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("serve", help="run the DICOM receiver, the scheduler and the sender "
                                 "(and a worker unless worker.embedded = false)")
    sub.add_parser("worker", help="score queued studies and write their SRs")
    sub.add_parser("receive", help="one more receiver process; serve starts these "
                                   "(receiver.processes), not you")
    requeue = sub.add_parser("requeue", help="put failed jobs back in the queue")
    target = requeue.add_mutually_exclusive_group(required=True)
    target.add_argument("study_uid", nargs="?")
    target.add_argument("--failed", action="store_true", help="every failed job")
    dl = sub.add_parser("deliveries", help="pending and failed deliveries (SR and HL7)")
    dl.add_argument("--all", action="store_true", help="include delivered ones")
    dl.add_argument("--json", action="store_true")
    resend = sub.add_parser("resend", help="send a study's latest result (SR and HL7) again")
    resend.add_argument("study_uid")
    check = sub.add_parser("check-config", help="validate a config file and print the result")
    check.add_argument("path", nargs="?", help="file to check (default: as --config)")
    db = sub.add_parser("db", help="database maintenance")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="DB_COMMAND")
    db_sub.add_parser("upgrade", help="apply pending schema migrations")
    db_sub.add_parser("current", help="print the schema revision")
    status = sub.add_parser("status", help="counts of studies, jobs and instances per state")
    status.add_argument("--json", action="store_true")
    model_cli.add_parser(sub)
    ops_cli.add_parsers(sub)
    studies = sub.add_parser("studies", help="recent studies with their state")
    studies.add_argument("--limit", type=int, default=20)
    studies.add_argument("--json", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.path if args.command == "check-config" and args.path
                             else args.config)
    except ConfigError as e:
        emit(f"opacityd: configuration error: {e}", error=True)
        return EXIT_CONFIG
    configure_logging(config.logging.level, config.logging.format,
                      sys.stderr if args.command != "serve" else sys.stdout)
    try:
        return _dispatch(args, config)
    except DatabaseUnreachable as e:
        # One clear line, at start, for a database that is down or misnamed (never the password).
        structlog.get_logger("opacityd.cli").error("database_unreachable", url=e.url, reason=e.reason)
        emit(f"opacityd: {e}", error=True)
        return EXIT_CONFIG
    except SQLAlchemyError as e:
        structlog.get_logger("opacityd.cli").error("database_error", error=type(e).__name__,
                                                   detail=str(e)[:300])
        emit(f"opacityd: database error: {e}", error=True)
        return EXIT_ERROR


def _dispatch(args: argparse.Namespace, config: Config) -> int:
    if args.command == "check-config":
        emit(f"{config.source}: OK (state folder {config.state_dir}, "
              f"AE {config.receiver.ae_title} on port {config.receiver.port})")
        return EXIT_OK
    if args.command == "serve":
        from daemon.serve import serve

        return serve(config)
    if args.command == "worker":
        from daemon.worker import run_worker

        return run_worker(config)
    if args.command == "receive":
        from daemon.receivers import run_receiver

        return run_receiver(config)
    if args.command == "db":
        return _db(args, config)
    if args.command in ("requeue", "deliveries", "resend"):
        return _queue_command(args, config)
    if args.command == "status":
        return _status(args, config)
    if args.command == "studies":
        return _studies(args, config)
    if args.command == "model":
        return model_cli.run(args)
    if args.command in ("worklist", "audit", "purge"):
        engine, sessions = _open_sessions(config)
        try:
            runner = {"worklist": ops_cli.run_worklist, "audit": ops_cli.run_audit,
                      "purge": ops_cli.run_purge}[args.command]
            return runner(args, config, sessions)
        finally:
            engine.dispose()
    raise AssertionError(args.command)  # argparse guarantees a known command


def _db(args: argparse.Namespace, config: Config) -> int:
    engine = create_db_engine(config.database_url, config.database.busy_timeout_ms)
    try:
        check_reachable(engine)
        if args.db_command == "upgrade":
            before, after = migrate.upgrade(engine)
            emit(f"schema: {before or 'empty'} -> {after}" if before != after
                  else f"schema already at {after}")
        else:
            emit(f"schema {migrate.current_revision(engine) or 'empty'} "
                  f"(head {migrate.head_revision()})")
    finally:
        engine.dispose()
    return EXIT_OK


def _open_sessions(config: Config) -> tuple[Engine, sessionmaker[Session]]:
    engine = create_db_engine(config.database_url, config.database.busy_timeout_ms)
    check_reachable(engine)
    if migrate.current_revision(engine) != migrate.head_revision():
        migrate.upgrade(engine)
    return engine, make_session_factory(engine)


def _status(args: argparse.Namespace, config: Config) -> int:
    engine, sessions = _open_sessions(config)
    with read_only(sessions) as session:
        counts = queue.state_counts(session)
    engine.dispose()
    if args.json:
        emit(json.dumps(counts, indent=2))
        return EXIT_OK
    for group, values in counts.items():
        emit(f"{group:<10} " + "  ".join(f"{k}={v}" for k, v in values.items()))
    return EXIT_OK


def _queue_command(args: argparse.Namespace, config: Config) -> int:
    engine, sessions = _open_sessions(config)
    now = datetime.now(UTC)
    actor = ops_cli.operator()
    try:
        with unit_of_work(sessions) as session:
            if args.command == "requeue":
                study = None if args.failed else args.study_uid
                count = jobs.requeue_failed(session, now, actor, study)
                ops_cli.record_command(session, "requeue", study, {"jobs": count})
                emit(f"requeued {count} failed job(s)")
                return EXIT_OK if count or args.failed else EXIT_ERROR
            if args.command == "resend":
                count = deliveries.resend(session, args.study_uid, now, actor)
                ops_cli.record_command(session, "resend", args.study_uid, {"deliveries": count})
                emit(f"re-queued {count} delivery(ies) of the latest result" if count
                      else "no result recorded for that study")
                return EXIT_OK if count else EXIT_ERROR
        states = tuple(DeliveryState) if args.all else (DeliveryState.PENDING,
                                                         DeliveryState.FAILED)
        with read_only(sessions) as session:
            rows = deliveries.listing(session, states)
    finally:
        engine.dispose()
    if args.json:
        emit(json.dumps([{"study_uid": r.study_uid, "kind": r.kind.value,
                           "destination": r.destination, "message_control_id": r.message_control_id,
                           "state": r.state.value, "attempts": r.attempts,
                           "last_reason": r.last_reason, "last_detail": r.last_detail,
                           "sr": r.sr_sop_instance_uid,
                           "next_attempt_at": r.next_attempt_at.isoformat()} for r in rows],
                         indent=2))
        return EXIT_OK
    emit(f"{'STUDY UID':<64} {'KIND':<4} {'DESTINATION':<12} {'STATE':<10} {'TRIES':>5} LAST REASON")
    for r in rows:
        emit(f"{r.study_uid:<64} {r.kind.value:<4} {r.destination:<12} {r.state.value:<10} "
              f"{r.attempts:>5} {r.last_reason or '-'}")
    return EXIT_OK


def _studies(args: argparse.Namespace, config: Config) -> int:
    engine, sessions = _open_sessions(config)
    with read_only(sessions) as session:
        rows = queue.recent_studies(session, args.limit)
    engine.dispose()
    if args.json:
        emit(json.dumps([{
            "study_uid": r.study_uid, "state": r.state.value, "revision": r.revision,
            "instances": r.instances, "eligible": r.eligible,
            "first_received_at": r.first_received_at.isoformat(),
            "last_received_at": r.last_received_at.isoformat(),
            "job_state": r.job_state.value if r.job_state else None,
        } for r in rows], indent=2))
        return EXIT_OK
    emit(f"{'STUDY UID':<64} {'STATE':<10} {'REV':>3} {'INST':>5} {'ELIG':>5} {'JOB':<10} LAST")
    for r in rows:
        emit(f"{r.study_uid:<64} {r.state.value:<10} {r.revision:>3} {r.instances:>5} "
              f"{r.eligible:>5} {(r.job_state.value if r.job_state else '-'):<10} "
              f"{ops_cli.age_text(int((datetime.now(UTC) - r.last_received_at).total_seconds()))} ago")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
