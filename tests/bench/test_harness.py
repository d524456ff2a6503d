"""The benchmark harness end to end at its smallest size, on a tiny random-weight checkpoint.

Checks that one run writes every artefact with the figures the report promises. It asserts structure and
consistency, never timings: benchmarks measure, tests don't.
"""

from __future__ import annotations

import json
import math

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    from benchmarks.run import main
    from sinkserve.engine.testing import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("bench")
    checkpoint = make_tiny_checkpoint(root / "ckpt", arch="llama")
    out = root / "docs"
    assert main(["--smoke", "--model", str(checkpoint), "--out", str(out)]) == 0
    return out


def test_writes_markdown_json_and_plots(smoke_run):
    report = (smoke_run / "benchmarks.md").read_text()
    data = json.loads((smoke_run / "benchmarks.json").read_text())
    for heading in ("## Machine and run", "## Targets", "### Cache policies", "### Number of attention sinks",
                    "### Per-token decode latency", "### Constant cost", "### Batched throughput", "## Profiles",
                    "## Tensor parallelism on this CPU", "## Closing note"):
        assert heading in report
    assert [row["tensor_parallel"] for row in data["tensor_parallel"]["rows"]] == [1, 2, 2]
    assert "python -m benchmarks.run --smoke" in report  # the exact command that made it
    pngs = sorted(p.name for p in (smoke_run / "img").glob("*.png"))
    assert pngs == sorted(["ppl_policies_sinks.png", "ppl_long_stream.png", "latency_vs_cache.png",
                           "constant_cost_tiny.png", "constant_cost_model.png", "throughput.png"])
    for png in pngs:
        assert f"img/{png}" in report
        assert (smoke_run / "img" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert data["meta"]["plan"]["name"] == "smoke"


def test_quality_tables_are_consistent(smoke_run):
    data = json.loads((smoke_run / "benchmarks.json").read_text())
    q = data["quality"]
    assert [r["policy"] for r in q["policies"]["rows"]] == ["dense", "window", "recompute", "streaming"]
    for row in q["policies"]["rows"]:
        assert math.isfinite(row["ppl_common"]) and row["ppl_common"] > 1
    assert [r["sinks"] for r in q["sinks"]["rows"]] == data["meta"]["plan"]["sink_counts"]
    assert [r["cache"] for r in q["cache_sizes"]["rows"]] == data["meta"]["plan"]["cache_sizes_ppl"]
    assert q["long"]["tokens"] == data["meta"]["plan"]["long_tokens"]
    assert q["long"]["dense"]["bins"] and q["long"]["streaming"]["bins"]
    assert "_nlls" not in q["policies"]  # per-token lists stay out of the JSON


def test_speed_sections_cover_the_plan(smoke_run):
    data = json.loads((smoke_run / "benchmarks.json").read_text())
    plan = data["meta"]["plan"]
    assert [r["cache"] for r in data["latency"]["rows"]] == plan["latency_cache_sizes"]
    for row in data["latency"]["rows"]:
        for policy in ("streaming", "recompute", "hf_dense"):
            assert row[policy]["median_ms"] > 0
        # the timed turn starts from a full cache
        assert row["streaming"]["cache_entries"] == row["cache"]
    assert [r["sessions"] for r in data["throughput"]["rows"]] == plan["throughput_sessions"]
    for row in data["throughput"]["rows"]:
        assert row["decode_tokens"] == row["sessions"] * plan["throughput_decode_steps"]
    tiny = data["constant_cost"]["tiny"]
    assert tiny["total_tokens"] >= plan["constant_tiny_tokens"]
    # the cache stays bounded however long the stream
    assert max(s["cache_entries"] for s in tiny["samples"]) <= plan["constant_cache"]
    assert {t["key"] for t in data["targets"]} >= {"ppl_streaming_vs_recompute", "latency_streaming_abs",
                                                   "single_vs_hf", "constant_tiny"}
    assert set(data["profiles"]) == {"decode_b1", "decode_batched"}


def test_unknown_section_is_a_clear_error(capsys):
    from benchmarks.run import main

    with pytest.raises(SystemExit) as exc:
        main(["--only", "latency,nonsense"])
    assert exc.value.code == 2
    assert "unknown section(s) nonsense" in capsys.readouterr().err
