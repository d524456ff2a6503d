"""A decode step's layer loop never waits for the device: no `.item()`, `.tolist()`, `bool(tensor)`, `int(tensor)`
or `float(tensor)` between the embedding and the logits. On CUDA each of those is a host synchronisation, per
layer; on CPU they cost nothing, so the test makes them raise while the model runs a decode-only step."""

import contextlib

import pytest
import torch

from sinkserve.config import EngineConfig
from sinkserve.engine import load_engine
from sinkserve.protocol import GenerationParams

SYNCING_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__")


class HostSync(AssertionError):
    pass


@contextlib.contextmanager
def host_syncs_raise():
    saved = {name: getattr(torch.Tensor, name) for name in SYNCING_METHODS}

    def refuse(name):
        def method(self, *args, **kwargs):
            raise HostSync(f"Tensor.{name} inside the model's forward (a host synchronisation on CUDA)")
        return method

    try:
        for name in SYNCING_METHODS:
            setattr(torch.Tensor, name, refuse(name))
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


@pytest.mark.parametrize("arch_fixture", ["tiny_llama", "tiny_neox"])
@pytest.mark.parametrize("sinks", [4, 0])
def test_decode_step_forward_has_no_host_sync(request, arch_fixture, sinks):
    engine = load_engine(EngineConfig(model=str(request.getfixturevalue(arch_fixture)), sinks=sinks, window=24,
                                      slots=3, device="cpu", dtype="float32", weights="dense", num_threads=1))
    model = engine.runner.model
    guarded = {"decode_steps": 0, "stack": None}

    def before(module, args):
        batch = args[1]
        if batch.groups == () and batch.decode is not None:  # a decode-only step: the serving hot path
            guarded["decode_steps"] += 1
            guarded["stack"] = host_syncs_raise()
            guarded["stack"].__enter__()

    def after(module, args, output):
        if guarded["stack"] is not None:
            guarded["stack"].__exit__(None, None, None)
            guarded["stack"] = None

    model.register_forward_pre_hook(before)
    model.register_forward_hook(after, always_call=True)  # restores the methods even when the forward raised
    sessions = [engine.open_session() for _ in range(3)]
    for i, sid in enumerate(sessions):  # different lengths: masked rows, and rings that wrap (window 24)
        engine.add_message(sid, "word " * (5 + 7 * i), GenerationParams(max_tokens=40, ignore_eos=True))
    produced = 0
    while engine.has_work():
        produced += sum(1 for out in engine.step() if out.token_id is not None)
    assert produced == 3 * 40
    assert guarded["decode_steps"] >= 30  # the guard ran on the decode steps, and none of them raised
