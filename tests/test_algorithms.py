"""The plugin API: entry-point discovery, inputs as volumes, results as plain data."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from importlib.metadata import EntryPoint
from pathlib import Path

import numpy as np
import pytest
from pydantic import BaseModel
from pydicom import dcmread

from dicom_node.algorithm import (
    DEMO_WARNING,
    Algorithm,
    AlgorithmResult,
    Classification,
    Finding,
    HeatMap,
    InputError,
    InputSpec,
    LabelMask,
    SeriesInput,
    TrainedAlgorithm,
    Weights,
)
from dicom_node.config import ResultsConfig
from dicom_node.errors import ConfigError
from dicom_node.infer import made_by
from dicom_node.phantoms import CxrPhantomSpec, cxr_dataset
from dicom_node.plugins import ENTRY_POINT_GROUP, discover, register
from dicom_node.route import installed_algorithms
from dicom_node.write import Provenance, write_all
from tests.support.cases import ct_case
from tests.support.node import plugin_env
from tests.support.paths import corpus_ct


@pytest.mark.unit
def test_entry_points_are_discovered_and_broken_ones_reported(example_plugins) -> None:
    found = discover()
    assert found["example-threshold"].algorithm is not None
    assert found["example-broken"].algorithm is None
    assert "ModuleNotFoundError" in found["example-broken"].error
    assert "example-threshold" in installed_algorithms()
    assert "example-broken" not in installed_algorithms()


@pytest.mark.integration
def test_cli_lists_algorithms_with_weights_and_device(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dicom_node", "algorithms", "--json"],
        capture_output=True,
        text=True,
        env=plugin_env(),
        cwd=tmp_path,
        timeout=60,
    )
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["example-threshold"]["version"] == "1.0"
    assert rows["example-threshold"]["weights"] == "no weights"
    assert rows["example-threshold"]["device"] == "cpu"
    assert "error" in rows["example-broken"]
    assert result.returncode == 1  # a broken plugin is worth a non-zero exit


@pytest.mark.unit
def test_series_input_volume_is_sorted_whatever_the_file_order(corpus: Path) -> None:
    paths = corpus_ct(corpus)
    forward = SeriesInput("1.2.3", tuple(paths)).volume()
    backward = SeriesInput("1.2.3", tuple(reversed(paths))).volume()
    assert forward.array.shape == (30, 512, 512)
    assert np.array_equal(forward.array, backward.array)
    assert np.allclose(forward.affine, backward.affine)


@pytest.mark.unit
def test_series_input_volume_of_an_enhanced_multiframe(corpus: Path) -> None:
    folder = corpus / "reference-seg-sr-dcmqi" / "data" / "segmentations" / "23x38x3" / "multiframe"
    (path,) = [p for p in folder.iterdir() if p.is_file()]
    volume = SeriesInput("1.2.3", (path,)).volume()
    assert volume.array.shape[0] == 3


TS_IMAGES = "transfer-syntaxes-cornerstone/testImages"
# Transfer syntaxes by their UID after 1.2.840.10008.; lossy ones with the HU error allowed.
LOSSY = {"1.2.4.50": 100, "1.2.4.51": 100, "1.2.4.81": 2, "1.2.4.91": 10}
LOSSLESS = ["1.2", "1.2.1", "1.2.2", "1.2.1.99", "1.2.5", "1.2.4.57", "1.2.4.70", "1.2.4.80"]
LOSSLESS += ["1.2.4.90"]
UNDECODABLE = {"1.2.4.53", "1.2.4.55"}  # JPEG spectral selection / full progression


@pytest.mark.unit
@pytest.mark.parametrize(
    "syntax",
    [*LOSSLESS, *LOSSY],
)
def test_volume_of_every_decodable_transfer_syntax(corpus: Path, syntax: str) -> None:
    folder = corpus / TS_IMAGES
    reference = SeriesInput(
        "1", (folder / "CTImage.dcm_LittleEndianExplicitTransferSyntax_1.2.840.10008.1.2.1.dcm",)
    ).volume()
    (path,) = folder.glob(f"CTImage.dcm_*_1.2.840.10008.{syntax}.dcm")
    volume = SeriesInput("1", (path,)).volume()
    assert np.allclose(volume.affine, reference.affine)
    difference = np.abs(volume.array.astype(float) - reference.array).max()
    assert difference <= LOSSY.get(syntax, 0), f"{path.name}: {difference} HU off"


@pytest.mark.unit
@pytest.mark.parametrize("syntax", sorted(UNDECODABLE))
def test_undecodable_transfer_syntax_is_a_clear_error(corpus: Path, syntax: str) -> None:
    (path,) = (corpus / TS_IMAGES).glob(f"CTImage.dcm_*_1.2.840.10008.{syntax}.dcm")
    with pytest.raises(InputError, match="pixel data not decodable"):
        SeriesInput("1.2.3", (path,)).volume()


@pytest.mark.unit
@pytest.mark.parametrize("defect", ["missing slice", "gantry tilt"])
def test_irregular_series_is_a_clear_error_not_a_misplaced_volume(
    tmp_path: Path, defect: str
) -> None:
    from dicom_node.phantoms import CtPhantomSpec, ct_series

    datasets = list(ct_series(CtPhantomSpec(slices=10, rows=16, columns=16)))
    if defect == "missing slice":
        del datasets[4]
    else:  # positions still step along z while the image plane is tilted 15 degrees
        for ds in datasets:
            ds.ImageOrientationPatient = [1, 0, 0, 0, 0.9659258, 0.2588190]
    paths = []
    for i, ds in enumerate(datasets):
        paths.append(tmp_path / f"{i}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    with pytest.raises(InputError, match="not a regularly spaced volume"):
        SeriesInput("1.2.3", tuple(paths)).volume()


@pytest.mark.unit
def test_example_algorithm_runs_on_real_ct(example_plugins, corpus: Path, tmp_path: Path) -> None:
    cls = discover()["example-threshold"].algorithm
    algorithm = cls({"threshold": 300})  # bone
    algorithm.load("cpu")
    result = algorithm.run({"series": SeriesInput("1.2.3", tuple(corpus_ct(corpus)))})
    assert result.masks[0].array.shape == (30, 512, 512)
    assert result.measurements["above threshold volume_ml"] > 10
    saved = json.loads(result.save(tmp_path / "out").read_text())
    assert saved["masks"][0]["voxels"] == int(result.masks[0].array.sum())
    assert np.array_equal(
        np.load(tmp_path / "out" / saved["masks"][0]["file"]), result.masks[0].array
    )
    assert len(saved["findings"][0]["center_lps_mm"]) == 3


@pytest.mark.unit
def test_result_types_validate_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        Classification("Pneumonia", 1.5, 0.5)
    with pytest.raises(ValueError):
        Finding("nodule", (0, 0, 0), (5, 5, 5), score=2.0)
    with pytest.raises(ValueError):
        LabelMask("flat", np.zeros((4, 4)))
    with pytest.raises(ValueError):
        AlgorithmResult("a", "1", False, findings=[Finding("n", (0, 0, 0), (1, 1, 1), 0.5, "x")])
    with pytest.raises(ValueError):
        InputSpec(("T1", "T1"))
    assert Classification("Pneumonia", 0.7, 0.5).positive
    weights_file = tmp_path / "w.pt"
    weights_file.write_bytes(b"weights")
    described = Weights.from_file(weights_file, demo=True).describe()
    assert described.startswith("DEMO (DEMO MODEL - NOT FOR CLINICAL USE)")
    assert "sha256:" in described


@pytest.mark.integration
def test_a_plugin_package_is_routed_to_without_touching_the_node(make_node, corpus: Path) -> None:
    from dicom_node.scu import send

    rule = {"algorithm": "example-threshold", "series": {"modality": ["CT"], "min_slices": 20}}
    node = make_node(
        assembly={"series_quiet_seconds": 1, "study_quiet_seconds": 1},
        routing={"rules": [rule]},
        env=plugin_env(),
    )
    send(corpus_ct(corpus), "127.0.0.1", node.port)
    assert node.wait_for("SELECT COUNT(*) FROM jobs WHERE kind = 'inference'", 1) == 1
    payload = json.loads(node.query("SELECT payload FROM jobs WHERE kind = 'inference'")[0][0])
    assert payload["algorithm"] == "example-threshold" and list(payload["inputs"]) == ["series"]


BUILT_IN = ("lung-nodules-ct", "brain-tumour-mr", "pneumonia-cxr")
# What each built-in accepts today, every key given a value other than its default.
VALID_SETTINGS = {
    "lung-nodules-ct": {
        "bundle": "/models/lung",
        "report_threshold": 0.3,
        "enclosed_only": True,
        "prior_max_age_days": 400,
    },
    "brain-tumour-mr": {"bundle": "/models/brats"},
    "pneumonia-cxr": {"weights": "/models/xrv.pt", "variant": "all", "allow_pickle": True},
}


@pytest.mark.unit
@pytest.mark.parametrize("name", BUILT_IN)
def test_built_in_settings_are_typed_and_refuse_unknown_keys(name: str) -> None:
    """A misspelt `bundle:` used to leave the algorithm on its demo weights without a word."""
    cls = discover()[name].algorithm
    assert cls is not None and cls.settings_model is not None
    with pytest.raises(ConfigError) as refused:
        cls({"bundel": "/models/x"})
    assert str(refused.value) == f"algorithms.{name}.bundel: unknown setting"
    # Null is not "the default": an empty `bundle:` must not mean the demo weights either.
    key = next(iter(VALID_SETTINGS[name]))
    with pytest.raises(ConfigError, match=rf"^algorithms\.{name}\.{key}: .*leave the key out"):
        cls({key: None})
    settings = cls(VALID_SETTINGS[name]).settings
    assert isinstance(settings, cls.settings_model)
    assert settings.model_dump(mode="json") | VALID_SETTINGS[name] == settings.model_dump(
        mode="json"
    )
    assert sorted(cls.settings_model.model_fields) == sorted(VALID_SETTINGS[name])


@pytest.mark.unit
@pytest.mark.parametrize("name", BUILT_IN)
def test_built_ins_load_weights_one_way(name: str, tmp_path: Path) -> None:
    """Demo weights when the settings name none; named public weights that are not there are
    an error, never a quiet fall back to the demo."""
    cls = discover()[name].algorithm
    assert cls is not None and issubclass(cls, TrainedAlgorithm)
    demo = cls().weights()
    assert demo.demo and demo.path == cls.demo_weights and demo.sha256
    key = next(iter(VALID_SETTINGS[name]))  # bundle, or pneumonia-cxr's weights file
    with pytest.raises(FileNotFoundError):
        cls({key: str(tmp_path / "not-there")}).weights()


@pytest.mark.unit
@pytest.mark.parametrize(
    ("name", "settings", "key"),
    [
        ("lung-nodules-ct", {"report_threshold": 1.5}, "report_threshold"),
        ("lung-nodules-ct", {"enclosed_only": "sometimes"}, "enclosed_only"),
        ("pneumonia-cxr", {"variant": "paediatric"}, "variant"),
    ],
)
def test_built_in_settings_refuse_bad_values_naming_the_key(name, settings, key) -> None:
    cls = discover()[name].algorithm
    assert cls is not None
    with pytest.raises(ConfigError, match=rf"^algorithms\.{name}\.{key}: "):
        cls(settings)


@pytest.mark.unit
def test_a_plugin_without_a_settings_model_gets_its_section_as_a_dict(example_plugins) -> None:
    cls = discover()["example-threshold"].algorithm
    assert cls is not None and cls.settings_model is None
    assert cls({"threshold": 100, "anything": "goes"}).settings == {
        "threshold": 100,
        "anything": "goes",
    }


class _LooseSettings(BaseModel):  # takes unknown keys: a typo would go unnoticed
    threshold: float = 0.0


class LooseAlgorithm(Algorithm):
    name = "loose"
    version = "1"
    settings_model = _LooseSettings  # type: ignore[assignment]

    def weights(self) -> Weights:
        return Weights.none()

    def load(self, device: str) -> None:
        pass

    def run(self, inputs):  # never called: the registration refuses the class
        raise AssertionError


@pytest.mark.unit
def test_a_settings_model_not_built_on_algorithm_settings_is_a_broken_plugin() -> None:
    registration = register(EntryPoint("loose", f"{__name__}:LooseAlgorithm", ENTRY_POINT_GROUP))
    assert registration.algorithm is None
    assert "settings_model is not a dicom_node.algorithm.AlgorithmSettings" in registration.error


@pytest.mark.unit
@pytest.mark.parametrize("weights_demo", [True, False])
def test_a_plugin_cannot_make_its_results_contradict_themselves_about_demo(
    tmp_path: Path, weights_demo: bool
) -> None:
    """A plugin that claims the opposite of its weights, and another name and version: the
    node fills who made the result from the registered class and its Weights (made_by), and
    the writers read only those, so result.json, SEG, SR and SC all say what the weights are."""
    _, _, series, found = ct_case(tmp_path, "axial")
    cxr = tmp_path / "cxr.dcm"
    cxr_dataset(CxrPhantomSpec(rows=400, columns=520)).save_as(cxr, enforce_file_format=True)
    heat = np.zeros((400, 520))
    heat[200:260, 100:200] = 1.0
    classified = AlgorithmResult(
        classifications=[Classification("Pneumonia", 0.9, 0.5)],
        heatmaps=[HeatMap("Pneumonia Grad-CAM", heat)],
    )
    weights = Weights(tmp_path / "weights.pt", "ab" * 32, demo=weights_demo)
    provenance = Provenance("registered", "2.0", weights)
    kinds = set()
    for claimed, inputs in (
        (found, {"series": series}),
        (classified, {"series": SeriesInput("2", (cxr,))}),
    ):
        lying = replace(claimed, algorithm="someone-else", version="9", demo=not weights_demo)
        filled = made_by(lying, provenance)
        saved = json.loads(filled.save(tmp_path / f"out-{len(kinds)}").read_text())
        assert (saved["algorithm"], saved["version"], saved["demo"]) == (
            "registered",
            "2.0",
            weights_demo,
        )
        # The writers given the plugin's own claim still say what the weights are.
        for written in write_all(
            lying, inputs, provenance, tmp_path / f"dicom-{len(kinds)}", ResultsConfig()
        ):
            kinds.add(written.kind)
            ds = dcmread(written.path)
            says_demo = str(ds.SeriesDescription).startswith(DEMO_WARNING)
            assert says_demo == weights_demo, (written.kind, ds.SeriesDescription)
            if written.kind == "SEG":
                assert (ds.get("ContentDescription") == DEMO_WARNING) == weights_demo
                (identification,) = ds.SegmentSequence[
                    0
                ].SegmentationAlgorithmIdentificationSequence
                assert identification.AlgorithmName == "registered"
    assert kinds == {"SEG", "SR", "SC"}


@pytest.mark.unit
def test_the_plugin_api_is_exactly_its_all() -> None:
    """dicom_node.algorithm's __all__ is the plugin contract: everything the module defines
    for authors is in it (InputError, defined beside the checks that raise it, too), and
    nothing else, so a helper cannot slip into the API nor a new API name be left out."""
    import ast

    import dicom_node.algorithm as api

    tree = ast.parse(Path(api.__file__).read_text())
    defined = {
        target.id
        for node in tree.body
        for target in (
            node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", node)]
        )
        if isinstance(target, ast.Name)
    } | {node.name for node in tree.body if isinstance(node, ast.ClassDef | ast.FunctionDef)}
    public = {name for name in defined if not name.startswith("_") and name != "log"}
    assert len(set(api.__all__)) == len(api.__all__)
    assert set(api.__all__) == public | {"InputError"}
