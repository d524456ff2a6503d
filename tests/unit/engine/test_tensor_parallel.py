"""Tensor parallelism (engine/shards.py): N shards in one torch.distributed group (gloo on CPU) give the logits
of one process, hold 1/N of the KV slab and of the weights each, and a split that cannot work is refused at start
with nothing left running."""

import json
import multiprocessing
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from typer.testing import CliRunner

from sinkserve.cli import app
from sinkserve.config import EngineConfig
from sinkserve.engine import load_engine
from sinkserve.engine.shards import parameter_bytes, valid_sizes
from sinkserve.engine.step_inputs import RowInput
from sinkserve.engine.testing import TOKENIZER_FILES, make_tiny_checkpoint, random_ids
from sinkserve.engine.weights import prepare_bundled_model
from sinkserve.errors import InvalidArgument, UnsupportedModel
from sinkserve.protocol import GenerationParams

REPO = Path(__file__).resolve().parents[3]
SINKS, WINDOW = 4, 16


def nothing_left_running():
    return not multiprocessing.active_children() and not dist.is_initialized()


@pytest.fixture(scope="class", params=["llama", "gpt_neox"])
def pair(request, tmp_path_factory):
    """(TP=1 engine, TP=2 engine) over one tiny random checkpoint: Llama with GQA (8 heads, 4 KV heads), or
    GPT-NeoX (8 heads, partial rotary, parallel residual)."""
    checkpoint = make_tiny_checkpoint(tmp_path_factory.mktemp(f"tp-{request.param}"), arch=request.param,
                                      heads=8, kv_heads=4)
    config = EngineConfig(model=str(checkpoint), dtype="float32", sinks=SINKS, window=WINDOW, slots=3, device="cpu",
                          prefill_chunk=8, num_threads=1)
    one = load_engine(config)
    two = load_engine(config, tensor_parallel=2)
    yield one, two
    two.close()
    assert nothing_left_running()


class TestTwoShardsEqualOne:
    """One pair of engines at a time (class scope): a process holds one torch.distributed group."""

    def test_tp2_logits_equal_tp1_through_eviction_with_decode_and_prefill_in_one_step(self, pair):
        one, two = pair
        ids = random_ids(600, seed=3)
        worst, cursor = 0.0, 0
        for slot in range(3):
            one.runner.reset_slot(slot)
            two.runner.reset_slot(slot)
        # 24 steps: slot 0 takes a 5-token chunk then decodes, slot 1 ingests 6-token chunks, slot 2 decodes one
        # token a step: the ring (16 entries) of slot 1 wraps about 9 times, slot 0's and 2's once or more.
        for step in range(24):
            rows = [
                RowInput(0, ids[cursor : cursor + (5 if step == 0 else 1)], "all"),
                RowInput(1, ids[cursor + 100 : cursor + 106], "all"),
                RowInput(2, ids[cursor + 300 : cursor + 301], "last"),
            ]
            cursor += 6
            for a, b in zip(one.runner.forward(rows), two.runner.forward(rows)):
                assert a.shape == b.shape
                worst = max(worst, float((a - b).abs().max()))
        assert two.runner.slab.tokens_seen.tolist() == one.runner.slab.tokens_seen.tolist()
        assert int(two.runner.slab.tokens_seen[1]) == 24 * 6 > 8 * WINDOW
        assert worst < 1e-4, worst


    def test_parked_slot_comes_back_on_every_shard(self, pair):
        one, two = pair
        ids = random_ids(80, seed=5)
        for engine in (one, two):
            engine.runner.reset_slot(0)
            for start in range(0, 40, 8):
                engine.runner.forward([RowInput(0, ids[start : start + 8], "none")])
        state = two.runner.export_slot(0)
        assert two.runner.state_nbytes(state) == sum(t.nbytes for t in state.values())
        two.runner.reset_slot(0)
        two.runner.import_slot(2, state)  # comes back in another slot, as unparking may
        a = one.runner.forward([RowInput(0, ids[40:41], "all")])[0]
        b = two.runner.forward([RowInput(2, ids[40:41], "all")])[0]
        assert float((a - b).abs().max()) < 1e-4


    def test_scoring_and_sessions_equal_tp1(self, pair):
        one, two = pair
        ids = random_ids(70, seed=7)
        nll_one, nll_two = one.score(ids).nll, two.score(ids).nll
        assert max(abs(a - b) for a, b in zip(nll_one, nll_two)) < 1e-4
        params = GenerationParams(max_tokens=12, temperature=0.0)
        replies = []
        for engine in (one, two):
            sid = engine.open_session()
            replies.append([out.token_id for out in engine.chat(sid, "hello there, shards", params)])
            engine.park(sid)  # parking gathers the parts, the next turn scatters them back
            replies.append([out.token_id for out in engine.chat(sid, "and again", params)])
            engine.close_session(sid)
        assert replies[:2] == replies[2:]


    def test_each_shard_holds_half_the_slab_and_half_the_weights(self, pair):
        one, two = pair
        stats = two.runner.shard_stats()
        assert len(stats) == 2
        assert two.runner.shard_bytes_per_slot * 2 == one.bytes_per_session
        assert two.bytes_per_session == one.bytes_per_session  # the replica's total is unchanged
        total = parameter_bytes(one.runner.model)
        # What every shard keeps whole: the norms (and the row-parallel biases): a few KB.
        whole = sum(p.nbytes for name, p in one.runner.model.named_parameters() if p.dim() == 1)
        for shard in stats:
            assert shard["bytes_per_slot"] * 2 == one.bytes_per_session
            assert shard["slab_bytes"] * 2 == one.runner.slab.nbytes
            assert total / 2 - whole <= shard["parameter_bytes"] <= total / 2 + whole


def test_valid_sizes_replicate_kv_heads_past_their_count():
    from sinkserve.engine.models.llama import ModelArgs

    args = ModelArgs(vocab_size=100, dim=576, n_layers=1, n_heads=9, n_kv_heads=3, head_dim=64,
                     intermediate_size=1536, norm_eps=1e-5, rope_theta=1e5, rope_scaling=None, max_context=8192,
                     tie_embeddings=True, qkv_bias=False, mlp_bias=False)
    assert valid_sizes(args) == [1, 3]  # SmolLM2: 9 is a multiple of 3 KV heads, but 1536 does not split in 9
    args.intermediate_size = 9 * 64
    assert valid_sizes(args) == [1, 3, 9]  # 9 shards: each KV head on 3 of them


def test_bad_splits_are_refused_at_start_with_nothing_running(tmp_path_factory, tiny_llama):
    config = EngineConfig(model=str(tiny_llama), dtype="float32", sinks=4, window=16, slots=1, device="cpu", num_threads=1)
    with pytest.raises(InvalidArgument, match=r"tensor_parallel 3 does not split .*4 attention heads.*sizes that do: 1, 2, 4"):
        load_engine(config, tensor_parallel=3)
    assert nothing_left_running()
    with pytest.raises(InvalidArgument, match=r"tensor_parallel 4 needs 4 CPUs .* may use \d+"):
        load_engine(config, tensor_parallel=4)  # 4 divides the heads: the CPUs refuse it
    assert nothing_left_running()
    cuda = config.model_copy(update={"device": "cuda"})
    with pytest.raises(InvalidArgument, match="CUDA is not available|needs 2 GPUs"):
        load_engine(cuda, tensor_parallel=2)
    assert nothing_left_running()
    # A family without a partitioning (Qwen3 here): named, with the families that have one.
    qwen = tmp_path_factory.mktemp("tp-qwen3")
    hf = json.loads((Path(tiny_llama) / "config.json").read_text())
    hf.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3")
    (qwen / "config.json").write_text(json.dumps(hf))
    for name in TOKENIZER_FILES + ("model.safetensors",):
        if (Path(tiny_llama) / name).is_file():
            (qwen / name).symlink_to(Path(tiny_llama) / name)
    with pytest.raises(UnsupportedModel, match="Qwen3ForCausalLM cannot be split .* Llama, GPT-NeoX"):
        load_engine(config.model_copy(update={"model": str(qwen)}), tensor_parallel=2)
    assert nothing_left_running()
    # An engine setting refused after the shards started: they are stopped too.
    with pytest.raises(InvalidArgument, match="exceeds the model's context"):
        load_engine(config.model_copy(update={"window": 9000}), tensor_parallel=2)
    assert nothing_left_running()


# ---------------------------------------------------------------- the bundled model, 3 shards
@pytest.mark.slow
def test_smollm2_tp3_greedy_reply_equals_tp1():
    # SmolLM2 has 3 KV heads: one per shard. Three shards share this machine's two cores, hence oversubscribe.
    torch.set_num_threads(1)
    config = EngineConfig(dtype="float32", sinks=4, window=60, slots=1, device="cpu", prefill_chunk=32, num_threads=1)
    params = GenerationParams(max_tokens=200, temperature=0.0)
    prompt = "Write a long, detailed story about a lighthouse keeper and the sea."
    replies = []
    for tp in (1, 3):
        engine = load_engine(config, tensor_parallel=tp, oversubscribe=True)
        try:
            sid = engine.open_session()
            events = list(engine.chat(sid, prompt, params))
        finally:
            engine.close()
        assert events[-1].completion_tokens == 200  # the window (60) was passed three times over
        replies.append([e.token_id for e in events])
    assert replies[0] == replies[1]
    assert nothing_left_running()


@pytest.mark.slow
def test_ppl_cli_tp3_equals_tp1(monkeypatch):
    prepare_bundled_model(progress=False)
    monkeypatch.setenv("SINKSERVE_REPLICA__TENSOR_PARALLEL_OVERSUBSCRIBE", "true")
    results = []
    for tp in ("1", "3"):
        result = CliRunner().invoke(app, [
            "ppl", "--text", str(REPO / "README.md"), "--tokens", "600", "--sinks", "4", "--window", "124",
            "--prefill-chunk", "64", "--num-threads", "1", "--device", "cpu", "--json", "--no-progress",
            "--tensor-parallel", tp, "--dtype", "float32", "--weights", "dense",  # auto is bfloat16 on AVX512-BF16
        ])
        assert result.exit_code == 0, result.output
        results.append(json.loads(result.output.strip().splitlines()[-1]))
    assert results[0]["tokens"] == results[1]["tokens"] == 599
    # 4 significant digits as a relative bound (comparing rounded strings fails whenever the value sits on a
    # rounding boundary, however close the two are)
    tp1, tp3 = results[0]["ppl"], results[1]["ppl"]
    print(f"ppl TP=1 {tp1!r}, TP=3 {tp3!r}")
    assert abs(tp1 - tp3) <= 0.5e-4 * tp1, (tp1, tp3)
    assert nothing_left_running()


def test_cli_refuses_a_split_that_does_not_work():
    result = CliRunner().invoke(app, ["ppl", "--text", str(REPO / "README.md"), "--tensor-parallel", "2",
                                      "--device", "cpu", "--no-progress"])
    assert result.exit_code == 2
    assert "tensor_parallel 2 does not split this model (9 attention heads, 3 KV heads" in result.output
    assert "sizes that do: 1, 3" in result.output
    assert nothing_left_running()


def test_replicated_embedding_and_head_equal_tp1(tiny_llama):
    # The alternative the benchmark compares (every rank holds the whole table, rank 0 runs the head).
    config = EngineConfig(model=str(tiny_llama), dtype="float32", sinks=4, window=16, slots=1, device="cpu", num_threads=1)
    ids = random_ids(40, seed=9)
    reference = load_engine(config).stream_logits(ids, chunk=8)
    engine = load_engine(config, tensor_parallel=2, vocab_parallel=False)
    try:
        assert float((engine.stream_logits(ids, chunk=8) - reference).abs().max()) < 1e-4
        stats = engine.runner.shard_stats()
        assert stats[0]["parameter_bytes"] == stats[1]["parameter_bytes"]  # the table on both
    finally:
        engine.close()
    assert nothing_left_running()


def test_a_dead_shard_makes_every_call_unavailable_and_close_ends_the_rest(tiny_llama):
    import os
    import signal

    from sinkserve.errors import ShardLost, Unavailable

    config = EngineConfig(model=str(tiny_llama), dtype="float32", sinks=4, window=16, slots=1, device="cpu", num_threads=1)
    engine = load_engine(config, tensor_parallel=2)
    try:
        sid = engine.open_session()
        engine.add_message(sid, "hello", GenerationParams(max_tokens=4, temperature=0.0))
        engine.step()
        os.kill(engine.runner.launcher.pids[0], signal.SIGKILL)
        engine.runner.launcher.processes[0].join(timeout=30)
        with pytest.raises(ShardLost, match="shard is gone") as lost:
            engine.step()
        assert isinstance(lost.value, Unavailable)  # the gateway's UNAVAILABLE
        with pytest.raises(ShardLost):
            engine.runner.reset_slot(0)  # refused at once, no collective tried
    finally:
        engine.close()
    assert nothing_left_running()
