"""The read-only HTTP interface: /healthz, /readyz, /metrics, /api/v1/worklist, /api/v1/studies/{id},
and the worklist pages (/ and /studies/{id}, see :mod:`daemon.web.pages`).

A WSGI app on the standard library's threaded server (loopback by default). With a token
configured every request needs ``Authorization: Bearer <token>``. No patient data is served;
study UID and accession number only when ``worklist.show_identifiers`` is on.
"""

from __future__ import annotations

import hmac
import json
import re
import threading
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import structlog
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy.orm import Session, sessionmaker

from daemon.config import Config
from daemon.web.health import Health, all_ok
from daemon.web.metrics import Metrics
from daemon.web.pages import HEADERS, Page, Pages
from db import worklist
from db.engine import read_only

log = structlog.get_logger("opacityd.http")

StartResponse = Callable[[str, list[tuple[str, str]]], Any]
STUDY_PATH = re.compile(r"^/api/v1/studies/([0-9.]{1,64})$")
PAGE_PATH = re.compile(r"^/studies/([^/]*)$")
PREVIEW_PATH = re.compile(r"^/studies/([0-9.]{1,64})/results/([0-9]{1,18})/(input|heatmap)\.png$")


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http_request", line=format % args)


class HttpApi:
    def __init__(self, config: Config, sessions: sessionmaker[Session], health: Health,
                 metrics: Metrics) -> None:
        self.config = config
        self.sessions = sessions
        self.health = health
        self.metrics = metrics
        self.pages = Pages(config, sessions)
        self.server: _Server | None = None

    def start(self) -> None:
        h = self.config.http
        self.server = make_server(h.bind_address, h.port, self.app, server_class=_Server,
                                  handler_class=_QuietHandler)  # type: ignore[assignment]
        threading.Thread(target=self.server.serve_forever, name="http", daemon=True).start()
        log.info("http_listening", address=h.bind_address, port=self.port, token=bool(h.token))

    @property
    def port(self) -> int:
        return int(self.server.server_address[1]) if self.server else self.config.http.port

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        token = self.config.http.token
        if token:
            given = environ.get("HTTP_AUTHORIZATION", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return self._json(start_response, "401 Unauthorized", {"error": "bearer token required"},
                                  [("WWW-Authenticate", "Bearer")])
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return self._json(start_response, "405 Method Not Allowed", {"error": "read-only interface"})
        query = parse_qs(environ.get("QUERY_STRING", ""))
        if not path.startswith("/api/") and path not in ("/healthz", "/readyz", "/metrics"):
            return self._page(path, query, start_response)
        try:
            return self._route(path, query, start_response)
        except ValueError as e:
            return self._json(start_response, "400 Bad Request", {"error": str(e)})
        except Exception as e:  # noqa: BLE001 - a reason, never a traceback, for the caller
            log.error("http_error", path=path, error=type(e).__name__, detail=str(e)[:200])
            return self._json(start_response, "500 Internal Server Error", {"error": type(e).__name__})

    def _route(self, path: str, query: dict[str, list[str]],
               start_response: StartResponse) -> Iterable[bytes]:
        if path == "/healthz":
            checks = self.health.liveness()
            status = "200 OK" if all_ok(checks) else "503 Service Unavailable"
            return self._json(start_response, status, {"alive": all_ok(checks), **_checks(checks)})
        if path == "/readyz":
            checks = self.health.readiness()
            status = "200 OK" if all_ok(checks) else "503 Service Unavailable"
            failed = [name for name, c in checks.items() if not c.ok]
            return self._json(start_response, status,
                              {"ready": not failed, "failed": failed, **_checks(checks)})
        if path == "/metrics":
            body = self.metrics.render()
            start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST),
                                      ("Content-Length", str(len(body)))])
            return [body]
        if path == "/api/v1/worklist":
            return self._json(start_response, "200 OK", self.worklist(query))
        match = STUDY_PATH.match(path)
        if match:
            with read_only(self.sessions) as session:
                study = worklist.find_study(session, match.group(1))
                if study is None:
                    return self._json(start_response, "404 Not Found", {"error": "no such study"})
                data = worklist.study_history(session, study, self.config.worklist.show_identifiers)
            return self._json(start_response, "200 OK", data)
        return self._json(start_response, "404 Not Found", {"error": f"no resource {path}"})

    def _page(self, path: str, query: dict[str, list[str]],
              start_response: StartResponse) -> Iterable[bytes]:
        """A worklist page, a preview PNG, or a 404 page; an unexpected error gives a 500 page
        with the error's type, never a traceback."""
        try:
            if path == "/":
                page = self.pages.worklist_page(query)
            elif match := PREVIEW_PATH.match(path):
                page = self.pages.preview(match.group(1), int(match.group(2)), match.group(3))
            elif match := PAGE_PATH.match(path):
                page = self.pages.study_page(match.group(1))
            else:
                page = self.pages.not_found("There is no page at this address.")
        except Exception as e:  # noqa: BLE001 - the page request's boundary: logged, a 500 page
            log.error("http_page_error", path=path[:200], error=type(e).__name__, detail=str(e)[:200],
                      exc_info=True)
            page = Page("500 Internal Server Error", "text/plain; charset=utf-8",
                        f"The page could not be made ({type(e).__name__}); the log has the details.\n"
                        .encode())
        start_response(page.status, [("Content-Type", page.content_type),
                                     ("Content-Length", str(len(page.body))), *HEADERS])
        return [page.body]

    def worklist(self, query: dict[str, list[str]]) -> dict[str, Any]:
        now = datetime.now(UTC)
        levels = [v for value in query.get("level", []) for v in value.split(",") if v]
        since = worklist.parse_since(query["since"][0], now) if "since" in query else None
        limit = int(query.get("limit", ["200"])[0])
        with read_only(self.sessions) as session:
            return worklist.worklist_document(session, levels, since, limit,
                                              self.config.worklist.show_identifiers, now)

    @staticmethod
    def _json(start_response: StartResponse, status: str, data: dict[str, Any],
              headers: list[tuple[str, str]] | None = None) -> Iterable[bytes]:
        body = (json.dumps(data, indent=1) + "\n").encode()
        start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                                *(headers or [])])
        return [body]


def _checks(checks: dict[str, Any]) -> dict[str, Any]:
    return {"checks": {name: {"ok": c.ok, "detail": c.detail} for name, c in checks.items()}}
