"""Where things lie: the repository, the shared DICOM corpus, the model zoo configs, the example
plugin package, and the corpus files several tests read."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT.parent / "shared" / "dicom-corpus"
MODEL_ZOO = ROOT.parent / "shared" / "model-zoo-configs"
PLUGINS = ROOT / "tests" / "plugins"

CORPUS_CXR = (
    "cxr-rsna-torchxrayvision/tests/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
)


def corpus_ct(corpus: Path) -> list[Path]:
    """The corpus's chest CT series (30 slices, B40f kernel), in file name order."""
    folder = next((corpus / "chest-ct-lung-pet-ct-dx").rglob("*B40f*"))
    return sorted(folder.glob("*.dcm"))
