"""The deployment recipes under deploy/, checked without Docker, Kubernetes or systemd as PID 1.

What is checked is what can be from here: every YAML parses; every dicom-node configuration a
recipe carries validates with the node's own loader, with the environment the recipe sets; every
dicom-node command line a recipe runs parses with the node's own parser; the recipes agree with
each other and with the node's defaults (ports, paths, AE titles, the Makefile's torch pins);
the compose file against the Compose Specification's JSON schema; the systemd unit with
``systemd-analyze``; the Helm chart rendered and linted (strict) by real Helm, embedded by
helm-python-sdk; the rendered Kubernetes objects against Kubernetes' schemas where
kubernetes-validate is installed; and the demo's Orthanc auto-routing Lua script in a real
Orthanc.
"""

from __future__ import annotations

import argparse
import base64
import importlib
import inspect
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from dicom_node.cli import build_parser
from dicom_node.config import ENV_CONFIG_FILE, HttpConfig, NodeConfig, ScpConfig, load_config
from dicom_node.errors import ConfigError
from tests.support.paths import ROOT
from tests.support.postgres import postgres_server, postgres_url  # noqa: F401 (fixtures)
from tests.support.rabbitmq import RabbitServer, rabbitmq  # noqa: F401 (fixture)
from tests.support.seaweedfs import SeaweedServer

DEPLOY = ROOT / "deploy"
DOCKERFILES = {"cpu": DEPLOY / "Dockerfile", "cuda": DEPLOY / "Dockerfile.cuda"}
COMPOSE = DEPLOY / "docker-compose.yaml"
CLUSTER_COMPOSE = DEPLOY / "compose" / "cluster.yaml"
UNIT = DEPLOY / "systemd" / "dicom-node.service"
WORKER_UNIT = DEPLOY / "systemd" / "dicom-node-worker@.service"
CLUSTER_ENV = DEPLOY / "systemd" / "cluster.env"
CHART = DEPLOY / "helm" / "dicom-node"


def require_module(name: str) -> ModuleType:
    """A validator package from the dev extra: in CI its absence fails, elsewhere it skips."""
    try:
        return importlib.import_module(name)
    except ImportError:
        message = f"{name} is not installed (pip install -e '.[dev]')"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def parse_command(argv: list[str]) -> argparse.Namespace:
    """The node's own parser on a recipe's command line; a usage error fails the test."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"dicom-node does not accept {argv}") from exc


def field_default(model: type, name: str) -> Any:
    return model.model_fields[name].default


def shutdown_budget_s() -> float:
    """How long `serve` may take to stop after SIGTERM: the SCP's grace for in-flight
    C-STOREs, then the worker's (each the default of its stop method)."""
    from dicom_node.infer import WorkerSupervisor
    from dicom_node.node import Node

    scp = inspect.signature(Node.stop).parameters["grace_s"].default
    worker = inspect.signature(WorkerSupervisor.stop).parameters["timeout_s"].default
    return float(scp) + float(worker)


@pytest.mark.unit
def test_command_check_refuses_what_the_node_would() -> None:
    assert parse_command(["serve", "--config", "/x.yaml"]).command == "serve"
    for argv in (["serv"], ["serve", "--bogus", "x"], [], ["worker", "extra"]):
        with pytest.raises(AssertionError):
            parse_command(argv)


# --- Dockerfiles -----------------------------------------------------------------------------


@dataclass
class Dockerfile:
    path: Path
    instructions: list[tuple[str, str]]

    @classmethod
    def read(cls, path: Path) -> Dockerfile:
        instructions: list[tuple[str, str]] = []
        pending = ""
        for line in path.read_text().splitlines():
            stripped = line.strip()
            # Comment lines end nothing, also inside a continued instruction (Docker drops them).
            if not stripped or stripped.startswith("#"):
                continue
            if stripped.endswith("\\"):
                pending += stripped[:-1] + " "
                continue
            keyword, _, rest = (pending + stripped).partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
            pending = ""
        assert not pending, f"{path}: the last instruction is continued into nothing"
        return cls(path, instructions)

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]

    def one(self, keyword: str) -> str:
        found = self.all(keyword)
        assert len(found) == 1, f"{self.path.name}: {len(found)} {keyword} instructions"
        return found[0]

    def exec_form(self, keyword: str) -> list[str]:
        value = json.loads(self.one(keyword))
        assert isinstance(value, list), f"{keyword} must use the exec (JSON) form"
        return value

    def args(self) -> dict[str, str]:
        return dict(shlex.split(rest)[0].split("=", 1) for rest in self.all("ARG"))

    def env(self) -> dict[str, str]:
        return dict(item.split("=", 1) for rest in self.all("ENV") for item in shlex.split(rest))

    def copies(self) -> list[tuple[list[str], str]]:
        out = []
        for rest in self.all("COPY"):
            parts = [p for p in shlex.split(rest) if not p.startswith("--")]
            out.append((parts[:-1], parts[-1]))
        return out

    def run_text(self) -> str:
        return "\n".join(self.all("RUN"))


def makefile_torch_pins() -> str:
    match = re.search(r"^TORCH\s*:=\s*(.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert match, "the Makefile no longer defines TORCH"
    return match.group(1).strip()


class DockerIgnore:
    """A .dockerignore as BuildKit reads it: patterns in order, the last one that matches a path
    or any of its parent folders decides, `!` re-includes, `**` spans folders."""

    def __init__(self, text: str) -> None:
        self.rules: list[tuple[re.Pattern[str], bool]] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            include = line.startswith("!")
            pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
            self.rules.append((re.compile(self._regex(pattern)), include))

    @staticmethod
    def _regex(pattern: str) -> str:
        out, i = "^", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return out + "$"

    def excludes(self, path: str) -> bool:
        parts = path.split("/")
        candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        excluded = False
        for regex, include in self.rules:
            if any(regex.match(c) for c in candidates):
                excluded = not include
        return excluded


@pytest.mark.unit
def test_dockerignore_semantics() -> None:
    ignore = DockerIgnore("*\n!src\n**/__pycache__\n!keep/this\n")
    assert ignore.excludes(".venv/bin/python")
    assert not ignore.excludes("src/a.py")
    assert ignore.excludes("src/__pycache__/a.pyc")
    assert not ignore.excludes("keep/this/file")
    assert ignore.excludes("keep/other")


@pytest.fixture(params=sorted(DOCKERFILES), ids=str)
def dockerfile(request: pytest.FixtureRequest) -> Dockerfile:
    return Dockerfile.read(DOCKERFILES[request.param])


@pytest.mark.unit
def test_dockerfile_bases() -> None:
    assert Dockerfile.read(DOCKERFILES["cpu"]).one("FROM").startswith("python:3.11-slim")
    assert Dockerfile.read(DOCKERFILES["cuda"]).one("FROM").startswith("nvidia/cuda:")


@pytest.mark.unit
def test_dockerfile_installs_the_makefiles_torch_from_the_matching_index(
    dockerfile: Dockerfile,
) -> None:
    args = dockerfile.args()
    assert args["TORCH"] == makefile_torch_pins()
    run = dockerfile.run_text()
    assert '--index-url "$TORCH_INDEX" $TORCH' in run
    assert 'pip install ".[cluster]" $TORCH' in run, (
        "the project install must keep the pinned torch"
    )
    # One image for both modes: the cluster extra is installed, and the project defines it.
    assert "cluster" in _pyproject()["project"]["optional-dependencies"]
    index = args["TORCH_INDEX"]
    assert index.startswith("https://download.pytorch.org/whl/")
    flavour = index.rsplit("/", 1)[1]
    base = dockerfile.one("FROM")
    if base.startswith("nvidia/cuda:"):
        cuda = re.match(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-base-", base)
        assert cuda, base
        assert flavour == f"cu{cuda.group(1)}{cuda.group(2)}", "wheel and base image CUDA differ"
    else:
        assert flavour == "cpu"
    assert re.search(r"apt-get install[^\n]*\bdcmtk\b[^\n]*\bdicom3tools\b", run)


def package_folder(package: str, setuptools: dict[str, Any]) -> Path:
    """Where setuptools finds ``package``: its folder under the nearest ``package-dir`` entry."""
    parts = package.split(".")
    for cut in range(len(parts), 0, -1):
        base = setuptools.get("package-dir", {}).get(".".join(parts[:cut]))
        if base is not None:
            return ROOT / base / "/".join(parts[cut:])
    return ROOT / "/".join(parts)


@pytest.mark.unit
def test_dockerfile_copies_what_the_build_needs_and_the_context_keeps_it(
    dockerfile: Dockerfile,
) -> None:
    ignore_file = dockerfile.path.with_name(dockerfile.path.name + ".dockerignore")
    ignore = DockerIgnore(ignore_file.read_text())
    copied: set[str] = set()
    for sources, _ in dockerfile.copies():
        for source in sources:
            path = ROOT / source
            assert path.exists(), f"COPY {source}: not in the repository"
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            kept = [f for f in files if not ignore.excludes(f.relative_to(ROOT).as_posix())]
            assert kept, f"COPY {source}: everything is excluded by {ignore_file.name}"
            copied |= {f.relative_to(ROOT).as_posix() for f in kept}
    # What `pip install .` reads: pyproject, its readme, every package and its package data.
    project = _pyproject()
    setuptools = project["tool"]["setuptools"]
    needed = {"pyproject.toml", project["project"]["readme"]}
    for package, patterns in setuptools["package-data"].items():
        folder = package_folder(package, setuptools)
        needed |= {p.relative_to(ROOT).as_posix() for pat in patterns for p in folder.glob(pat)}
    for package in setuptools["packages"]:
        folder = package_folder(package, setuptools)
        assert (folder / "__init__.py").is_file(), f"package {package} is not at {folder}"
        needed |= {p.relative_to(ROOT).as_posix() for p in folder.glob("*.py")}
    missing = sorted(needed - copied)
    assert not missing, f"the image would lack {missing}"


def _pyproject() -> dict[str, Any]:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.mark.unit
def test_dockerfile_runtime_contract(dockerfile: Dockerfile) -> None:
    exposed = {int(p.split("/")[0]) for rest in dockerfile.all("EXPOSE") for p in rest.split()}
    assert exposed == {field_default(ScpConfig, "port"), field_default(HttpConfig, "port")}

    entry = dockerfile.exec_form("ENTRYPOINT")
    assert entry == ["dicom-node"]
    args = parse_command(dockerfile.exec_form("CMD"))
    assert args.command == "serve"

    # The configuration the image carries: where DICOM_NODE_CONFIG says, valid, data on the
    # volume.
    config_path = dockerfile.env()[ENV_CONFIG_FILE]
    sources = [srcs[0] for srcs, dest in dockerfile.copies() if dest == config_path]
    assert sources, f"nothing is copied to {config_path}"
    config = load_config(ROOT / sources[0], environ={})
    assert dockerfile.one("VOLUME") == str(config.store.data_dir)

    user = dockerfile.one("USER").split(":")[0]
    assert user.isdigit() and int(user) != 0, "the image must run as a numeric non-root UID"
    assert re.search(rf"useradd [^\n]*--uid {user}\b", dockerfile.run_text())

    # The HEALTHCHECK asks the HTTP service the image's configuration starts, from inside.
    healthcheck = dockerfile.one("HEALTHCHECK")
    command = json.loads(healthcheck.split(" CMD ", 1)[1])
    url = re.search(r"http://([\d.]+):(\d+)(/\S*?)'", " ".join(command))
    assert url, healthcheck
    host, port, path = url.group(1), int(url.group(2)), url.group(3)
    assert (host, path) == ("127.0.0.1", "/healthz")
    assert port == config.http.port == field_default(HttpConfig, "port")
    assert config.http.enabled and config.http.host in ("127.0.0.1", "0.0.0.0")
    assert command[0] == "python", "the slim image has no curl; the venv's python is on PATH"


@pytest.mark.unit
def test_the_two_images_differ_only_in_how_they_get_python_and_torch() -> None:
    cpu, cuda = (Dockerfile.read(DOCKERFILES[k]) for k in ("cpu", "cuda"))
    for keyword in ("ENTRYPOINT", "CMD", "EXPOSE", "VOLUME", "USER", "HEALTHCHECK", "STOPSIGNAL"):
        assert cpu.all(keyword) == cuda.all(keyword), keyword
    assert cpu.copies() == cuda.copies()
    assert cpu.env() == cuda.env()
    assert cpu.args()["TORCH"] == cuda.args()["TORCH"]


# --- docker compose --------------------------------------------------------------------------

_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: Any, environ: dict[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} in every string, as `docker compose`
    does before anything else; an unset ${VAR:?…} is an error, as there."""
    if isinstance(value, dict):
        return {k: interpolate(v, environ) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, environ) for v in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        current = environ.get(name)
        unset = current is None or (op is not None and op.startswith(":") and current == "")
        if op in ("-", ":-") and unset:
            return arg
        if op in ("?", ":?") and unset:
            raise AssertionError(f"compose needs {name}: {arg}")
        return current or ""

    return _INTERPOLATION.sub(replace, value.replace("$$", "\0")).replace("\0", "$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return interpolate(yaml.safe_load(COMPOSE.read_text()), environ={})


# What `docker compose` reads from the shell or an --env-file for the cluster file: its secrets.
CLUSTER_COMPOSE_ENVIRON = {
    "DICOM_NODE_HTTP_TOKEN": "an-http-token-0123456789abcdef",
    "DICOM_NODE_DB_PASSWORD": "0d9f3c2b7a6e5d4c",
    "DICOM_NODE_MQ_PASSWORD": "1e8a2b3c4d5f6a7b",
    "DICOM_NODE_S3_ACCESS_KEY": "a3f09b1c2d4e5f60",
    "DICOM_NODE_S3_SECRET_KEY": "b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2",
}


@pytest.fixture(scope="module")
def cluster_compose() -> dict[str, Any]:
    return interpolate(yaml.safe_load(CLUSTER_COMPOSE.read_text()), CLUSTER_COMPOSE_ENVIRON)


@pytest.mark.unit
@pytest.mark.parametrize("path", [COMPOSE, CLUSTER_COMPOSE], ids=lambda p: p.name)
def test_compose_file_follows_the_compose_specification(path: Path) -> None:
    jsonschema = require_module("jsonschema")
    require_module("check_jsonschema")
    from importlib.resources import files

    environ = CLUSTER_COMPOSE_ENVIRON if path == CLUSTER_COMPOSE else {}
    compose = interpolate(yaml.safe_load(path.read_text()), environ)
    schema_file = files("check_jsonschema") / "builtin_schemas/vendor/compose-spec.json"
    schema = json.loads(schema_file.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)
    # The schema is strict enough to fail a misspelt key: the check can fail.
    broken = {**compose, "services": {**compose["services"], "x": {"imgae": "y"}}}
    assert list(validator.iter_errors(broken))


def mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Bind mounts of a service: container path -> file in the repository."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            out[target] = (COMPOSE.parent / source).resolve()
    return out


def published(service: dict[str, Any]) -> dict[int, int]:
    """Published ports: container port -> host port."""
    out = {}
    for spec in service.get("ports", []):
        *host, container = str(spec).split(":")
        out[int(container)] = int(host[-1]) if host else int(container)
    return out


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration))


@dataclass
class ComposeDemo:
    services: dict[str, Any]
    node_config_path: Path
    node_config: NodeConfig
    node_environ: dict[str, str]
    orthanc: dict[str, Any]


@pytest.fixture(scope="module")
def demo(compose: dict[str, Any]) -> ComposeDemo:
    services = compose["services"]
    node = services["dicom-node"]
    args = parse_command(node["command"])
    assert args.command == "serve"
    config_path = mounts(node)[args.config]
    environ = {k: str(v) for k, v in node["environment"].items()}
    orthanc_files = [p for p in mounts(services["orthanc"]).values() if p.suffix == ".json"]
    assert len(orthanc_files) == 1
    return ComposeDemo(
        services=services,
        node_config_path=config_path,
        node_config=load_config(config_path, environ=environ),
        node_environ=environ,
        orthanc=json.loads(orthanc_files[0].read_text()),
    )


@pytest.mark.unit
def test_compose_node_service(demo: ComposeDemo) -> None:
    node = demo.services["dicom-node"]
    build = node["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILES["cpu"]
    config = demo.node_config
    # HTTP beyond loopback is only valid with the token compose passes.
    assert config.http.host == "0.0.0.0" and config.http.token
    with pytest.raises(ConfigError, match=r"http\.token"):
        load_config(demo.node_config_path, environ={})
    # The configuration's ports are the ones published, and its data folder is the volume.
    assert set(published(node)) == {config.scp.port, config.http.port}
    targets = [v.split(":")[1] for v in node["volumes"] if not v.startswith(".")]
    assert str(config.store.data_dir) in targets
    assert seconds(node["stop_grace_period"]) > shutdown_budget_s()


@pytest.mark.unit
def test_compose_orthanc_and_node_point_at_each_other(demo: ComposeDemo) -> None:
    orthanc, config = demo.orthanc, demo.node_config
    node_entries = [
        (name, entry)
        for name, entry in orthanc["DicomModalities"].items()
        if entry[0] == config.scp.ae_title
    ]
    assert len(node_entries) == 1, "Orthanc's DicomModalities must list the node once"
    modality, (_, host, port) = node_entries[0]
    assert (host, port) == ("dicom-node", config.scp.port)
    assert host in demo.services
    # Results go back to the calling AE: Orthanc, at its service name and DICOM port.
    assert config.routing.destinations == ["sender"]
    peer = config.peers[orthanc["DicomAet"]]
    assert (peer.host, peer.port) == ("orthanc", orthanc["DicomPort"])
    assert config.scp.admits(orthanc["DicomAet"], "172.18.0.3")
    assert orthanc["DicomWeb"]["Enable"] is True
    assert set(published(demo.services["orthanc"])) == {orthanc["DicomPort"], orthanc["HttpPort"]}
    # The Lua script is where Orthanc looks, and routes to that modality, skipping the node's AE.
    lua_mounts = mounts(demo.services["orthanc"])
    (script,) = orthanc["LuaScripts"]
    lua = lua_mounts[script].read_text()
    assert re.search(rf"NODE_MODALITY = '{re.escape(modality)}'", lua)
    sender_aet = config.delivery.calling_ae_title or config.scp.ae_title
    assert re.search(rf"NODE_AET = '{re.escape(sender_aet)}'", lua)


def evaluate_app_config(source: str) -> dict[str, Any]:
    """OHIF's app-config.js, executed by Node.js as the browser would, as JSON."""
    node = shutil.which("node")
    if node is None:
        if os.environ.get("CI"):
            pytest.fail("node is not installed (the viewer tests need it too)")
        pytest.skip("node is not installed")
    script = (
        "var window = {location: {origin: 'http://viewer.test'}};\n"
        + source
        + "\nprocess.stdout.write(JSON.stringify(window.config));\n"
    )
    result = subprocess.run(
        [node, "-e", script], capture_output=True, text=True, timeout=30, check=True
    )
    return json.loads(result.stdout)


@pytest.mark.integration
def test_compose_ohif_reads_orthancs_dicomweb_on_its_own_origin(demo: ComposeDemo) -> None:
    ohif = demo.services["ohif"]
    files = mounts(ohif)
    template = files["/usr/src/default.conf.template"].read_text()
    # /dicom-web/ on the viewer's origin is Orthanc's DICOMweb root, Host header kept.
    location = re.search(r"location /dicom-web/ \{(.*?)\}", template, re.DOTALL)
    assert location, "the template does not proxy /dicom-web/"
    root = demo.orthanc["DicomWeb"]["Root"]
    expected = f"proxy_pass http://orthanc:{demo.orthanc['HttpPort']}{root};"
    assert expected in location.group(1)
    assert "proxy_set_header Host $http_host;" in location.group(1)
    assert "orthanc" in ohif["depends_on"]
    # Our app-config.js is what the template serves at /app-config.js.
    alias = re.search(r"location = /app-config\.js \{[^}]*alias (\S+);", template)
    assert alias and alias.group(1) in files
    config = evaluate_app_config(files[alias.group(1)].read_text())
    (source,) = config["dataSources"]
    for key in ("qidoRoot", "wadoRoot", "wadoUriRoot"):
        assert source["configuration"][key] == "http://viewer.test/dicom-web", key
    # The viewer tests drive OHIF in a real browser with this very file.
    from tests.support.viewer import APP_CONFIG_FILE

    assert files[alias.group(1)] == APP_CONFIG_FILE
    assert published(ohif)


class _ResultReceiver:
    """A Storage SCP posing as the node for Orthanc: records who sent which instance."""

    def __init__(self, ae_title: str) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        from dicom_node.testing import free_port

        self.received: list[str] = []
        self.port = free_port()
        ae = AE(ae_title=ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
        )

    def _on_store(self, event: Any) -> int:
        self.received.append(str(event.dataset.SOPInstanceUID))
        return 0x0000


def _wait_for(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


@pytest.mark.integration
def test_compose_orthanc_routes_studies_to_the_node_but_not_its_results(
    demo: ComposeDemo, tmp_path: Path
) -> None:
    """The demo's Orthanc configuration and Lua script in a real Orthanc (Debian's), with the
    addresses changed to this machine's: a study stored from a modality goes to the node once,
    in one piece; the node's results stored into the same study are not sent back."""
    from pydicom import dcmread

    from dicom_node.phantoms import CtPhantomSpec, write_ct_series
    from dicom_node.scu import send
    from dicom_node.testing import Orthanc, free_port, missing_orthanc

    lacking = missing_orthanc()
    if lacking:
        pytest.fail(f"this test needs: {', '.join(lacking)}")
    orthanc_config = demo.orthanc
    modality, (node_aet, _, _) = next(
        (name, entry)
        for name, entry in orthanc_config["DicomModalities"].items()
        if entry[0] == demo.node_config.scp.ae_title
    )
    receiver = _ResultReceiver(node_aet)
    lua = mounts(demo.services["orthanc"])[orthanc_config["LuaScripts"][0]]
    extra = {
        k: v
        for k, v in orthanc_config.items()
        if k not in ("HttpPort", "DicomPort", "RemoteAccessAllowed", "StorageDirectory")
    }
    extra |= {
        "DicomModalities": {modality: [node_aet, "127.0.0.1", receiver.port]},
        "LuaScripts": [str(lua)],
        "StableAge": 1,  # the demo's 10 s, shortened for the test
    }
    orthanc_aet = orthanc_config["DicomAet"]
    orthanc = Orthanc(tmp_path / "orthanc", dicom_port=free_port(), aet=orthanc_aet, extra=extra)
    orthanc.start()
    try:
        study = write_ct_series(tmp_path / "ct", CtPhantomSpec(slices=3, rows=32, columns=32))
        sent = send(
            study, "127.0.0.1", orthanc.dicom_port, calling_aet="MODALITY", called_aet=orthanc_aet
        )
        assert len(sent.sent) == 3
        assert _wait_for(lambda: len(receiver.received) >= 3, 20), orthanc_log(orthanc)
        study_uid = dcmread(study[0]).StudyInstanceUID
        result = write_ct_series(
            tmp_path / "result",
            CtPhantomSpec(slices=1, rows=32, columns=32, study_uid=study_uid, series_uid="2.25.1"),
        )
        assert send(
            result, "127.0.0.1", orthanc.dicom_port, calling_aet=node_aet, called_aet=orthanc_aet
        ).sent
        (study_id,) = orthanc.get("/studies")
        # The result made the study unstable; once stable again, the Lua script has run.
        time.sleep(1.5)
        assert _wait_for(lambda: orthanc.get(f"/studies/{study_id}")["IsStable"], 20)
        time.sleep(1.0)
        assert len(orthanc.get(f"/studies/{study_id}/instances")) == 4
        assert sorted(receiver.received) == sorted(str(dcmread(p).SOPInstanceUID) for p in study)
    finally:
        orthanc.stop()
        receiver.server.shutdown()


def orthanc_log(orthanc: Any) -> str:
    return (orthanc.workdir / "orthanc.log").read_text()[-3000:]


# --- docker compose, cluster mode ------------------------------------------------------------

CLUSTER_SERVERS = ("postgres", "rabbitmq", "seaweedfs")


def compose_configs(compose: dict[str, Any], service: dict[str, Any]) -> dict[str, str]:
    """A service's compose `configs` as the container sees them: target path -> text (a
    file's, relative to the cluster compose file, or inline `content`)."""
    out = {}
    for item in service.get("configs", []):
        source = item if isinstance(item, str) else item["source"]
        target = f"/{source}" if isinstance(item, str) else item.get("target", f"/{source}")
        definition = compose["configs"][source]
        if "file" in definition:
            out[target] = (CLUSTER_COMPOSE.parent / definition["file"]).read_text()
        else:
            out[target] = definition["content"]
    return out


def cluster_service_config(
    compose: dict[str, Any], name: str, tmp_path: Path
) -> tuple[argparse.Namespace, NodeConfig]:
    """The command line of a dicom-node service of the cluster file, and the configuration it
    runs with: its mounted configuration file and its environment."""
    service = compose["services"][name]
    args = parse_command(service["command"])
    config_file = tmp_path / f"{name}.yaml"
    config_file.write_text(compose_configs(compose, service)[args.config])
    environ = {k: str(v) for k, v in service["environment"].items()}
    return args, load_config(config_file, environ=environ)


def rabbitmq_settings(text: str) -> dict[str, str]:
    """RabbitMQ's new-style configuration (sysctl format): `key = value` lines."""
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line.split("#")[0])
    return {k.strip(): v.split("#")[0].strip() for k, v in pairs}


def job_time_limits(config: NodeConfig) -> dict[str, float]:
    """The run time limits jobs can have under ``config``: each installed algorithm's
    (worker.time_limits over its own), and the default of a plugin installed later."""
    from dicom_node.algorithm import Algorithm
    from dicom_node.infer import time_limits
    from dicom_node.plugins import discover

    return {"(a plugin's default)": Algorithm.time_limit_s, **time_limits(config, discover())}


@pytest.mark.unit
def test_cluster_compose_needs_its_secrets() -> None:
    raw = yaml.safe_load(CLUSTER_COMPOSE.read_text())
    for name in CLUSTER_COMPOSE_ENVIRON:
        environ = {k: v for k, v in CLUSTER_COMPOSE_ENVIRON.items() if k != name}
        with pytest.raises(AssertionError, match=name):
            interpolate(raw, environ)


@pytest.mark.unit
def test_cluster_compose_node_runs_in_cluster_mode_against_the_servers(
    cluster_compose: dict[str, Any], tmp_path: Path
) -> None:
    services = cluster_compose["services"]
    assert set(services) == {"dicom-node", "worker", *CLUSTER_SERVERS}
    node = services["dicom-node"]
    build = node["build"]
    dockerfile = (CLUSTER_COMPOSE.parent / build["context"] / build["dockerfile"]).resolve()
    assert dockerfile == DOCKERFILES["cpu"]
    args, config = cluster_service_config(cluster_compose, "dicom-node", tmp_path)
    assert args.command == "serve"
    cluster = config.cluster
    assert cluster.enabled and not config.worker.enabled
    assert config.http.host == "0.0.0.0" and config.http.token
    assert set(published(node)) == {config.scp.port, config.http.port}
    data = [v.split(":") for v in node["volumes"]]
    assert [target for _, target in data] == [str(config.store.data_dir)]
    assert all(source in cluster_compose["volumes"] for source, _ in data)
    assert seconds(node["stop_grace_period"]) > shutdown_budget_s()
    # The URLs name the compose services and the credentials each server is started with.
    postgres, broker_service, seaweedfs = (services[s] for s in CLUSTER_SERVERS)
    database = urlsplit(cluster.database_url)
    assert database.scheme == "postgresql" and (database.hostname, database.port) == (
        "postgres",
        5432,
    )
    pg_env = postgres["environment"]
    assert (database.username, database.password) == (
        pg_env["POSTGRES_USER"],
        pg_env["POSTGRES_PASSWORD"],
    )
    assert database.path == f"/{pg_env['POSTGRES_DB']}"
    broker = urlsplit(cluster.broker_url)
    mq_env = broker_service["environment"]
    assert broker.scheme == "amqp" and (broker.hostname, broker.port) == ("rabbitmq", 5672)
    assert (broker.username, broker.password) == (
        mq_env["RABBITMQ_DEFAULT_USER"],
        mq_env["RABBITMQ_DEFAULT_PASS"],
    )
    assert broker.path == f"/{mq_env['RABBITMQ_DEFAULT_VHOST']}"
    objects = cluster.objects
    assert objects.url.startswith("s3://")
    endpoint = urlsplit(objects.endpoint_url)
    flags = dict(a.split("=", 1) for a in seaweedfs["command"] if "=" in a)
    assert "-s3" in seaweedfs["command"]
    assert (endpoint.hostname, endpoint.port) == ("seaweedfs", int(flags["-s3.port"]))
    s3_config = json.loads(compose_configs(cluster_compose, seaweedfs)[flags["-s3.config"]])
    (identity,) = s3_config["identities"]
    assert {"accessKey": objects.access_key_id, "secretKey": objects.secret_access_key} in (
        identity["credentials"]
    )
    # It may write and, having Admin, create the bucket on the first upload.
    assert {"Admin", "Read", "Write", "List"} <= set(identity["actions"])


@pytest.mark.unit
def test_cluster_compose_workers_keep_nothing_and_get_gpus(
    cluster_compose: dict[str, Any], tmp_path: Path
) -> None:
    worker = cluster_compose["services"]["worker"]
    build = worker["build"]
    dockerfile = (CLUSTER_COMPOSE.parent / build["context"] / build["dockerfile"]).resolve()
    assert dockerfile == DOCKERFILES["cuda"]
    args, config = cluster_service_config(cluster_compose, "worker", tmp_path)
    assert args.command == "worker" and args.cluster
    _, node_config = cluster_service_config(cluster_compose, "dicom-node", tmp_path)
    assert config.cluster == node_config.cluster, "node and workers must reach the same servers"
    assert config.worker.device == "cuda" and not config.http.enabled
    # Stateless: no volume of any kind, no published port, no fixed replica count
    # (`--scale worker=N` decides), and the image's HTTP health check, which a worker has no
    # port for, is off.
    assert "volumes" not in worker and "ports" not in worker
    assert "scale" not in worker and "replicas" not in worker["deploy"]
    assert worker["healthcheck"] == {"disable": True}
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "count" in device or "device_ids" in device


@pytest.mark.unit
def test_cluster_compose_servers_are_durable_and_healthy_first(
    cluster_compose: dict[str, Any], tmp_path: Path
) -> None:
    services = cluster_compose["services"]
    with_volumes = {name for name, s in services.items() if s.get("volumes")}
    assert with_volumes == {"dicom-node", *CLUSTER_SERVERS}
    declared = set(cluster_compose["volumes"])
    for name in with_volumes:
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            assert source in declared, f"{name}: {source} is not a named volume"
    # Node and workers start once the servers answer their health checks.
    for name in ("dicom-node", "worker"):
        depends = services[name]["depends_on"]
        assert set(depends) == set(CLUSTER_SERVERS)
        for server in CLUSTER_SERVERS:
            assert depends[server] == {"condition": "service_healthy"}
            assert services[server]["healthcheck"]["test"][0] == "CMD"
    assert "healthcheck" not in services["dicom-node"], "the image's HEALTHCHECK applies"
    # PostgreSQL's data where the image keeps it.
    assert "/var/lib/postgresql/data" in [v.split(":")[1] for v in services["postgres"]["volumes"]]
    # RabbitMQ keeps its queues under a node name made from the host name: fixed, so that a new
    # container finds the durable queues and persistent messages of the old one.
    broker = services["rabbitmq"]
    assert broker["hostname"] and "/var/lib/rabbitmq" in [
        v.split(":")[1] for v in broker["volumes"]
    ]
    # A worker acknowledges a job's message when the job is done: RabbitMQ's consumer_timeout
    # must outlast the longest time limit a job can run under, or the broker closes the
    # worker's channel mid-job.
    (conf_target, conf_text) = next(
        (target, text)
        for target, text in compose_configs(cluster_compose, broker).items()
        if target.startswith("/etc/rabbitmq/conf.d/")
    )
    assert conf_target.endswith(".conf")
    from dicom_node.dispatch import time_limit_warning

    timeout_ms = int(rabbitmq_settings(conf_text)["consumer_timeout"])
    _, config = cluster_service_config(cluster_compose, "worker", tmp_path)
    limits = job_time_limits(config)
    assert time_limit_warning(limits, timeout_ms / 1000) is None
    # (The check can fail: RabbitMQ's own default is below the default time limit.)
    assert time_limit_warning(limits) is not None
    # The SeaweedFS health check asks the S3 port the node uses.
    seaweedfs = services["seaweedfs"]
    flags = dict(a.split("=", 1) for a in seaweedfs["command"] if "=" in a)
    assert f"http://127.0.0.1:{flags['-s3.port']}/healthz" in seaweedfs["healthcheck"]["test"]
    assert "/data" in [v.split(":")[1] for v in seaweedfs["volumes"]]
    assert flags["-dir"] == "/data"


@pytest.mark.unit
def test_rabbitmq_settings_reader() -> None:
    text = "# comment\nconsumer_timeout = 7200000  # 2 h\nloopback_users = none\n"
    assert rabbitmq_settings(text) == {"consumer_timeout": "7200000", "loopback_users": "none"}


# --- systemd ---------------------------------------------------------------------------------


def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as systemd reads it: sections of keys, a key may repeat."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path}: {line!r} outside a section"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.mark.unit
def test_systemd_unit_runs_the_node_as_the_repository_configures_it() -> None:
    service = {k: v[-1] for k, v in read_unit(UNIT)["Service"].items()}
    argv = shlex.split(service["ExecStart"])
    assert argv[0].startswith("/") and Path(argv[0]).name == "dicom-node"
    args = parse_command(argv[1:])
    assert args.command == "serve"
    # The configuration it names is the repository's deploy/dicom-node.yaml, installed there.
    assert args.config == "/etc/dicom-node/dicom-node.yaml"
    config = load_config(DEPLOY / "dicom-node.yaml", environ={})
    state = Path("/var/lib") / service["StateDirectory"]
    assert config.store.data_dir == state
    assert str(state) in service["ReadWritePaths"].split()
    assert service["Type"] == "simple"
    assert service["User"] == "dicom-node"
    assert service["KillSignal"] == "SIGTERM"
    assert float(service["TimeoutStopSec"]) > shutdown_budget_s()
    assert service["Restart"] == "on-failure"
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
    }.items():
        assert service[key] == value, key


def _systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is not installed (Debian's systemd package)")
        pytest.skip("systemd-analyze is not installed")
    return path


SYSTEMD_UNITS = [UNIT, WORKER_UNIT]


@pytest.mark.integration
@pytest.mark.parametrize("source", SYSTEMD_UNITS, ids=lambda p: p.name)
def test_systemd_unit_verifies(source: Path, tmp_path: Path) -> None:
    """`systemd-analyze verify` in a throwaway root holding the unit, systemd's own units and
    an executable where ExecStart points: it reports unknown keys and bad values on stderr.
    A template unit is verified as an instance (dicom-node-worker@0.service), which systemd
    builds from the template, specifiers (%i) resolved."""
    analyze = _systemd_analyze()
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    unit = root / "etc/systemd/system" / source.name
    unit.parent.mkdir(parents=True)
    shutil.copy(source, unit)
    target = source.name.replace("@.", "@0.") if "@." in source.name else str(unit)
    executable = root / shlex.split(read_unit(source)["Service"]["ExecStart"][-1])[0].lstrip("/")
    executable.parent.mkdir(parents=True)
    executable.write_text("#!/bin/sh\n")
    executable.chmod(0o755)

    def verify() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [analyze, "verify", "--man=no", "--generators=no", f"--root={root}", target],
            capture_output=True,
            text=True,
            timeout=60,
        )

    result = verify()
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    # The same check on a misspelt key complains: it is not a formality.
    unit.write_text(source.read_text().replace("ProtectSystem=", "ProtectSytem="))
    assert "ProtectSytem" in verify().stderr
    # And on an ExecStart with nothing there (the instance was really built and read).
    unit.write_text(source.read_text())
    executable.unlink()
    assert verify().returncode != 0


@pytest.mark.integration
@pytest.mark.parametrize("source", SYSTEMD_UNITS, ids=lambda p: p.name)
def test_systemd_unit_exposure(source: Path) -> None:
    """systemd's own score of the sandboxing (0 safest, 10 none): both units score 3.5 with
    Debian 12's systemd; dropping any one of NoNewPrivileges, ProtectSystem or PrivateTmp makes
    it 3.7, over the threshold of 3.6."""
    analyze = _systemd_analyze()
    result = subprocess.run(
        [analyze, "security", "--offline=yes", "--threshold=36", str(source)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr


def unit_environment(service: dict[str, list[str]], instance: str) -> dict[str, str]:
    """A unit's Environment= assignments, with the instance specifier %i resolved."""
    out = {}
    for line in service.get("Environment", []):
        for item in shlex.split(line):
            name, _, value = item.partition("=")
            out[name] = value.replace("%i", instance)
    return out


def env_file(path: Path) -> dict[str, str]:
    """An EnvironmentFile= as systemd reads this simple form: NAME=value lines, # comments."""
    lines = [line.strip() for line in path.read_text().splitlines()]
    pairs = [line.split("=", 1) for line in lines if line and not line.startswith("#")]
    return {name: value for name, value in pairs}


# The sandboxing of dicom-node.service that the worker unit must have too, value for value.
SYSTEMD_HARDENING = (
    "NoNewPrivileges",
    "ProtectSystem",
    "PrivateTmp",
    "ProtectHome",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectKernelLogs",
    "ProtectControlGroups",
    "ProtectClock",
    "ProtectHostname",
    "RestrictNamespaces",
    "RestrictRealtime",
    "RestrictSUIDSGID",
    "LockPersonality",
    "RestrictAddressFamilies",
    "SystemCallArchitectures",
    "CapabilityBoundingSet",
    "UMask",
    "User",
    "Group",
)


@pytest.mark.unit
def test_systemd_worker_unit_runs_a_cluster_worker_per_gpu() -> None:
    assert WORKER_UNIT.name.endswith("@.service"), "a template: one instance per GPU"
    sections = read_unit(WORKER_UNIT)
    raw = sections["Service"]
    service = {k: v[-1] for k, v in raw.items()}
    node_service = {k: v[-1] for k, v in read_unit(UNIT)["Service"].items()}
    argv = shlex.split(service["ExecStart"])
    node_argv = shlex.split(node_service["ExecStart"])
    assert argv[0] == node_argv[0], "the same installation as the node's unit"
    args = parse_command(argv[1:])
    assert args.command == "worker" and args.cluster
    assert args.config == parse_command(node_argv[1:]).config
    # The instance is the GPU's index: this worker sees that GPU only.
    instance = "1"
    environ = unit_environment(raw, instance)
    assert environ["CUDA_VISIBLE_DEVICES"] == instance
    assert "%i" in sections["Unit"]["Description"][-1]
    # Nothing to keep: restarted whatever ended it; stopped with time for a job to finish.
    assert service["Restart"] == "always"
    assert service["KillSignal"] == "SIGTERM" and service["KillMode"] == "mixed"
    assert float(service["TimeoutStopSec"]) >= 60
    for key in SYSTEMD_HARDENING:
        assert service.get(key) == node_service[key], key
    assert "ReadWritePaths" not in service and "StateDirectory" not in service
    # Scratch is the instance's own cache directory, which systemd creates writable.
    cache = Path("/var/cache") / service["CacheDirectory"].replace("%i", instance)
    # The cluster section comes from the same environment file as the node's (optional there:
    # without it the node runs embedded), with the repository's configuration file.
    assert service["EnvironmentFile"] == "/etc/dicom-node/cluster.env"
    assert node_service["EnvironmentFile"] == "-/etc/dicom-node/cluster.env"
    cluster_environ = env_file(CLUSTER_ENV)
    assert all(name.startswith("DICOM_NODE__CLUSTER__") for name in cluster_environ)
    config = load_config(DEPLOY / "dicom-node.yaml", environ=cluster_environ | environ)
    assert config.cluster.enabled and config.cluster.scratch_dir == cache
    assert (
        Path(environ["HOME"]) == cache == Path(service["WorkingDirectory"].replace("%i", instance))
    )
    assert config.worker.device == "cuda"
    node_config = load_config(DEPLOY / "dicom-node.yaml", environ=cluster_environ)
    assert node_config.cluster == config.cluster.model_copy(update={"scratch_dir": None})
    assert not load_config(DEPLOY / "dicom-node.yaml", environ={}).cluster.enabled


# --- the recipes' command lines, run ---------------------------------------------------------


def recipe_command(recipe: str, workdir: Path) -> tuple[list[str], dict[str, str]]:
    """What a recipe runs after `dicom-node`, and the environment it gives, with the container
    or host paths of configuration files mapped to the repository's files."""
    if recipe == "image":
        image = Dockerfile.read(DOCKERFILES["cpu"])
        config = dict((dest, srcs[0]) for srcs, dest in image.copies())[
            image.env()[ENV_CONFIG_FILE]
        ]
        return image.exec_form("CMD"), {ENV_CONFIG_FILE: str(ROOT / config)}
    if recipe == "compose":
        service = interpolate(yaml.safe_load(COMPOSE.read_text()), {})["services"]["dicom-node"]
        files = mounts(service)
        argv = [str(files.get(a, a)) for a in service["command"]]
        return argv, {k: str(v) for k, v in service["environment"].items()}
    if recipe == "systemd":
        argv = shlex.split(read_unit(UNIT)["Service"]["ExecStart"][-1])[1:]
        installed = {"/etc/dicom-node/dicom-node.yaml": str(DEPLOY / "dicom-node.yaml")}
        return [installed.get(a, a) for a in argv], {}
    if recipe == "chart":
        objects = manifests(helm_template())
        node = next(
            d
            for d in by_kind(objects, "Deployment")
            if d["metadata"]["labels"]["app.kubernetes.io/component"] == "node"
        )
        pod = node["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        # The ConfigMap's keys as files where the pod mounts it.
        (configmap,) = by_kind(objects, "ConfigMap")
        volume = next(v for v in pod["volumes"] if "configMap" in v)
        mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
        files = {}
        for key, text in configmap["data"].items():
            path = workdir / "configmap" / key
            path.parent.mkdir(exist_ok=True)
            path.write_text(text)
            files[f"{mount['mountPath']}/{key}"] = path
        tokens = {
            (s["metadata"]["name"], key): base64.b64decode(value).decode()
            for s in by_kind(objects, "Secret")
            for key, value in s["data"].items()
        }
        argv = [str(files.get(a, a)) for a in container["args"]]
        return argv, container_environ(container, tokens)
    raise ValueError(recipe)


@pytest.mark.integration
@pytest.mark.parametrize("recipe", ["image", "compose", "systemd", "chart"])
def test_recipe_command_starts_a_node_that_passes_the_health_check(
    recipe: str, tmp_path: Path
) -> None:
    """The recipe's own command line and environment start a real `dicom-node serve`; the
    image's HEALTHCHECK command (also compose's) passes against it; SIGTERM stops it cleanly.
    Only what cannot be on this machine is overridden: ports (free ones), the data folder, and
    no inference worker (not what is tested here, and seconds of torch start-up)."""
    serve_until_healthy(*recipe_command(recipe, tmp_path), tmp_path)


def serve_until_healthy(
    argv: list[str],
    recipe_environ: dict[str, str],
    tmp_path: Path,
    when_healthy: Callable[[], None] = lambda: None,
) -> None:
    """Start `dicom-node` with a recipe's command line and environment, wait until the image's
    HEALTHCHECK command passes, run ``when_healthy``, then SIGTERM: the exit status must be 0.
    Only what cannot be on this machine is overridden: ports (free ones), the data folder, and
    no embedded inference worker."""
    from dicom_node.testing import free_port

    http_port = free_port()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE")}
    environ |= recipe_environ | {
        "DICOM_NODE__STORE__DATA_DIR": str(tmp_path / "data"),
        "DICOM_NODE__SCP__PORT": str(free_port()),
        "DICOM_NODE__HTTP__PORT": str(http_port),
        "DICOM_NODE__WORKER__ENABLED": "false",
    }
    image = Dockerfile.read(DOCKERFILES["cpu"])
    healthcheck = json.loads(image.one("HEALTHCHECK").split(" CMD ", 1)[1])
    default_port = str(field_default(HttpConfig, "port"))
    healthcheck = [sys.executable] + [
        a.replace(f":{default_port}/", f":{http_port}/") for a in healthcheck[1:]
    ]
    log_path = tmp_path / "node.log"
    with log_path.open("w") as log:
        node = subprocess.Popen(
            [sys.executable, "-m", "dicom_node", *argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environ,
            cwd=tmp_path,
        )

    def healthy() -> bool:
        assert node.poll() is None, log_path.read_text()
        return subprocess.run(healthcheck, capture_output=True, timeout=10).returncode == 0

    try:
        assert _wait_for(healthy, 30), log_path.read_text()
        when_healthy()
    finally:
        node.send_signal(signal.SIGTERM)
        code = node.wait(60)
    assert code == 0, log_path.read_text()


def cluster_recipe_command(
    recipe: str, workdir: Path, component: str = "node"
) -> tuple[list[str], dict[str, str]]:
    """What a cluster recipe's node (or worker) runs after `dicom-node`, and its environment,
    with its configuration file mapped to the repository's (or the rendered ConfigMap's)
    copy."""
    if recipe == "compose":
        compose = interpolate(yaml.safe_load(CLUSTER_COMPOSE.read_text()), CLUSTER_COMPOSE_ENVIRON)
        service = compose["services"]["dicom-node" if component == "node" else "worker"]
        files = {}
        for target, text in compose_configs(compose, service).items():
            files[target] = workdir / Path(target).name
            files[target].write_text(text)
        argv = [str(files.get(a, a)) for a in service["command"]]
        return argv, {k: str(v) for k, v in service["environment"].items()}
    if recipe == "systemd":
        service = read_unit(UNIT if component == "node" else WORKER_UNIT)["Service"]
        argv = shlex.split(service["ExecStart"][-1])[1:]
        installed = {"/etc/dicom-node/dicom-node.yaml": str(DEPLOY / "dicom-node.yaml")}
        # The first GPU's instance.
        environ = env_file(CLUSTER_ENV) | unit_environment(service, "0")
        return [installed.get(a, a) for a in argv], environ
    if recipe == "chart":
        values = VALUE_SETS["cluster"]
        objects = manifests(helm_template(values))
        deployment = deployment_specs(objects)[component]
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        (configmap,) = by_kind(objects, "ConfigMap")
        config_file = workdir / "dicom-node.yaml"
        config_file.write_text(configmap["data"]["dicom-node.yaml"])
        secrets_ = {
            (s["metadata"]["name"], key): base64.b64decode(value).decode()
            for s in by_kind(objects, "Secret")
            for key, value in s["data"].items()
        }
        secret = values["cluster"]["existingSecret"]
        secrets_ |= {(secret, key): value for key, value in CLUSTER_SECRET.items()}
        argv = [
            str(config_file) if a.endswith("/dicom-node.yaml") else a for a in container["args"]
        ]
        return argv, container_environ(container, secrets_)
    raise ValueError(recipe)


def with_this_machines_servers(
    recipe: str,
    environ: dict[str, str],
    database_url: str,
    broker: RabbitServer,
    store: SeaweedServer,
) -> dict[str, str]:
    """A recipe's environment with the servers of this machine: the secrets the recipe must
    pass by environment replaced (each must be there), the S3 endpoint set over whatever
    the environment or the configuration file says."""
    objects = store.settings("s3://unused")
    secrets_ = {
        "DATABASE_URL": database_url,
        "BROKER_URL": broker.url,
        "OBJECTS__ACCESS_KEY_ID": objects["access_key_id"],
        "OBJECTS__SECRET_ACCESS_KEY": objects["secret_access_key"],
    }
    out = dict(environ)
    for key, value in secrets_.items():
        name = f"DICOM_NODE__CLUSTER__{key}"
        assert name in environ, f"the {recipe} recipe does not set {name}"
        out[name] = value
    out["DICOM_NODE__CLUSTER__OBJECTS__ENDPOINT_URL"] = objects["endpoint_url"]
    return out


@pytest.mark.integration
@pytest.mark.parametrize("recipe", ["compose", "systemd", "chart"])
def test_cluster_recipe_starts_a_node_in_cluster_mode(
    recipe: str,
    tmp_path: Path,
    postgres_url: str,  # noqa: F811
    rabbitmq: RabbitServer,  # noqa: F811
    seaweedfs: SeaweedServer,
) -> None:
    """A cluster recipe's node command line, configuration and environment start a real
    `dicom-node serve` in cluster mode against real servers: it creates its schema in
    PostgreSQL and its bucket in SeaweedFS, passes the health check and stops cleanly. Only
    the servers' addresses and credentials are this machine's (the recipe's own variables
    carry them)."""
    argv, recipe_environ = cluster_recipe_command(recipe, tmp_path)
    environ = with_this_machines_servers(recipe, recipe_environ, postgres_url, rabbitmq, seaweedfs)
    config = load_config(
        argv[argv.index("--config") + 1], environ=environ | {"DICOM_NODE__WORKER__ENABLED": "0"}
    )
    bucket = urlsplit(str(config.cluster.objects.url)).netloc

    def in_cluster_mode() -> None:
        import psycopg

        with psycopg.connect(postgres_url) as conn:
            tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables").fetchall()}
        assert {"jobs", "instances"} <= tables, tables
        seaweedfs.client().head_bucket(Bucket=bucket)

    serve_until_healthy(argv, environ, tmp_path, in_cluster_mode)


@pytest.mark.integration
@pytest.mark.parametrize("recipe", ["compose", "systemd", "chart"])
def test_cluster_recipe_starts_a_worker_that_consumes_every_algorithm_queue(
    recipe: str,
    tmp_path: Path,
    postgres_url: str,  # noqa: F811
    rabbitmq: RabbitServer,  # noqa: F811
    seaweedfs: SeaweedServer,
) -> None:
    """A cluster recipe's worker command line, configuration and environment start a real
    `dicom-node worker --cluster`: it consumes every installed algorithm's queue on a real
    RabbitMQ, and SIGTERM (a warm shutdown) ends it with 0. Overridden besides the servers:
    the CPU for the GPU, and scratch and HOME in this test's folder."""
    from dicom_node.cluster_worker import installed_algorithms
    from dicom_node.dispatch import queue_name

    argv, recipe_environ = cluster_recipe_command(recipe, tmp_path, component="worker")
    assert parse_command(argv).cluster
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE")}
    environ |= with_this_machines_servers(
        recipe, recipe_environ, postgres_url, rabbitmq, seaweedfs
    ) | {
        "DICOM_NODE__WORKER__DEVICE": "cpu",
        "DICOM_NODE__CLUSTER__SCRATCH_DIR": str(tmp_path / "scratch"),
        "HOME": str(tmp_path),
    }
    expected = {queue_name(a) for a in installed_algorithms()}

    def consumed() -> bool:
        assert worker.poll() is None, log_path.read_text()
        listing = rabbitmq.ctl("list_queues", "--quiet", "--no-table-headers", "name", "consumers")
        counts = dict(line.split() for line in listing.splitlines() if line.strip())
        return all(int(counts.get(q, 0)) >= 1 for q in expected)

    log_path = tmp_path / "worker.log"
    with log_path.open("w") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "dicom_node", *argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environ,
            cwd=tmp_path,
        )
    try:
        assert _wait_for(consumed, 90), log_path.read_text()
    finally:
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(60)
    assert code == 0, log_path.read_text()


# --- Helm ------------------------------------------------------------------------------------
#
# The chart is rendered and linted by real Helm: helm-python-sdk (a dev dependency) embeds Helm's
# Go library, so `helm template` and `helm lint --strict` run in this process, without a helm
# binary or a cluster (`lookup` finds nothing there, as in `helm template`).

RELEASE, NAMESPACE = "demo", "pacs"


def load_chart() -> Any:
    """The chart as Helm's own loader reads it (a context manager: the Go side is freed)."""
    return require_module("helm_python.chart").Chart.load(str(CHART))


def helm_template(values: dict[str, Any] | None = None) -> dict[str, str]:
    """``helm template demo deploy/helm/dicom-node -n pacs`` with ``values`` over the chart's
    own: each rendered file by its name (NOTES.txt, deployment.yaml, ...)."""
    with load_chart() as chart:
        rendered = chart.render(
            values=values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True
        )
    return {Path(name).name: text for name, text in rendered.items()}


def release_values(values: dict[str, Any]) -> dict[str, Any]:
    """The values a release with ``values`` uses: the chart's defaults coalesced by Helm."""
    with load_chart() as chart:
        return chart.merge_values(values)


VALUE_SETS = {
    "defaults": {},
    "gpu-worker": {
        "gpuWorker": {"enabled": True, "nodeSelector": {"nvidia.com/gpu.present": "true"}},
        "service": {"dicom": {"type": "NodePort", "nodePort": 30104}},
        "httpToken": {"existingSecret": "pacs-token"},
        "persistence": {"existingClaim": "node-disk"},
    },
    # External PostgreSQL, RabbitMQ and S3 (the chart's default for cluster mode), their
    # secrets in a Secret of the user's.
    "cluster": {
        "cluster": {"enabled": True, "existingSecret": "dicom-node-cluster"},
        "config": {
            "cluster": {
                "objects": {
                    "url": "s3://dicom-node/pacs",
                    "endpoint_url": "http://seaweedfs-s3.storage:8333",
                    "region": "us-east-1",
                },
                "lease_s": 45,
            }
        },
        "worker": {"replicas": 3, "nodeSelector": {"nvidia.com/gpu.present": "true"}},
    },
    "cluster-keda": {
        "cluster": {"enabled": True, "existingSecret": "dicom-node-cluster"},
        "config": {"cluster": {"objects": {"url": "s3://dicom-node"}}},
        "worker": {"keda": {"enabled": True, "maxReplicas": 6}},
        "httpToken": {"existingSecret": "pacs-token"},
    },
}

# What the user's cluster Secret holds, for the pods' environment in these tests: the keys the
# chart reads by default (its S3 key pair is optional; this one has it).
CLUSTER_SECRET = {
    "database-url": "postgresql://dicom_node:0d9f3c2b@postgres.db:5432/dicom_node",
    "broker-url": "amqp://dicom_node:1e8a2b3c@rabbitmq.mq:5672/dicom-node",
    "access-key-id": "a3f09b1c2d4e5f60",
    "secret-access-key": "b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2",
}


def manifests(rendered: dict[str, str]) -> list[dict[str, Any]]:
    docs = []
    for name, text in rendered.items():
        if name.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d is not None]
    return docs


@pytest.fixture(params=sorted(VALUE_SETS), ids=str, scope="module")
def rendered(request: pytest.FixtureRequest) -> dict[str, Any]:
    values = VALUE_SETS[request.param]
    return {"values": values, "objects": manifests(helm_template(values))}


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


@pytest.mark.unit
def test_chart_metadata_and_notes() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "dicom-node"
    assert chart["appVersion"] == _pyproject()["project"]["version"]
    notes = helm_template()["NOTES.txt"]
    assert "DICOMNODE" in notes and "demo-dicom-node-dicom" in notes


def container_environ(
    container: dict[str, Any], secrets_: dict[tuple[str, str], str]
) -> dict[str, str]:
    """A container's environment as the pod would see it (secretKeyRef resolved; an optional
    key the Secret lacks is left out, as Kubernetes does)."""
    environ = {}
    for item in container.get("env", []):
        if "value" in item:
            environ[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            if (ref["name"], ref["key"]) in secrets_ or not ref.get("optional"):
                environ[item["name"]] = secrets_[ref["name"], ref["key"]]
    return environ


@pytest.mark.unit
def test_chart_pods_run_valid_configurations_and_commands(
    rendered: dict[str, Any], tmp_path: Path
) -> None:
    objects, values = rendered["objects"], rendered["values"]
    (configmap,) = by_kind(objects, "ConfigMap")
    config_file = tmp_path / "dicom-node.yaml"
    config_file.write_text(configmap["data"]["dicom-node.yaml"])
    # The token the pods get: the chart's Secret, or (existingSecret) a stand-in for the user's.
    tokens = {
        (s["metadata"]["name"], key): base64.b64decode(value).decode()
        for s in by_kind(objects, "Secret")
        for key, value in s["data"].items()
    }
    existing = release_values(values)
    token = existing["httpToken"]
    if token["existingSecret"]:
        assert not tokens, "the chart must not create a Secret the user brings"
        tokens[token["existingSecret"], token["key"]] = "a-token-of-the-users-own-0123"
    else:
        assert all(len(t) >= 16 for t in tokens.values())
    cluster = existing["cluster"]["enabled"]
    if cluster:
        secret = existing["cluster"]["existingSecret"]
        assert secret not in tokens and secret not in {s for s, _ in tokens}
        tokens |= {(secret, key): value for key, value in CLUSTER_SECRET.items()}
    deployments = {
        d["metadata"]["labels"]["app.kubernetes.io/component"]: d
        for d in objects
        if d["kind"] == "Deployment"
    }
    gpu = existing["gpuWorker"]["enabled"]
    assert set(deployments) == (
        {"node", "worker"} if cluster else {"node", "gpu-worker"} if gpu else {"node"}
    )
    for component, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        args = parse_command(container["args"])
        assert args.command == ("serve" if component == "node" else "worker")
        mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
        assert Path(args.config).parent == Path(mount["mountPath"])
        environ = container_environ(container, tokens)
        config = load_config(config_file, environ=environ)
        assert config.cluster.enabled is cluster
        # The node's worker is off exactly when the GPU worker or cluster workers run
        # inference instead.
        if component == "node":
            assert config.worker.enabled is not (gpu or cluster)
            assert config.http.enabled and config.http.host == "0.0.0.0"
        else:
            assert args.cluster is (component == "worker")
            assert config.worker.device.startswith("cuda")
            assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
            # A cluster worker runs one process per GPU the pod was given, said outright.
            if args.cluster:
                assert args.processes == container["resources"]["limits"]["nvidia.com/gpu"]
        if component != "worker":
            data = next(m for m in container["volumeMounts"] if m["name"] == "data")
            assert Path(data["mountPath"]) == config.store.data_dir
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["terminationGracePeriodSeconds"] > (
            shutdown_budget_s() if component == "node" else 0
        )


@pytest.mark.unit
def test_chart_node_pod_ports_probes_and_services(rendered: dict[str, Any]) -> None:
    objects = rendered["objects"]
    (configmap,) = by_kind(objects, "ConfigMap")
    config = yaml.safe_load(configmap["data"]["dicom-node.yaml"])
    node = next(
        d
        for d in by_kind(objects, "Deployment")
        if d["metadata"]["labels"]["app.kubernetes.io/component"] == "node"
    )
    assert node["spec"]["replicas"] == 1 and node["spec"]["strategy"]["type"] == "Recreate"
    (container,) = node["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"dicom": config["scp"]["port"], "http": config["http"]["port"]}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    selector = node["spec"]["selector"]["matchLabels"]
    assert node["spec"]["template"]["metadata"]["labels"] == selector
    services = {s["metadata"]["name"].rsplit("-", 1)[1]: s for s in by_kind(objects, "Service")}
    assert set(services) == {"dicom", "http"}
    for name, service in services.items():
        assert service["spec"]["selector"] == selector
        (port,) = service["spec"]["ports"]
        assert port["targetPort"] == name and name in ports
    dicom = services["dicom"]["spec"]
    if dicom["type"] != "ClusterIP":
        assert dicom["externalTrafficPolicy"] == "Local"


@pytest.mark.unit
def test_chart_gpu_worker_shares_the_node_pods_machine_and_volume() -> None:
    objects = manifests(helm_template(VALUE_SETS["gpu-worker"]))
    deployments = {
        d["metadata"]["labels"]["app.kubernetes.io/component"]: d["spec"]
        for d in by_kind(objects, "Deployment")
    }
    node, worker = deployments["node"], deployments["gpu-worker"]
    (term,) = worker["template"]["spec"]["affinity"]["podAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"] == node["selector"]["matchLabels"]

    def claim(spec: dict[str, Any]) -> str:
        volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
        return volumes["data"]["persistentVolumeClaim"]["claimName"]

    assert claim(node) == claim(worker) == "node-disk"
    assert not by_kind(objects, "PersistentVolumeClaim"), "the user's claim is used as it is"
    # The node pod must be able to land where the GPU worker can follow it.
    node_pod, worker_pod = node["template"]["spec"], worker["template"]["spec"]
    assert node_pod["nodeSelector"] == worker_pod["nodeSelector"]
    assert node_pod["tolerations"] == worker_pod["tolerations"]
    # By default the chart creates a ReadWriteOnce claim that outlives uninstall.
    (pvc,) = by_kind(manifests(helm_template()), "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def deployment_specs(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        d["metadata"]["labels"]["app.kubernetes.io/component"]: d
        for d in by_kind(objects, "Deployment")
    }


@pytest.mark.unit
def test_chart_cluster_workers_keep_nothing_and_go_wherever_a_gpu_is() -> None:
    values = VALUE_SETS["cluster"]
    objects = manifests(helm_template(values))
    deployments = deployment_specs(objects)
    node, worker = deployments["node"]["spec"], deployments["worker"]["spec"]
    pod = worker["template"]["spec"]
    # No affinity to the node pod (nor any other), no persistent volume: the configuration
    # and scratch only, both gone with the pod.
    assert "affinity" not in pod
    assert {v["name"]: sorted(set(v) - {"name"}) for v in pod["volumes"]} == {
        "config": ["configMap"],
        "tmp": ["emptyDir"],
    }
    (container,) = pod["containers"]
    assert {m["name"] for m in container["volumeMounts"]} == {"config", "tmp"}
    assert pod["nodeSelector"] == values["worker"]["nodeSelector"]
    assert worker["replicas"] == values["worker"]["replicas"]
    # An update replaces one worker at a time without needing a spare GPU.
    assert worker["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    # The cluster's secrets come from the user's Secret, by name; the chart creates none.
    secret = values["cluster"]["existingSecret"]
    for spec in (node, worker):
        (c,) = spec["template"]["spec"]["containers"]
        refs = {
            e["name"]: e["valueFrom"]["secretKeyRef"]["name"]
            for e in c["env"]
            if e["name"].startswith("DICOM_NODE__CLUSTER__")
        }
        assert set(refs) == {
            "DICOM_NODE__CLUSTER__DATABASE_URL",
            "DICOM_NODE__CLUSTER__BROKER_URL",
            "DICOM_NODE__CLUSTER__OBJECTS__ACCESS_KEY_ID",
            "DICOM_NODE__CLUSTER__OBJECTS__SECRET_ACCESS_KEY",
        }
        assert set(refs.values()) == {secret}
    assert secret not in {s["metadata"]["name"] for s in by_kind(objects, "Secret")}
    # The node keeps its own volume (received instances) and placement; no gpu-worker.
    assert "gpu-worker" not in deployments
    node_pod = node["template"]["spec"]
    assert "nodeSelector" not in node_pod and "tolerations" not in node_pod
    assert by_kind(objects, "PersistentVolumeClaim")
    # Without a Secret's S3 key pair the workers take boto3's own credentials (IRSA, roles).
    no_keys = {k: v for k, v in CLUSTER_SECRET.items() if "access-key" not in k}
    environ = container_environ(
        worker["template"]["spec"]["containers"][0], {(secret, k): v for k, v in no_keys.items()}
    )
    assert not any("ACCESS_KEY" in name for name in environ)


@pytest.mark.unit
def test_chart_keda_scales_workers_on_the_algorithm_queues_only_when_enabled(
    rendered: dict[str, Any],
) -> None:
    objects, values = rendered["objects"], release_values(rendered["values"])
    keda = [o for o in objects if o["apiVersion"].startswith("keda.sh/")]
    enabled = values["cluster"]["enabled"] and values["worker"]["keda"]["enabled"]
    if not enabled:
        assert not keda
        return
    (scaled,) = by_kind(keda, "ScaledObject")
    (auth,) = by_kind(keda, "TriggerAuthentication")
    assert {o["apiVersion"] for o in keda} == {"keda.sh/v1alpha1"} and len(keda) == 2
    worker = deployment_specs(objects)["worker"]
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {"name": worker["metadata"]["name"]}
    # KEDA owns the replica count: the Deployment does not set one to fight it.
    assert "replicas" not in worker["spec"]
    settings = values["worker"]["keda"]
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (
        settings["minReplicas"],
        settings["maxReplicas"],
    )
    assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    # One trigger per queue of the project's algorithms (dicom-node.<algorithm>), read over
    # AMQP with the broker URL from the cluster Secret.
    queues = set()
    for trigger in spec["triggers"]:
        assert trigger["type"] == "rabbitmq"
        meta = trigger["metadata"]
        assert set(meta) == {"protocol", "mode", "value", "queueName"}
        assert meta["protocol"] == "amqp" and meta["mode"] == "QueueLength"
        assert int(meta["value"]) >= 1
        assert trigger["authenticationRef"] == {"name": auth["metadata"]["name"]}
        queues.add(meta["queueName"])
    from dicom_node.dispatch import queue_name

    algorithms = _pyproject()["project"]["entry-points"]["dicom_node.algorithms"]
    assert queues == {queue_name(name) for name in algorithms}
    (target,) = auth["spec"]["secretTargetRef"]
    assert target == {
        "parameter": "host",
        "name": values["cluster"]["existingSecret"],
        "key": values["cluster"]["secretKeys"]["brokerUrl"],
    }


@pytest.mark.unit
@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"cluster": {"enabled": True}}, r"cluster\.existingSecret"),
        ({"cluster": {"enabled": True, "existingSecret": "s"}}, r"config\.cluster\.objects\.url"),
        (
            {
                **VALUE_SETS["cluster"],
                "gpuWorker": {"enabled": True},
            },
            "exclude each other",
        ),
    ],
    ids=["no-secret", "no-objects-url", "with-gpu-worker"],
)
def test_chart_refuses_incomplete_cluster_values(values: dict[str, Any], message: str) -> None:
    errors = require_module("helm_python.errors")
    with pytest.raises(errors.HelmRenderError, match=message):
        helm_template(values)


@pytest.mark.unit
def test_chart_objects_follow_kubernetes_schemas(rendered: dict[str, Any]) -> None:
    """Strict schemas (unknown fields are errors) of the oldest and newest Kubernetes the
    validator knows. Optional: kubernetes-validate is 100 MB of schemas."""
    try:
        import kubernetes_validate
    except ImportError:
        pytest.skip("kubernetes-validate is not installed (optional, large)")
    versions = sorted(
        (p.name.split("-")[0][1:] for p in _schema_dirs(kubernetes_validate)),
        key=lambda v: tuple(int(x) for x in v.split(".")),
    )
    # KEDA's custom resources have no Kubernetes schema (test_chart_keda_* checks them).
    core = [o for o in rendered["objects"] if not o["apiVersion"].startswith("keda.sh/")]
    for version in (versions[0], versions[-1]):
        for obj in core:
            kubernetes_validate.validate(obj, version, strict=True)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({**rendered["objects"][0], "spce": {}}, versions[-1], True)


def _schema_dirs(module: ModuleType) -> list[Path]:
    base = Path(module.__file__).parent / "kubernetes-json-schema"
    return [p for p in base.iterdir() if p.name.endswith("-local-strict")]


@pytest.mark.unit
@pytest.mark.parametrize("values", sorted(VALUE_SETS), ids=str)
def test_chart_lints_strictly_with_helm(values: str) -> None:
    """`helm lint --strict`: a warning is as bad as an error."""
    lint = require_module("helm_python.chart").lint
    report = lint(str(CHART), VALUE_SETS[values], strict=True, namespace=NAMESPACE)
    # Helm's lint severities: 1 info, 2 warning, 4 error.
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, problems
