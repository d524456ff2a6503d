"""`sinkserve up --tensor-parallel N`: the flag reaches the replica config, and a size that cannot run (below 1,
not splitting the model's heads, more shards than CPUs here or than Ray is given, low-bit weights) is refused at
start with the sizes that work, before anything is started (no redis-server, no data directory, no Ray).
The refusals run the real command; the accepted case stops right after the checks."""

from __future__ import annotations

import os

import pytest
import typer
from typer.testing import CliRunner

from sinkserve import cli_serving
from sinkserve.cli import app
from sinkserve.config import Settings

runner = CliRunner()
CPUS = len(os.sched_getaffinity(0))


@pytest.fixture(autouse=True)
def _no_config_env(monkeypatch):
    for name in [n for n in os.environ if n.startswith("SINKSERVE_")]:
        monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from sinkserve.engine.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), arch="llama", heads=4, kv_heads=2)


def up(tmp_path, *args: str):
    data_dir = tmp_path / "data"
    result = runner.invoke(app, ["up", "--device", "cpu", "--data-dir", str(data_dir), "--port", "0",
                                 "--http-port", "0", *args])
    assert not data_dir.exists(), "a refused start must not have started redis-server"
    return result


@pytest.mark.parametrize(("args", "message"), [
    (["--tensor-parallel", "0"], "--tensor-parallel: Input should be greater than or equal to 1"),
    (["--tensor-parallel", "3"], "tensor_parallel 3 does not split this model (4 attention heads, 2 KV heads, "
                                 "FFN width 128); sizes that do: 1, 2, 4"),
    (["--tensor-parallel", "2", "--weights", "int4", "--dtype", "bfloat16"],
     "--tensor-parallel 2: shards run dense weights; --weights int4 needs --tensor-parallel 1"),
])
def test_sizes_that_cannot_run_are_refused_before_anything_starts(tiny, tmp_path, args, message):
    result = up(tmp_path, "--model", str(tiny), *args)
    assert result.exit_code == 2, result.output
    assert message in result.output


@pytest.mark.skipif(CPUS >= 4, reason="needs a machine with fewer than 4 CPUs")
def test_more_shards_than_cpus_is_refused_naming_the_sizes_that_fit(tiny, tmp_path):
    result = up(tmp_path, "--model", str(tiny), "--tensor-parallel", "4")
    assert result.exit_code == 2, result.output
    assert f"tensor_parallel 4 needs 4 CPUs (one per shard); this process may use {CPUS}" in result.output
    fit = ", ".join(str(n) for n in (1, 2, 4) if n <= CPUS)
    assert f"sizes that split this model and fit: {fit}" in result.output


def test_more_shard_cpus_than_ray_has_is_refused(tiny, tmp_path):
    if CPUS < 2:
        pytest.skip("needs 2 CPUs")
    result = up(tmp_path, "--model", str(tiny), "--tensor-parallel", "2", "--replicas", "2", "--replica-cpus", "1",
                "--num-cpus", "3")
    assert result.exit_code == 2, result.output
    assert ("2 replica(s) x 2 shards x 1 CPUs (--replica-cpus) = 4 CPUs, but Ray has 3 (--num-cpus); "
            "sizes that fit: 1") in result.output


def test_a_family_without_a_partitioning_is_refused(tiny, tmp_path):
    import json

    qwen = tmp_path / "qwen3"
    qwen.mkdir()
    hf = json.loads((tiny / "config.json").read_text())
    hf.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3")
    (qwen / "config.json").write_text(json.dumps(hf))
    result = up(tmp_path, "--model", str(qwen), "--tensor-parallel", "2")
    assert result.exit_code == 2, result.output
    assert "--tensor-parallel: Qwen3ForCausalLM cannot be split into tensor-parallel shards; families that can: " \
           "Llama, GPT-NeoX" in result.output


def test_the_bundled_model_names_its_sizes(tmp_path):
    result = up(tmp_path, "--tensor-parallel", "2")
    assert result.exit_code == 2, result.output
    assert "tensor_parallel 2 does not split this model (9 attention heads, 3 KV heads, FFN width 1536); " \
           "sizes that do: 1, 3" in result.output


def test_a_size_that_runs_reaches_the_replica_config_and_rays_cpus(tiny, tmp_path, monkeypatch):
    if CPUS < 2:
        pytest.skip("needs 2 CPUs")
    seen: list[tuple[Settings, float | None]] = []
    checks = cli_serving.tensor_parallel_problem

    def stop_after_the_checks(settings, ray_cpus):
        problem = checks(settings, ray_cpus)
        seen.append((settings, problem))
        raise typer.Exit(0)

    monkeypatch.setattr(cli_serving, "tensor_parallel_problem", stop_after_the_checks)
    result = up(tmp_path, "--model", str(tiny), "--tensor-parallel", "2", "--replica-cpus", "0.5",
                "--num-cpus", "1")
    assert result.exit_code == 0, result.output
    ((settings, problem),) = seen
    assert problem == ""
    assert settings.replica.tensor_parallel == 2
    assert cli_serving.ray_cpus_needed(settings) == 1.0
    # The shards split the cores between them: threads per shard = CPUs / (replicas x shards).
    assert settings.engine.num_threads == max(1, (os.cpu_count() or 1) // 2)
    # What the Serve deployment reserves: one bundle of --replica-cpus per shard.
    from sinkserve.replica.app import deployment_options

    options = deployment_options(settings)
    assert options["placement_group_bundles"] == [{"CPU": 0.5}, {"CPU": 0.5}]
