"""benchmarks/cluster.py's table from its figures as its JSON file keeps them (string keys):
a row per measure, each cluster figure beside the embedded one of the same run, the ratio of
the two. The run itself (real servers, minutes) is not part of the suite."""

from __future__ import annotations

import json

import pytest

from benchmarks.cluster import FULL, rows, table

pytestmark = pytest.mark.unit


def figures() -> dict:
    def memory(pss: float) -> dict[str, float]:
        return {"peak_pss_mib": pss, "peak_rss_mib": pss * 2, "idle_pss_mib": pss / 2,
                "idle_rss_mib": pss}  # fmt: skip

    def mode(jobs_per_min: float, claim: float) -> dict:
        return {
            "jobs_per_min": jobs_per_min,
            "claim_p50_s": claim,
            "claim_p95_s": claim * 2,
            "memory": {"node": memory(100), "workers": memory(400)},
        }

    e2e = {"total_s": 20.0, "claim_s": 1.0, "staged_s": 0.5, "job_s": 17.0, "deliver_s": 0.3}
    return json.loads(
        json.dumps(
            {
                "sizes": FULL.__dict__,
                "device": "cpu",
                "simulated": {1: {"cluster": mode(24, 0.6), "embedded": mode(30, 0.2)}},
                "real": {1: {"cluster": mode(3, 0.6), "embedded": mode(4, 0.2)}},
                "end_to_end": {"cluster": {**e2e, "total_s": 22.0}, "embedded": e2e},
                "staging": {
                    "files": 300,
                    "size_mb": 158.0,
                    "at_completion_s": 5.0,
                    "after_prestage_s": 0.4,
                    "uploaded_at_completion": 3,
                    "completion_to_staged_s": 0.9,
                },
                "servers_memory": {"PostgreSQL": memory(50)},
            }
        )
    )


def test_the_table_sets_each_cluster_figure_beside_the_embedded_one() -> None:
    text = table(rows(figures()), "header")
    lines = text.splitlines()
    assert lines[0] == "header"
    assert lines[2] == "| area | measure | cluster | embedded, same run | ratio |"
    body = [line.split(" | ") for line in lines[4:]]
    assert [cells[0] for cells in body] == [
        "| throughput",
        "| throughput",
        "| dispatch",
        "| dispatch",
        "| staging",
        "| staging",
        "| end to end",
        "| memory",
        "| memory",
        "| memory",
    ]
    simulated = body[0]
    assert simulated[2:] == ["24.0", "30.0", "0.80 |"]
    p95 = body[3]
    assert "p95" in p95[1] and p95[2:] == ["1.20", "0.40", "3.00 |"]
    assert body[6][2:] == ["22.00", "20.00", "1.10 |"]
    postgres = body[9]
    assert postgres[1].startswith("PostgreSQL") and postgres[2] == "50 / 25 (RSS 100 / 50)"
