"""What the tests share, so that no test module imports another.

- ``paths``: where the repository, the shared corpus, the model zoo and the example plugin lie.
- ``peers``: the external programs the tests run (a missing one fails in CI, skips elsewhere).
- ``node``: a `dicom-node serve` under test, polling, the example plugin's environment.
- ``dicomfiles``: reading what a Part-10 file holds and what the node stored; dciodvfy.
- ``encoding``: data sets as bytes, exactly as built (explicit VR little endian).
- ``cases``: phantom inputs and results with known answers for the writers and detectors.
- ``audit``, ``http``, ``tls``: reading an audit trail, the HTTP service, a throwaway PKI.
- ``realworld``: the real-world corpus of issue 14; ``viewer``: OHIF in Chromium.

Peers the benchmarks drive too (dcmtk, Orthanc, the serve process) are in
:mod:`dicom_node.testing`.
"""
