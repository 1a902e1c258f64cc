"""Configuration: defaults, file, environment, and one clear message with exit 2 when bad."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dicom_node.config import load_config
from dicom_node.errors import ConfigError
from tests.support.paths import ROOT


def cli(*args: str, env: dict | None = None, cwd: Path | None = None):
    return subprocess.run(
        [sys.executable, "-m", "dicom_node", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
    )


@pytest.mark.unit
def test_embedded_defaults() -> None:
    config = load_config(None, {})
    assert config.scp.ae_title == "DICOMNODE"
    assert config.scp.port == 11112
    assert config.store.data_dir == Path("dicom-node-data")
    assert config.scp.allowed_calling_aets is None
    assert config.assembly.series_quiet_seconds == 5


@pytest.mark.unit
def test_file_then_environment(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text("scp:\n  port: 104\n  allowed_calling_aets: [PACS, 'CT@10.0.0.7']\n")
    config = load_config(
        path, {"DICOM_NODE__SCP__PORT": "11113", "DICOM_NODE__ASSEMBLY__SERIES_QUIET_SECONDS": "2"}
    )
    assert config.scp.port == 11113
    assert config.assembly.series_quiet_seconds == 2
    assert config.scp.admits("PACS", "192.168.1.1")
    assert config.scp.admits("CT", "10.0.0.7")
    assert not config.scp.admits("CT", "10.0.0.8")
    assert not config.scp.admits("OTHER", "10.0.0.7")


@pytest.mark.unit
def test_repository_default_config_is_valid_and_enables_the_allow_list() -> None:
    config = load_config(ROOT / "deploy" / "dicom-node.yaml", {})
    assert config.scp.allowed_calling_aets


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "environ", "message"),
    [
        ("scp:\n  prot: 104\n", {}, "scp.prot: unknown key"),
        ("scp:\n  port: 70000\n", {}, "scp.port:"),
        ("scp:\n  ae_title: 'WAY TOO LONG AE TITLE'\n", {}, "scp.ae_title:"),
        ("scp:\n  tls:\n    enabled: true\n", {}, "scp.tls"),
        ("store: [1, 2]\n", {}, "store:"),
        ("", {"DICOM_NODE__SCP__MAX_ASSOCIATIONS": "many"}, "scp.max_associations:"),
        ("scp: {port: [\n", {}, "is not valid YAML"),
    ],
)
def test_bad_configuration_names_the_key(tmp_path: Path, text, environ, message) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(path, environ)


@pytest.mark.integration
def test_cli_config_check_exit_codes(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("scp:\n  prot: 104\n")
    result = cli("config", "check", "--config", str(bad))
    assert result.returncode == 2
    assert result.stderr.strip() == "dicom-node: configuration error: scp.prot: unknown key"
    assert cli("config", "check", "--config", str(tmp_path / "missing.yaml")).returncode == 2
    # serve refuses a bad config the same way, before binding anything.
    assert cli("serve", "--config", str(bad)).returncode == 2
    good = cli("config", "check", "--config", str(ROOT / "deploy" / "dicom-node.yaml"))
    assert good.returncode == 0, good.stderr


@pytest.mark.integration
@pytest.mark.parametrize(
    ("section", "message"),
    [
        # The safety case: a misspelt `bundle` would have run the demo weights.
        (
            "lung-nodules-ct: {bundel: /models/lung}",
            "algorithms.lung-nodules-ct.bundel: unknown setting",
        ),
        (
            "pneumonia-cxr: {variant: kids}",
            "algorithms.pneumonia-cxr.variant: Input should be 'rsna' or 'all'",
        ),
        (
            "lung-nodule-ct: {bundle: /models/lung}",
            "algorithms.lung-nodule-ct: no such algorithm installed",
        ),
    ],
)
def test_cli_config_check_validates_algorithm_settings(tmp_path: Path, section, message) -> None:
    """Each algorithm's section is checked by its own Settings model, one line naming the key."""
    path = tmp_path / "node.yaml"
    path.write_text(f"algorithms:\n  {section}\n")
    result = cli("config", "check", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.startswith(f"dicom-node: configuration error: {message}")
    assert result.stderr.count("\n") == 1, result.stderr
    listing = cli("algorithms", "--config", str(path))  # the same refusal, in the listing
    if "no such algorithm" not in message:
        assert listing.returncode == 1 and message in listing.stdout


@pytest.mark.integration
def test_cli_config_check_accepts_valid_algorithm_settings(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text(
        "algorithms:\n"
        "  lung-nodules-ct: {report_threshold: 0.4, enclosed_only: false}\n"
        "  brain-tumour-mr: {}\n"
        "  pneumonia-cxr: {variant: all, allow_pickle: false}\n"
    )
    result = cli("config", "check", "--config", str(path))
    assert (result.returncode, result.stdout) == (0, "configuration OK\n"), result.stderr


@pytest.mark.integration
def test_cli_config_show_round_trips(tmp_path: Path) -> None:
    result = cli("config", "show", env={"DICOM_NODE__SCP__PORT": "4242", "PATH": ""})
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["scp"]["port"] == 4242
    path = tmp_path / "shown.yaml"
    path.write_text(result.stdout)
    assert load_config(path, {}).scp.port == 4242


@pytest.mark.integration
def test_cli_echo_and_send_report_failures(tmp_path: Path, make_node) -> None:
    node = make_node()
    assert cli("echo", "127.0.0.1", str(node.port)).returncode == 0
    assert cli("echo", "127.0.0.1", str(node.port), "--aec", "NOTUS").returncode == 1
    folder = tmp_path / "upload"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "notes.txt").write_text("not DICOM")
    result = cli("send", str(folder), "--port", str(node.port))
    assert result.returncode == 0 and "skipped" in result.stderr
    assert "sent 0, failed 0, skipped 1" in result.stdout


@pytest.mark.integration
def test_cli_send_goes_on_past_bad_files(tmp_path: Path, make_node) -> None:
    """`dicom-node send` takes each file's SOP class from its file meta (PS3.10 7.1), as
    storescu does; a file it cannot send, or the node refuses, is one line with its name and
    why (never a value from it) and the send goes on; then the counts, exit 1. Before, the
    file without SOP UIDs in its data set ended the send with a traceback."""
    from pydicom import dcmwrite
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

    from dicom_node.phantoms import CtPhantomSpec, ct_series
    from dicom_node.store import encode_file_meta
    from tests.support.encoding import deep_sequence, encoded, put

    node = make_node()
    folder = tmp_path / "upload"
    folder.mkdir()
    spec = CtPhantomSpec(slices=5, rows=16, columns=16, patient_id="SEND-4711")
    a, b, c, d, e = ct_series(spec)
    del a.SOPClassUID, a.SOPInstanceUID  # its file meta still names them
    dcmwrite(folder / "1-no-sop-uids-in-data-set.dcm", a, enforce_file_format=True)
    dcmwrite(folder / "2-ok.dcm", b, enforce_file_format=True)
    b.SOPClassUID = MRImageStorage  # the data set contradicts the meta, which names CT
    meta = encode_file_meta(CTImageStorage, b.SOPInstanceUID, ExplicitVRLittleEndian, "X")
    (folder / "3-meta-says-ct.dcm").write_bytes(meta + encoded(b))
    del c.SOPClassUID, c.SOPInstanceUID
    c.preamble = b"\0" * 128
    c.file_meta = FileMetaDataset()
    c.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dcmwrite(folder / "4-no-sop-uids-anywhere.dcm", c, enforce_file_format=False)
    dcmwrite(folder / "5-ok.dcm", d, enforce_file_format=True)
    (folder / "6-notes.txt").write_text("not DICOM")
    dcmwrite(folder / "7-ok.dcm", e, enforce_file_format=True)
    # A data set pydicom cannot read is sent as it is, by its meta: the node's to refuse.
    deep = put(encoded(e), 0x00400275, deep_sequence(0x00400275, 5000))
    meta = encode_file_meta(CTImageStorage, generate_uid(), ExplicitVRLittleEndian, "X")
    (folder / "8-nested-too-deep.dcm").write_bytes(meta + deep)

    result = cli("send", str(folder), "--port", str(node.port))
    assert "Traceback" not in result.stderr, result.stderr
    lines = sorted(result.stderr.splitlines())  # files that cannot be sent are said first
    assert lines == [
        f"failed {folder / '1-no-sop-uids-in-data-set.dcm'}: status 0xC000",
        f"failed {folder / '3-meta-says-ct.dcm'}: status 0xA900",
        f"failed {folder / '4-no-sop-uids-anywhere.dcm'}:"
        " no SOP Class UID and SOP Instance UID in the file meta or in the data set",
        f"failed {folder / '8-nested-too-deep.dcm'}: status 0xC000",
        f"skipped {folder / '6-notes.txt'}: " + lines[4].split(": ", 1)[1],
    ], result.stderr
    assert lines[4].split(": ", 1)[1].startswith("not a DICOM Part-10 file")
    assert result.stdout.splitlines() == ["sent 3, failed 4, skipped 1"]
    assert result.returncode == 1
    assert "SEND-4711" not in result.stdout + result.stderr
    stored = {r[0] for r in node.query("SELECT sop_instance_uid FROM instances")}
    assert stored == {b.SOPInstanceUID, d.SOPInstanceUID, e.SOPInstanceUID}


@pytest.mark.integration
@pytest.mark.parametrize(
    "args", [("status",), ("conformance", "tables"), ("config", "reference"), ("jobs",)]
)
def test_cli_output_into_a_closed_pipe(tmp_path: Path, args: tuple[str, ...]) -> None:
    """`dicom-node status | head` and the like: a reader that stops reading ends the command
    quietly, exit 141 as if by SIGPIPE (as `yes | head` does), without a traceback."""
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({"store": {"data_dir": str(tmp_path / "data")}}))
    with_config = ("--config", str(config)) if args[0] in ("status", "jobs") else ()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dicom_node", *args, *with_config],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the command writes anything
    stderr = proc.stderr.read()
    assert proc.wait(60) == 141, stderr
    assert stderr == ""


@pytest.mark.integration
def test_phantom_ct_is_a_valid_ct_image(tmp_path: Path) -> None:
    """The phantom every test and benchmark sends passes dicom3tools' IOD validator."""
    from dicom_node.phantoms import CtPhantomSpec, write_ct_series
    from tests.support.peers import require_tool

    (path,) = write_ct_series(tmp_path, CtPhantomSpec(slices=1, rows=32, columns=32))
    result = subprocess.run(
        [require_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert errors == [], result.stderr


@pytest.mark.unit
def test_configuration_reference_matches_the_model() -> None:
    """docs/configuration.md is generated from the model; regenerate it when this fails:
    dicom-node config reference > docs/configuration.md"""
    from dicom_node.config_reference import configuration_reference

    docs = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    assert docs.read_text() == configuration_reference()
    # Every key says what it means.
    for line in configuration_reference().splitlines()[8:]:
        assert not line.rstrip().endswith("|  |"), line
