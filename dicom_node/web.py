"""The HTTP service of ``serve``: health, readiness, Prometheus metrics, JSON API, dashboard.

=============================  ======  =======================================================
``/healthz``                   open    the process answers (liveness)
``/readyz``                    open    200 when it can take studies: store writable, index
                                       readable, SCP listening, an inference worker alive
                                       (cluster mode: PostgreSQL, RabbitMQ and the object
                                       store answer, a cluster worker beat recently);
                                       503 with the reason otherwise
``/metrics``                   token   Prometheus text format
``/api/...``                   token   JSON: studies, series, decisions, jobs, deliveries,
                                       destinations, algorithms, workers, node (the
                                       mode and the cluster's servers); POST retries,
                                       cancels and requeues
``/dicom-web/...``              token   DICOMweb (PS3.18): STOW-RS in (:mod:`dicom_node.stow`),
                                       QIDO-RS and WADO-RS over what the node holds
                                       (:mod:`dicom_node.dicomweb`)
``/``                          open    the dashboard (a static page; its data comes from /api)
=============================  ======  =======================================================

"token": when ``http.token`` is set, the request must carry ``Authorization: Bearer <token>``
(it is required when the service listens beyond loopback) or, over HTTPS (``http.tls``), a
client certificate that verifies against ``http.tls.ca_file``. POSTs must also be sent as
``application/json``, which a browser does not do cross-origin without a CORS preflight that
this service never grants — so another web page cannot make a reader's browser retry things.

``POST /api/jobs/<id>/cancel`` cancels a queued or running job, ``POST /api/jobs/<id>/requeue``
queues a failed or cancelled one again (404: no such job; 409: the job is not in a state the
action applies to); both are audited with the client's address (:mod:`dicom_node.job_control`).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import shutil
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from dicom_node import api, dicomweb
from dicom_node.config import NodeConfig
from dicom_node.database import SCHEMA_VERSION, Connection, Database, open_reader
from dicom_node.errors import StowRequestError
from dicom_node.events import DicomwebRead, Events, StudyRef
from dicom_node.job_control import JobControl
from dicom_node.jobs import job_store
from dicom_node.scp import server_ssl_context
from dicom_node.store import Sender
from dicom_node.stow import StowService, chunked_reader, length_reader

if TYPE_CHECKING:
    from dicom_node.objects import ObjectStore

log = logging.getLogger(__name__)

# A readiness check returns None when fine, or why not, in words for the operator.
Check = Callable[[], str | None]

_UID = r"[0-9.]{1,64}"


class HttpService:
    """The HTTP server thread and what it serves."""

    def __init__(
        self,
        config: NodeConfig,
        db: Database,
        registry: CollectorRegistry,
        checks: Mapping[str, Check],
        events: Events | None = None,
        stow: StowService | None = None,
    ) -> None:
        self.config = config
        self.stow = stow
        self.db = db
        self.jobs = job_store(db)
        self.registry = registry
        self.checks = checks
        self.data_dir = config.store.data_dir.resolve()
        self.events = events or Events()
        self.control = JobControl(self.jobs, db, self.data_dir, self.events)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.address = (config.http.host, config.http.port)
        self.dashboard = resources.files("dicom_node").joinpath("dashboard.html").read_bytes()

    def start(self) -> tuple[str, int]:
        service = self

        class Handler(_Handler):
            node = service

        tls = self.config.http.tls
        self._server = _Server(
            (self.config.http.host, self.config.http.port),
            Handler,
            server_ssl_context(tls) if tls.enabled else None,
        )
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)
        self._thread.start()
        host, port = self._server.server_address[:2]
        self.address = (str(host), int(port))
        log.info(
            "HTTP on %s://%s:%d/ (dashboard, /metrics, /api, /dicom-web)%s",
            "https" if self.config.http.tls.enabled else "http",
            host,
            port,
            "" if self.config.http.token is None else " with bearer token",
        )
        return str(host), int(port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # -- what the routes answer ----------------------------------------------------------------

    def readiness(self) -> tuple[bool, dict[str, str]]:
        results = {}
        for name, check in self.checks.items():
            try:
                problem = check()
            except Exception as exc:  # a check that breaks is a failed check, said plainly
                problem = f"{type(exc).__name__}: {exc}"
            results[name] = "ok" if problem is None else problem
        return all(v == "ok" for v in results.values()), results

    def readiness_report(self) -> dict[str, Any]:
        ready, checks = self.readiness()
        return {"ready": ready, "checks": checks}

    def read(self, query: Callable[[Connection], Any]) -> Any:
        with open_reader(self.config) as conn:
            return query(conn)

    def get_api(self, path: str, params: Mapping[str, str]) -> Any:
        limit = _int(params.get("limit"), 50)
        state = params.get("state") or None
        routes: list[tuple[str, Callable[[re.Match[str]], Any]]] = [
            (r"/api/studies", lambda m: self.read(lambda c: api.studies(c, limit))),
            (rf"/api/studies/({_UID})", lambda m: self.read(lambda c: api.study(c, m[1]))),
            (r"/api/series", lambda m: self.read(lambda c: api.series_list(c, limit))),
            (r"/api/decisions", lambda m: self.read(lambda c: api.decisions(c, limit))),
            (r"/api/jobs", lambda m: self.read(lambda c: api.jobs(c, state=state, limit=limit))),
            (r"/api/jobs/(\d+)", lambda m: self.read(lambda c: api.job(c, int(m[1])))),
            (
                r"/api/deliveries",
                lambda m: self.read(lambda c: api.deliveries(c, state=state, limit=limit)),
            ),
            (
                r"/api/destinations",
                lambda m: self.read(lambda c: api.destinations(c, self.config)),
            ),
            (r"/api/algorithms", lambda m: self.read(api.algorithms)),
            (r"/api/workers", lambda m: self.read(lambda c: api.workers(c, limit))),
            (r"/api/node", lambda m: self.read(lambda c: api.node(c, self.config))),
            (r"/api/readiness", lambda m: self.readiness_report()),
        ]
        for pattern, answer in routes:
            match = re.fullmatch(pattern, path)
            if match:
                return answer(match)
        raise LookupError(path)

    def post_api(self, path: str, client: str) -> tuple[HTTPStatus, dict[str, Any]]:
        """Answer a POST from ``client`` (its address): the status and the JSON body."""
        match = re.fullmatch(r"/api/jobs/(\d+)/retry", path)
        if match:
            return HTTPStatus.OK, {"queued": self.jobs.replay_deliveries(job_id=int(match[1]))}
        if path == "/api/deliveries/retry-dead":
            return HTTPStatus.OK, {"queued": self.jobs.replay_deliveries(all_dead=True)}
        match = re.fullmatch(r"/api/jobs/(\d+)/(cancel|requeue)", path)
        if match:
            act = self.control.cancel if match[2] == "cancel" else self.control.requeue
            outcome = act(int(match[1]), requestor="http-api", host=client)
            status = (
                HTTPStatus.OK
                if outcome.changed
                else HTTPStatus.NOT_FOUND
                if outcome.state is None
                else HTTPStatus.CONFLICT
            )
            return status, {
                "job": outcome.job_id,
                "changed": outcome.changed,
                "state": outcome.state.value if outcome.state else None,
                "was": outcome.was.value if outcome.was else None,
                "message": outcome.message,
            }
        raise LookupError(path)


class _Server(ThreadingHTTPServer):
    """The threading HTTP server, with TLS negotiated in each request's own thread: a client
    slow to finish its handshake holds up no one else's request."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        context: ssl.SSLContext | None,
    ) -> None:
        self.context = context
        super().__init__(address, handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.context is not None:
            request.settimeout(_HANDSHAKE_TIMEOUT_S)
            try:
                request = self.context.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                log.warning("TLS handshake with %s failed: %s", client_address[0], exc)
                return
        super().finish_request(request, client_address)


_HANDSHAKE_TIMEOUT_S = 10.0


def _int(value: str | None, default: int) -> int:
    if value is None:
        return default
    number = int(value)  # ValueError -> 400
    if not 1 <= number <= 10_000:
        raise ValueError("limit must be 1-10000")
    return number


class _Handler(BaseHTTPRequestHandler):
    node: HttpService
    server_version = "dicom-node"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s - %s", self.address_string(), format % args)

    # -- responses -----------------------------------------------------------------------------

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_stream(self, answer: dicomweb.Answer) -> None:
        """Send an answer whose body may come in pieces (a study's instances: 160 MB for a
        300-slice CT), written as they are made; the closed connection ends such a body."""
        if isinstance(answer.body, bytes):
            self._send(answer.status, answer.body, answer.content_type)
            return
        self.close_connection = True
        self.send_response(answer.status)
        self.send_header("Content-Type", answer.content_type)
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command == "HEAD":
            return
        try:
            for piece in answer.body:
                self.wfile.write(piece)
        except (BrokenPipeError, ConnectionResetError):
            log.debug("HTTP GET %s: the client left", self.path)
        except Exception:  # the status is sent: the cut-off body (no closing boundary) says it
            log.debug("HTTP GET %s failed while streaming", self.path)  # UIDs: DEBUG only
            log.exception("HTTP GET of a streamed body failed")

    def _json(self, status: int, data: Any) -> None:
        self._send(status, json.dumps(data).encode(), "application/json")

    def _client_certificate(self) -> dict[str, Any] | None:
        """The client's certificate when TLS verified it against http.tls.ca_file."""
        if isinstance(self.connection, ssl.SSLSocket):
            return self.connection.getpeercert() or None
        return None

    def _authorised(self) -> bool:
        token = self.node.config.http.token
        if token is None or self._client_certificate() is not None:
            return True
        given = self.headers.get("Authorization", "")
        if given.startswith("Bearer ") and hmac.compare_digest(
            given[7:].strip().encode(), token.encode()
        ):
            return True
        self.send_response(HTTPStatus.UNAUTHORIZED)
        self.send_header("WWW-Authenticate", 'Bearer realm="dicom-node"')
        self.send_header("Content-Type", "application/json")
        body = b'{"error": "a bearer token is required"}'
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        return False

    # -- routes --------------------------------------------------------------------------------

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path).rstrip("/") or "/"
        params = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            if path == "/healthz":
                self._json(HTTPStatus.OK, {"status": "ok"})
            elif path == "/readyz":
                report = self.node.readiness_report()
                ok = report["ready"]
                self._json(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, report)
            elif path in ("/", "/dashboard"):
                self._send(HTTPStatus.OK, self.node.dashboard, "text/html; charset=utf-8")
            elif path == "/metrics":
                if self._authorised():
                    self._send(
                        HTTPStatus.OK, generate_latest(self.node.registry), CONTENT_TYPE_LATEST
                    )
            elif path.startswith("/dicom-web/"):
                if self._authorised():
                    accept = self.headers.get("Accept")
                    base = self._base_url()
                    answer = dicomweb.answer(self.node.config, path, url.query, accept, base)
                    self._send_stream(answer)
                    self._audit_read(path, answer.status)
            elif path.startswith("/api/"):
                if self._authorised():
                    data = self.node.get_api(path, params)
                    if data is None:
                        self._json(HTTPStatus.NOT_FOUND, {"error": f"nothing at {path}"})
                    else:
                        self._json(HTTPStatus.OK, data)
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": f"nothing at {path}"})
        except LookupError:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"nothing at {path}"})
        except ValueError as exc:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
        except Exception as exc:
            log.exception("HTTP GET %s failed", path)
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(exc).__name__}"})

    do_HEAD = do_GET

    def do_POST(self) -> None:
        path = unquote(urlsplit(self.path).path).rstrip("/")
        stow = re.fullmatch(rf"/dicom-web/studies(?:/({_UID}))?", path)
        if stow is not None and self.node.stow is not None:
            self.close_connection = True  # what is left of a refused body is not read
            if self._authorised():
                self._store(self.node.stow, stow[1])
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(min(length, 1 << 16))
        if not self._authorised():
            return
        if self.headers.get_content_type() != "application/json":
            self._json(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, {"error": "send application/json"})
            return
        try:
            status, result = self.node.post_api(path, self.client_address[0])
        except LookupError:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"nothing at {path}"})
            return
        except Exception as exc:
            log.exception("HTTP POST %s failed", path)
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(exc).__name__}"})
            return
        log.info("HTTP POST %s from %s: %d %s", path, self.address_string(), status, result)
        self._json(status, result)

    def _who(self) -> str:
        """Who the client is, as far as the request says: its certificate, or how it got in."""
        names = _common_names(self._client_certificate())
        if names:
            return ", ".join(names)
        return "bearer token" if self.node.config.http.token else "unauthenticated (loopback)"

    def _audit_read(self, path: str, status: int) -> None:
        """Searches and retrievals of instances and metadata are audited (PS3.15 A.5.3);
        frames and bulk data are not: a viewer asks for them by the hundred after the
        metadata retrieval that is."""
        search = _SEARCH.fullmatch(path) is not None
        if not search and _PIECES.search(path):
            return
        study = _STUDY.match(path)
        self.node.events.emit(
            DicomwebRead(
                self.client_address[0],
                self._who(),
                search=search,
                resource=self.path,
                studies=(StudyRef(study[1], None, 0),) if study else (),
                status=status,
            )
        )

    def _base_url(self) -> str:
        """/dicom-web as this client addresses it (the Host header it sent)."""
        scheme = "https" if isinstance(self.connection, ssl.SSLSocket) else "http"
        host = self.headers.get("Host") or "{}:{}".format(*self.node.address)
        return f"{scheme}://{host}/dicom-web"

    def _store(self, stow: StowService, study_uid: str | None) -> None:
        """A STOW-RS request (PS3.18 10.5), read as it arrives."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            read = chunked_reader(self.rfile.read, self.rfile.readline)
        elif self.headers.get("Content-Length", "").strip().isdigit():
            read = length_reader(self.rfile.read, int(self.headers["Content-Length"]))
        else:
            self._json(HTTPStatus.LENGTH_REQUIRED, {"error": "send Content-Length or chunks"})
            return
        if self.headers.get("Expect", "").lower() == "100-continue":
            # RFC 9110 10.1.1: the client waits for this before it sends the body.
            self.send_response_only(HTTPStatus.CONTINUE)
            self.end_headers()
        self.connection.settimeout(self.node.config.dicomweb.network_timeout_s)
        client = self.client_address[0]
        sender = Sender(self.node.config.dicomweb.sender_aet, client)
        try:
            response = stow.store_request(
                read,
                self.headers.get("Content-Type", ""),
                sender,
                study_uid=study_uid,
                base_url=self._base_url(),
            )
        except StowRequestError as exc:
            log.warning("STOW-RS request from %s refused (%d): %s", client, exc.status, exc)
            self._json(exc.status, {"error": str(exc)})
            return
        except (TimeoutError, ConnectionError) as exc:
            log.warning("STOW-RS request from %s broke off: %s", client, exc)
            return
        log.info(
            "STOW-RS request from %s%s: %d instance(s) stored, %d refused (%d)",
            client,
            _subject(self._client_certificate()),
            response.stored,
            response.failed,
            response.status,
        )
        self._send(response.status, json.dumps(response.body).encode(), "application/dicom+json")


def _common_names(certificate: dict[str, Any] | None) -> list[str]:
    """The common names of a verified client certificate's subject."""
    if certificate is None:
        return []
    return [v for rdn in certificate.get("subject", ()) for k, v in rdn if k == "commonName"]


def _subject(certificate: dict[str, Any] | None) -> str:
    """A verified client certificate's name, for the log."""
    names = _common_names(certificate)
    return f" ({', '.join(names)})" if names else ""


_SEARCH = re.compile(
    rf"/dicom-web(?:/studies/{_UID}(?:/series/{_UID})?)?/(?:studies|series|instances)"
)
_PIECES = re.compile(r"/(?:frames|bulkdata)/")
_STUDY = re.compile(rf"/dicom-web/studies/({_UID})")


def store_check(data_dir: Path, min_free_bytes: int) -> Check:
    """Readiness: the data folder takes a durable write and has the space the SCP demands."""

    def check() -> str | None:
        probe = data_dir / ".ready-probe"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, b"ok")
                os.fsync(fd)
            finally:
                os.close(fd)
            probe.unlink()
        except OSError as exc:
            return f"the store {data_dir} is not writable: {exc.strerror}"
        free = shutil.disk_usage(data_dir).free
        if free < min_free_bytes:
            return f"{free} bytes free under {data_dir}, below store.min_free_bytes"
        return None

    return check


# Cluster mode's servers, probed for /readyz: an answer is kept this long, so that probes from
# a load balancer, Kubernetes and the dashboard together cost the servers one call per period.
PROBE_CACHE_S = 5.0
# How long /readyz waits for a probe; one that takes longer is "no answer" (it runs on in its
# thread and is not started again until it ends), so a frozen server never hangs the probe.
PROBE_WAIT_S = 2.0
_READY_PREFIX = "readyz-probe/"  # listed, never written: the bucket or folder must answer


class CachedProbe:
    """A readiness check whose answer is reused for ``cache_s`` and waited for at most
    ``wait_s``; it runs in a thread of its own so that a server that does not answer costs
    the caller ``wait_s``, not the client library's own timeouts and retries."""

    def __init__(
        self,
        name: str,
        probe: Check,
        *,
        cache_s: float = PROBE_CACHE_S,
        wait_s: float = PROBE_WAIT_S,
    ) -> None:
        if cache_s < 0 or wait_s <= 0:
            raise ValueError(f"probe {name}: cache_s >= 0 and wait_s > 0")
        self.name = name
        self.probe = probe
        self.cache_s = cache_s
        self.wait_s = wait_s
        self._lock = threading.Lock()
        self._answer: tuple[float, str | None] | None = None  # (monotonic time, problem)
        self._running: threading.Event | None = None  # set when the probe in flight ends

    def _run(self, done: threading.Event) -> None:
        try:
            problem = self.probe()
        except Exception as exc:  # the probe's failure is its answer, said in one line
            first = (str(exc).strip().splitlines() or [""])[0]
            problem = f"{type(exc).__name__}: {first}".rstrip(": ")
        with self._lock:
            self._answer = (time.monotonic(), problem)
            self._running = None
        done.set()

    def __call__(self) -> str | None:
        with self._lock:
            if self._answer is not None and time.monotonic() - self._answer[0] < self.cache_s:
                return self._answer[1]
            done = self._running
            if done is None:
                done = self._running = threading.Event()
                threading.Thread(
                    target=self._run, args=(done,), name=f"probe-{self.name}", daemon=True
                ).start()
        if not done.wait(self.wait_s):
            return f"no answer within {self.wait_s:g} s"
        with self._lock:
            assert self._answer is not None
            return self._answer[1]


def database_check(config: NodeConfig) -> Check:
    """PostgreSQL answers a read-only connection and holds the schema this version needs."""

    def check() -> str | None:
        with open_reader(config) as conn:
            found = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
        if found != SCHEMA_VERSION:
            return f"schema version {found}, this dicom-node needs {SCHEMA_VERSION}"
        return None

    return check


def broker_check(app: Any) -> Check:
    """RabbitMQ accepts an AMQP connection of ``app`` (the node's Celery app, from
    :func:`dicom_node.dispatch.celery_app`); it declares nothing: the sweeper declares."""

    def check() -> str | None:
        # One try and one quick retry (kombu's default waits 2 s between them), each within
        # half the probe's wait, so that a refusal is said as such rather than as no answer.
        with app.connection_for_write(connect_timeout=PROBE_WAIT_S / 2) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0)
        return None

    return check


def objects_check(objects: ObjectStore) -> Check:
    """The object store lists a prefix of its bucket or folder (one that holds nothing)."""

    def check() -> str | None:
        objects.keys(_READY_PREFIX)
        return None

    return check


def cluster_checks(config: NodeConfig, objects: ObjectStore, app: Any) -> dict[str, Check]:
    """Readiness of cluster mode's three servers, each its own check, cached and bounded
    (:class:`CachedProbe`); a failing one says which server, where, and why."""
    probes = {
        "postgresql": (api.server_address(config.cluster.database_url), database_check(config)),
        "rabbitmq": (api.server_address(config.cluster.broker_url), broker_check(app)),
        "objects": (api.objects_address(config.cluster.objects), objects_check(objects)),
    }

    def said(name: str, where: str | None, probe: Check) -> Check:
        def check() -> str | None:
            problem = probe()
            return None if problem is None else f"{name} at {where}: {problem}"

        return check

    return {
        name: said(name, where, CachedProbe(name, probe)) for name, (where, probe) in probes.items()
    }
