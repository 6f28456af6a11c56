"""The receiver's database step alone: one ``record_instance`` transaction per instance, in this
process, on SQLite and on PostgreSQL side by side (no network, no files).

    python -m bench.record [--instances 400]

Prints milliseconds per instance on each engine, their ratio, and how many statements and
transaction commands one instance sends (counted on PostgreSQL), then one JSON line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import event

from db import migrate, queue
from db.engine import create_db_engine, make_session_factory, unit_of_work
from tests.pg import PostgresCluster, available


def _record(i: int) -> queue.InstanceRecord:
    sop = f"1.2.826.0.1.3680043.10.99.{i}.1"
    return queue.InstanceRecord(
        study_uid=f"1.2.826.0.1.3680043.10.99.{i}", series_uid=f"1.2.826.0.1.3680043.10.99.{i}.9",
        sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        transfer_syntax_uid="1.2.840.10008.1.2.1", modality="CR", body_part="CHEST",
        view_position="PA", accession_number=None, eligible=True, eligibility_reason="eligible",
        spool_path=f"{sop}.dcm", size_bytes=10, calling_ae="BENCH",
        content_hash=hashlib.sha256(sop.encode()).hexdigest())


def ms_per_instance(url: str, instances: int) -> tuple[float, int]:
    """(milliseconds per instance, statements per instance) for ``instances`` new studies."""
    engine = create_db_engine(url)
    migrate.upgrade(engine)
    sessions = make_session_factory(engine)
    sent: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        sent.append(statement)
    event.listen(engine, "before_cursor_execute", count)
    started = time.perf_counter()
    for i in range(instances):
        with unit_of_work(sessions) as session:
            queue.record_instance(session, _record(i), datetime.now(UTC))
    elapsed = time.perf_counter() - started
    engine.dispose()
    return elapsed / instances * 1000, round(len(sent) / instances)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--instances", type=int, default=400)
    args = p.parse_args(argv)
    if not available():
        print("PostgreSQL 15 missing: apt-get install postgresql", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as folder:
        lite, lite_statements = ms_per_instance(f"sqlite:///{folder}/bench.sqlite3", args.instances)
    cluster = PostgresCluster().start()
    try:
        pg, pg_statements = ms_per_instance(cluster.new_database(), args.instances)
    finally:
        cluster.destroy()
    print(f"record_instance, one transaction per new instance, {args.instances} instances, in process")
    print(f"SQLite (WAL, synchronous=FULL): {lite:.2f} ms/instance, {lite_statements} statements")
    print(f"PostgreSQL 15 (loopback TCP):   {pg:.2f} ms/instance, {pg_statements} statements "
          "(SAVEPOINT and RELEASE among them; plus BEGIN and COMMIT)")
    print(f"PostgreSQL / SQLite time: {pg / lite:.2f}")
    print(json.dumps({"bench": "record", "instances": args.instances, "sqlite_ms": round(lite, 3),
                      "postgres_ms": round(pg, 3), "postgres_vs_sqlite": round(pg / lite, 3),
                      "statements": pg_statements}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
