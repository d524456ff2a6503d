"""Tensor parallelism inside a replica: one model split over N shards joined in one torch.distributed group.

Megatron partitioning (Llama and GPT-NeoX families): q/k/v and gate/up are column-parallel (each shard computes
its heads and its slice of the hidden FFN features), o and down are row-parallel (each shard's partial sum, one
all-reduce each per layer; their bias is added once, after the sum). Attention runs per shard on its own heads,
so each shard's KV slab holds only its KV heads: bytes per session per shard = total / N. With more shards than
KV heads, each KV head is held by N / kv_heads shards (as vLLM does) and the query heads that read it sit on them.

Embedding and output head are vocab-parallel: each shard holds rows [start, stop) of the (tied or not) table;
the embedding is a masked lookup plus one all-reduce, the head's logit slices are gathered on rank 0, the only
rank that samples. Measured on this 2-core CPU (benchmarks/tensor_parallel.py, a random 30-layer Llama with
SmolLM2's 49152-token vocabulary, TP=2): vocab-parallel 158 ms/token and 91 tok/s at 64 sessions, the table
replicated (`vocab_parallel=False`: whole on every rank, the head run by rank 0 alone) 152 ms/token and 95 tok/s,
a difference within this shared machine's noise; vocab-parallel holds 183 MiB per shard against 231 MiB, so it is
the default: each shard's memory stays about 1/N of the weights.

Each shard reads only its own slices from the safetensors files (safe_open + get_slice): never the whole model.

The command channel: rank 0 owns the engine (scheduler, sessions, sampling). Every runner call that touches KV
memory or runs the model is broadcast to the other ranks first (the step's rows, small lists of ints); each
rank builds the same StepBatch from the same bookkeeping and runs its part of the forward. Parking gathers each
rank's part of the slot on rank 0 (the parked state is the list of parts) and unparking scatters them back.

This module imports no Ray: the local launcher (`LocalShards`) spawns the other ranks with torch.multiprocessing,
and the replica's Ray launcher (sinkserve/replica/shards.py) runs `run_shard` in its actors.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sinkserve.engine.kv_cache import KVSlab, SlabGeometry
from sinkserve.engine.models import family_for, gpt_neox, llama
from sinkserve.engine.runner import ModelRunner
from sinkserve.engine.step_inputs import RowInput
from sinkserve.errors import InvalidArgument, ShardLost, SinkServeError, UnsupportedModel

SHARDABLE = {llama: "Llama", gpt_neox: "GPT-NeoX"}
# How long a rank waits for the others at rendezvous.
RENDEZVOUS_TIMEOUT = timedelta(seconds=120)
# How long a collective may wait: the other ranks wait in one for rank 0's next command however long the engine
# idles, so no short limit; a rank that dies closes its connections and the others' collectives fail at once.
COLLECTIVE_TIMEOUT = timedelta(days=365)


# ---------------------------------------------------------------- the split
@dataclass(frozen=True)
class ShardPlan:
    """Which part of the model one rank holds: half-open ranges of heads, KV heads, FFN features, vocab rows."""

    rank: int
    world: int
    heads: tuple[int, int]
    kv_heads: tuple[int, int]
    ffn: tuple[int, int]
    vocab: tuple[int, int]
    vocab_rows: int  # the largest shard's vocab rows (logit slices are padded to it for the gather)


def _fits(args, world: int) -> bool:
    n_kv = args.n_kv_heads
    return (args.n_heads % world == 0 and (n_kv % world == 0 or world % n_kv == 0)
            and args.intermediate_size % world == 0)


def valid_sizes(args) -> list[int]:
    """Tensor-parallel sizes this model's heads, KV heads and FFN width split into."""
    return [n for n in range(1, args.n_heads + 1) if _fits(args, n)]


def check_split(args, world: int) -> None:
    if world < 1:
        raise InvalidArgument(f"tensor_parallel must be at least 1, got {world}")
    if not _fits(args, world):
        raise InvalidArgument(
            f"tensor_parallel {world} does not split this model ({args.n_heads} attention heads, "
            f"{args.n_kv_heads} KV heads, FFN width {args.intermediate_size}); sizes that do: "
            f"{', '.join(map(str, valid_sizes(args)))}"
        )


def plan_shard(args, world: int, rank: int, vocab_parallel: bool = True) -> ShardPlan:
    check_split(args, world)
    heads = args.n_heads // world
    if args.n_kv_heads >= world:
        kv = args.n_kv_heads // world
        kv_range = (rank * kv, (rank + 1) * kv)
    else:  # replicated: N / kv_heads consecutive shards share one KV head (their query heads all read it)
        head = rank // (world // args.n_kv_heads)
        kv_range = (head, head + 1)
    ffn = args.intermediate_size // world
    rows = -(-args.vocab_size // world) if vocab_parallel else args.vocab_size
    first = rank * rows if vocab_parallel else 0  # replicated: every rank holds the whole table
    vocab = (min(first, args.vocab_size), min(first + rows, args.vocab_size))
    return ShardPlan(rank, world, (rank * heads, (rank + 1) * heads), kv_range, (rank * ffn, (rank + 1) * ffn),
                     vocab, rows)


def _fitting(sizes: list[int] | None, count: int) -> str:
    if sizes is None:
        return ""
    fit = [n for n in sizes if n <= count]
    return f"; sizes that split this model and fit: {', '.join(map(str, fit))}"


def check_resources(world: int, device: torch.device, oversubscribe: bool = False,
                    sizes: list[int] | None = None) -> None:
    """One shard per CPU or per GPU of this node: more is refused at start, naming the count there is (and,
    given the model's valid `sizes`, those that fit)."""
    if device.type == "cuda":
        gpus = torch.cuda.device_count()
        if world > gpus:
            raise InvalidArgument(f"tensor_parallel {world} needs {world} GPUs; this node has {gpus}"
                                  + _fitting(sizes, gpus))
    elif device.type == "cpu":
        cpus = len(os.sched_getaffinity(0))
        if world > cpus and not oversubscribe:
            raise InvalidArgument(
                f"tensor_parallel {world} needs {world} CPUs (one per shard); this process may use {cpus} "
                f"(replica.tensor_parallel_oversubscribe lets shards share cores){_fitting(sizes, cpus)}"
            )


def check_start(hf_config: dict, world: int, device: torch.device, oversubscribe: bool = False) -> None:
    """Everything a start of `world` shards is refused for before any process starts: a family without a
    partitioning, a split the heads or FFN width cannot take, more shards than CPUs or GPUs here. `sinkserve up`
    asks it before it starts Ray, the loader before it spawns shards."""
    family = shardable_family(hf_config)
    args = family.ModelArgs.from_hf(hf_config)
    check_split(args, world)
    check_resources(world, device, oversubscribe, sizes=valid_sizes(args))


def shardable_family(hf_config: dict):
    family = family_for(hf_config)
    if family not in SHARDABLE:
        arch = (hf_config.get("architectures") or [hf_config.get("model_type")])[0]
        raise UnsupportedModel(
            f"{arch} cannot be split into tensor-parallel shards; families that can: {', '.join(SHARDABLE.values())}"
        )
    return family


# ---------------------------------------------------------------- parallel layers
class RowParallelLinear(nn.Module):
    """A linear layer over this shard's slice of its input features: partial sums, all-reduced; the bias
    (held whole by every shard) is added once after the sum."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group=None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows [start, stop) of the table: ids outside give zeros, and the all-reduce puts each id's row together."""

    def __init__(self, weight: nn.Parameter, start: int, group=None):
        super().__init__()
        self.weight, self.start, self.group = weight, start, group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        x = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight).masked_fill_(outside[:, None], 0)
        dist.all_reduce(x, group=self.group)
        return x


class ReplicatedHead(nn.Module):
    """The whole output head (vocab_parallel=False): rank 0 computes every logit, the other ranks none."""

    def __init__(self, weight: nn.Parameter, rank: int):
        super().__init__()
        self.weight, self.rank = weight, rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) if self.rank == 0 else x.new_empty((x.shape[0], 0))


class VocabParallelHead(nn.Module):
    """Logits for this shard's vocab rows, gathered on rank 0 (the one rank that samples); other ranks return
    their own slice, which nobody reads."""

    def __init__(self, weight: nn.Parameter, plan: ShardPlan, vocab_size: int, group=None):
        super().__init__()
        self.weight, self.plan, self.vocab_size, self.group = weight, plan, vocab_size, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = F.linear(x, self.weight)
        pad = self.plan.vocab_rows - local.shape[-1]
        if pad:  # gather takes equal sizes: the last shard's slice may be short
            local = F.pad(local, (0, pad))
        if self.plan.rank != 0:
            dist.gather(local, None, dst=0, group=self.group)
            return local
        parts = [torch.empty_like(local) for _ in range(self.plan.world)]
        dist.gather(local, parts, dst=0, group=self.group)
        return torch.cat(parts, dim=-1)[:, : self.vocab_size]


# ---------------------------------------------------------------- loading one shard
class _Slices:
    """Tensors (or row/column slices of them) read from a checkpoint's safetensors files without loading the rest."""

    def __init__(self, files: list[Path], stack: ExitStack):
        from safetensors import safe_open

        self.where = {}
        for file in files:
            handle = stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
            for name in handle.keys():
                self.where[name] = handle
        self.bytes_read = 0

    def has(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None) -> torch.Tensor:
        handle = self.where.get(name)
        if handle is None:
            raise UnsupportedModel(f"checkpoint has no tensor {name!r}")
        if rows is None and cols is None:
            tensor = handle.get_tensor(name)
        else:
            part = handle.get_slice(name)
            tensor = part[rows[0] : rows[1]] if cols is None else part[:, cols[0] : cols[1]]
        self.bytes_read += tensor.nbytes
        return tensor


def _llama_state(src: _Slices, args, plan: ShardPlan) -> dict[str, torch.Tensor]:
    hd = args.head_dim
    q = (plan.heads[0] * hd, plan.heads[1] * hd)
    kv = (plan.kv_heads[0] * hd, plan.kv_heads[1] * hd)
    embed = "model.embed_tokens.weight"
    out = {"tok_embeddings.weight": src.get(embed, rows=plan.vocab), "norm.weight": src.get("model.norm.weight")}
    if not args.tie_embeddings:
        out["output.weight"] = src.get("lm_head.weight", rows=plan.vocab)
    for i in range(args.n_layers):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        attn, mlp = p + "self_attn.", p + "mlp."
        out[o + "attention.wqkv.weight"] = torch.cat(
            [src.get(attn + "q_proj.weight", rows=q), src.get(attn + "k_proj.weight", rows=kv),
             src.get(attn + "v_proj.weight", rows=kv)])
        if args.qkv_bias:
            out[o + "attention.wqkv.bias"] = torch.cat(
                [src.get(attn + "q_proj.bias", rows=q), src.get(attn + "k_proj.bias", rows=kv),
                 src.get(attn + "v_proj.bias", rows=kv)])
        out[o + "attention.wo.weight"] = src.get(attn + "o_proj.weight", cols=q)
        out[o + "feed_forward.w_gate_up.weight"] = torch.cat(
            [src.get(mlp + "gate_proj.weight", rows=plan.ffn), src.get(mlp + "up_proj.weight", rows=plan.ffn)])
        out[o + "feed_forward.w_down.weight"] = src.get(mlp + "down_proj.weight", cols=plan.ffn)
        if args.mlp_bias:
            out[o + "feed_forward.w_gate_up.bias"] = torch.cat(
                [src.get(mlp + "gate_proj.bias", rows=plan.ffn), src.get(mlp + "up_proj.bias", rows=plan.ffn)])
            out[o + "feed_forward.w_down.bias"] = src.get(mlp + "down_proj.bias")
        out[o + "attention_norm.weight"] = src.get(p + "input_layernorm.weight")
        out[o + "ffn_norm.weight"] = src.get(p + "post_attention_layernorm.weight")
    return out


def _neox_state(src: _Slices, args, plan: ShardPlan) -> dict[str, torch.Tensor]:
    hd = args.head_dim
    prefix = "gpt_neox." if src.has("gpt_neox.embed_in.weight") else ""
    qkv = (plan.heads[0] * 3 * hd, plan.heads[1] * 3 * hd)  # NeoX keeps q, k, v together per head
    heads = (plan.heads[0] * hd, plan.heads[1] * hd)
    out = {"embed_in.weight": src.get(prefix + "embed_in.weight", rows=plan.vocab)}
    for name in ("final_layer_norm.weight", "final_layer_norm.bias"):
        out[name] = src.get(prefix + name)
    if not args.tie_embeddings:
        out["embed_out.weight"] = src.get("embed_out.weight", rows=plan.vocab)
    for i in range(args.n_layers):
        p, o = f"{prefix}layers.{i}.", f"layers.{i}."
        out[o + "attention.query_key_value.weight"] = src.get(p + "attention.query_key_value.weight", rows=qkv)
        out[o + "attention.dense.weight"] = src.get(p + "attention.dense.weight", cols=heads)
        if args.attention_bias:
            out[o + "attention.query_key_value.bias"] = src.get(p + "attention.query_key_value.bias", rows=qkv)
            out[o + "attention.dense.bias"] = src.get(p + "attention.dense.bias")
        out[o + "mlp.dense_h_to_4h.weight"] = src.get(p + "mlp.dense_h_to_4h.weight", rows=plan.ffn)
        out[o + "mlp.dense_h_to_4h.bias"] = src.get(p + "mlp.dense_h_to_4h.bias", rows=plan.ffn)
        out[o + "mlp.dense_4h_to_h.weight"] = src.get(p + "mlp.dense_4h_to_h.weight", cols=plan.ffn)
        out[o + "mlp.dense_4h_to_h.bias"] = src.get(p + "mlp.dense_4h_to_h.bias")
        for norm in ("input_layernorm", "post_attention_layernorm"):
            for kind in ("weight", "bias"):
                out[o + f"{norm}.{kind}"] = src.get(p + f"{norm}.{kind}")
    return out


def _shard_args(family, args, plan: ShardPlan):
    local = dict(n_heads=plan.heads[1] - plan.heads[0], intermediate_size=plan.ffn[1] - plan.ffn[0],
                 vocab_size=plan.vocab[1] - plan.vocab[0])
    if family is llama:
        local["n_kv_heads"] = plan.kv_heads[1] - plan.kv_heads[0]
    return dataclasses.replace(args, **local)


def _row_parallel_pairs(family, model):
    """(module, attribute) of each row-parallel linear layer: the attention output and the FFN down projection."""
    for block in model.layers:
        if family is llama:
            yield block.attention, "wo"
            yield block.feed_forward, "w_down"
        else:
            yield block.attention, "dense"
            yield block.mlp, "dense_4h_to_h"


def load_shard(checkpoint: Path, world: int, rank: int, dtype: torch.dtype, device: torch.device,
               group=None, vocab_parallel: bool = True) -> tuple[nn.Module, dict, ShardPlan]:
    """This rank's part of the model, read slice by slice from the checkpoint; returns (model, hf_config, plan).
    model.args holds the shard's own sizes (heads, KV heads, FFN width, vocab rows); model.full_args the model's.
    vocab_parallel=False keeps the whole embedding (and head) on every rank, the head run by rank 0 only: the
    alternative the benchmark compares."""
    hf_config = json.loads((checkpoint / "config.json").read_text())
    family = shardable_family(hf_config)
    args = family.ModelArgs.from_hf(hf_config)
    plan = plan_shard(args, world, rank, vocab_parallel)
    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        raise UnsupportedModel(f"{checkpoint}: no *.safetensors weights (only safetensors checkpoints are loaded)")
    with ExitStack() as stack:
        src = _Slices(files, stack)
        state = (_llama_state if family is llama else _neox_state)(src, args, plan)
    local_args = _shard_args(family, args, plan)
    with torch.device("meta"):
        model = family.Transformer(local_args)
    if args.tie_embeddings:  # the tied head reads the embedding's rows: one tensor, loaded once
        state[("output" if family is llama else "embed_out") + ".weight"] = state[
            ("tok_embeddings" if family is llama else "embed_in") + ".weight"]
    model.load_state_dict(state, strict=True, assign=True)
    for owner, name in _row_parallel_pairs(family, model):
        linear = getattr(owner, name)
        setattr(owner, name, RowParallelLinear(linear.weight.data, None if linear.bias is None else linear.bias.data,
                                               group))
    embed_name, head_name = ("tok_embeddings", "output") if family is llama else ("embed_in", "embed_out")
    embedding = getattr(model, embed_name).weight
    head = embedding if args.tie_embeddings else getattr(model, head_name).weight
    if vocab_parallel:
        setattr(model, embed_name, VocabParallelEmbedding(embedding, plan.vocab[0], group))
        setattr(model, head_name, VocabParallelHead(head, plan, args.vocab_size, group))
    else:
        setattr(model, head_name, ReplicatedHead(head, rank))
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    model.full_args = args
    return model, hf_config, plan


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the distinct parameter tensors a module holds (a tied table counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.nbytes
    return total


# ---------------------------------------------------------------- the command channel
def _send(command: tuple) -> None:
    dist.broadcast_object_list([command], src=0)


def _receive() -> tuple:
    box = [None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class _ScratchSlab(KVSlab):
    """Rank 0's scoring slab: a reset is done on every rank (perplexity scoring resets slots directly)."""

    def reset(self, slot: int) -> None:
        _send(("reset", slot, "scratch"))
        super().reset(slot)


@contextmanager
def _shards_alive(runner: "ShardedRunner"):
    """A collective that fails (a shard died: gloo sees its connection close) becomes ShardLost, and every later
    call refuses at once: the group cannot be used again."""
    if runner.lost is not None:
        raise ShardLost(runner.lost)
    try:
        yield
    except (RuntimeError, ConnectionError) as err:
        if isinstance(err, SinkServeError):
            raise
        runner.lost = f"a tensor-parallel shard is gone ({str(err).splitlines()[0][:200]})"
        raise ShardLost(runner.lost) from err


class ShardedRunner(ModelRunner):
    """Rank 0's runner: the same calls as ModelRunner, each sent to the other ranks before it runs here."""

    def __init__(self, model: nn.Module, geometry: SlabGeometry, policy: str, max_chunk: int, world: int,
                 launcher=None):
        super().__init__(model, geometry, policy, max_chunk)
        self.world, self.launcher = world, launcher  # launcher: what close() stops (LocalShards or Ray's)
        self.lost: str | None = None  # why the group is unusable, once a shard died
        self.full_args = model.full_args
        _send(("init", dataclasses.astuple(geometry), policy, max_chunk))

    @property
    def vocab_size(self) -> int:
        return self.full_args.vocab_size

    @property
    def shard_bytes_per_slot(self) -> int:
        """KV bytes one session holds on one shard (rank 0's; every shard holds as many)."""
        return self.geometry.bytes_per_slot(self.dtype)

    @property
    def bytes_per_slot(self) -> int:
        """KV bytes one session holds on all shards together."""
        return self.world * self.shard_bytes_per_slot

    def reset_slot(self, slot: int) -> None:
        with _shards_alive(self):
            _send(("reset", slot, None))
        super().reset_slot(slot)

    def export_slot(self, slot: int) -> dict[str, torch.Tensor]:
        parts = [None] * self.world
        with _shards_alive(self):
            _send(("export", slot))
            dist.gather_object(super().export_slot(slot), parts, dst=0)
        return {f"shard{rank}.{name}": t for rank, part in enumerate(parts) for name, t in part.items()}

    def import_slot(self, slot: int, state: dict[str, torch.Tensor]) -> None:
        with _shards_alive(self):
            _send(("import", slot))
        parts = [{} for _ in range(self.world)]
        for key, tensor in state.items():
            rank, name = key.split(".", 1)
            parts[int(rank.removeprefix("shard"))][name] = tensor
        mine = [None]
        with _shards_alive(self):
            dist.scatter_object_list(mine, parts, src=0)
        super().import_slot(slot, mine[0])

    def scratch_slab(self, slots: int) -> KVSlab:
        with _shards_alive(self):
            _send(("scratch", slots))
        g = self.geometry
        return _ScratchSlab(SlabGeometry(g.n_layers, g.n_kv_heads, g.head_dim, g.sinks, g.window, slots), self.dtype,
                            self.device)

    def forward(self, rows: list[RowInput], slab: KVSlab | None = None) -> list[torch.Tensor | None]:
        scratch = slab is not None and slab is not self.slab
        with _shards_alive(self):
            _send(("forward", [(r.slot, list(r.ids), r.logits) for r in rows], "scratch" if scratch else None))
            return super().forward(rows, slab)

    def shard_stats(self) -> list[dict[str, int]]:
        """Per rank: bytes of its parameters and of its KV slab (what each shard's memory holds)."""
        stats = [None] * self.world
        with _shards_alive(self):
            _send(("stats",))
            dist.gather_object(_stats(self), stats, dst=0)
        return stats

    def close(self) -> None:
        try:
            if self.lost is None:
                _send(("stop",))
        except RuntimeError:
            pass  # a shard died since the last call: the launcher ends the rest
        finally:
            if self.launcher is not None:
                self.launcher.close()


def _stats(runner: ModelRunner) -> dict[str, int]:
    return {"parameter_bytes": parameter_bytes(runner.model), "slab_bytes": runner.slab.nbytes,
            "bytes_per_slot": runner.geometry.bytes_per_slot(runner.dtype)}


def serve_shard(model: nn.Module) -> None:
    """The loop of every rank but 0: run each command rank 0 sends, until it says stop."""
    runner: ModelRunner | None = None
    scratch: KVSlab | None = None  # the latest scoring slab (scoring uses one at a time)
    while True:
        command, *rest = _receive()
        if command == "stop":
            return
        if command == "init":
            geometry, policy, max_chunk = rest
            runner, scratch = ModelRunner(model, SlabGeometry(*geometry), policy, max_chunk), None
        elif command == "forward":
            rows, which = rest
            try:
                runner.forward([RowInput(*row) for row in rows], scratch if which == "scratch" else None)
            except SinkServeError:
                pass  # rank 0 refused the same step before any collective (a full dense cache)
        elif command == "reset":
            slot, which = rest
            (scratch.reset if which == "scratch" else runner.reset_slot)(slot)
        elif command == "export":
            dist.gather_object(runner.export_slot(rest[0]), None, dst=0)
        elif command == "import":
            mine = [None]
            dist.scatter_object_list(mine, None, src=0)
            runner.import_slot(rest[0], mine[0])
        elif command == "scratch":
            scratch = runner.scratch_slab(rest[0])
        elif command == "stats":
            dist.gather_object(_stats(runner), None, dst=0)
        else:
            raise RuntimeError(f"unknown shard command {command!r}")


# ---------------------------------------------------------------- joining a group
def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def shard_device(device: torch.device, rank: int, local: bool) -> torch.device:
    """A local launcher gives rank r GPU r; a Ray shard sees only its own GPU, cuda:0."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", rank if local else 0)


def join_group(rank: int, world: int, host: str, port: int, device: torch.device) -> None:
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = dist.TCPStore(host, port, world, is_master=rank == 0, timeout=RENDEZVOUS_TIMEOUT)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)


def startup_check(error: str | None) -> None:
    """Every rank says whether it loaded; one that did not fails them all, rank 0 with its message."""
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    failed = [(rank, e) for rank, e in enumerate(errors) if e]
    if failed:
        rank, message = failed[0]
        raise UnsupportedModel(f"shard {rank} of {len(errors)} failed to start: {message}")


def shard_threads(world: int, num_threads: int | None) -> int:
    return num_threads or max(1, len(os.sched_getaffinity(0)) // world)


def run_shard(rank: int, world: int, host: str, port: int, checkpoint: str, dtype: str, device: str,
              num_threads: int | None, local: bool = True, vocab_parallel: bool = True) -> None:
    """A shard of rank > 0: join the group, load this rank's slices, serve rank 0's commands until stop."""
    from sinkserve.engine.loader import DTYPES

    torch.set_num_threads(shard_threads(world, num_threads))
    dev = shard_device(torch.device(device), rank, local)
    join_group(rank, world, host, port, dev)
    try:
        error = None
        try:
            model = load_shard(Path(checkpoint), world, rank, DTYPES[dtype], dev, vocab_parallel=vocab_parallel)[0]
        except Exception as err:  # reported to rank 0, which raises it
            error = f"{type(err).__name__}: {err}"
        startup_check(error)
        with torch.inference_mode():
            serve_shard(model)
    finally:
        dist.destroy_process_group()


def _spawned_shard(*args) -> None:
    try:
        run_shard(*args)
    except SinkServeError:
        pass  # a failed start: rank 0 reports it
    except (RuntimeError, ConnectionError) as err:
        if dist.is_initialized() or "Connection closed" not in str(err):
            import traceback

            traceback.print_exc()  # the shard's own failure, in its log (rank 0 sees the closed connection)


class LocalShards:
    """Ranks 1..N-1 as local processes (torch.multiprocessing, spawn); rank 0 is the calling process."""

    def __init__(self, world: int, checkpoint: Path, dtype: str, device: torch.device, num_threads: int | None,
                 vocab_parallel: bool = True):
        import torch.multiprocessing as mp

        self.world = world
        host, port = "127.0.0.1", free_port()
        context = mp.get_context("spawn")
        self.processes = [
            context.Process(target=_spawned_shard, daemon=True, name=f"sinkserve-shard-{rank}",
                            args=(rank, world, host, port, str(checkpoint), dtype, str(device), num_threads, True,
                                  vocab_parallel))
            for rank in range(1, world)
        ]
        for process in self.processes:
            process.start()
        try:
            join_group(0, world, host, port, shard_device(device, 0, local=True))
        except Exception:
            self.kill()
            raise
        self.joined = True

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def kill(self) -> None:
        for process in self.processes:
            if process.is_alive():
                process.kill()
            process.join(timeout=10)

    def close(self) -> None:
        """After rank 0 said stop (ShardedRunner.close), or on a failed start: the shards end, none is left."""
        try:
            for process in self.processes:
                process.join(timeout=30)
        finally:
            self.kill()
            if dist.is_initialized():
                dist.destroy_process_group()


def stop_all(launcher) -> None:
    """Stop the other ranks when no runner was made (a refused engine setting): say stop, then close."""
    try:
        _send(("stop",))
    finally:
        launcher.close()


def load_sharded_model(checkpoint: Path, world: int, dtype_name: str, device: torch.device,
                       num_threads: int | None, oversubscribe: bool = False, vocab_parallel: bool = True,
                       launcher=None):
    """Start N local shards of `checkpoint` (checked before anything starts); returns (rank 0's model,
    hf_config, launcher). Any failure leaves no process running."""
    from sinkserve.engine.loader import DTYPES

    hf_config = json.loads((checkpoint / "config.json").read_text())
    check_start(hf_config, world, device, oversubscribe)
    torch.set_num_threads(shard_threads(world, num_threads))
    # launcher(world, checkpoint, dtype, device, num_threads, vocab_parallel): LocalShards, or the replica's Ray one
    shards = (launcher or LocalShards)(world, checkpoint, dtype_name, device, num_threads, vocab_parallel)
    try:
        error, model = None, None
        try:
            model, hf_config, _ = load_shard(checkpoint, world, 0, DTYPES[dtype_name],
                                             shard_device(device, 0, local=True), vocab_parallel=vocab_parallel)
        except Exception as err:
            error = f"{type(err).__name__}: {err}"
        startup_check(error)
    except BaseException:
        shards.close()
        raise
    return model, hf_config, shards
