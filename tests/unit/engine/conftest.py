import pytest
import torch

from sinkserve.config import EngineConfig
from sinkserve.engine import load_engine
from sinkserve.engine.testing import make_tiny_checkpoint


# Tiny models gain nothing from threads, and OpenMP threads spin badly when other processes share the
# two cores (Ray replicas in the integration tests): one thread keeps these tests fast and steady.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"), arch="llama")


@pytest.fixture(scope="session")
def tiny_neox(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-neox"), arch="gpt_neox")


@pytest.fixture
def make_engine(tiny_llama):
    def build(**overrides):
        fields = dict(model=str(tiny_llama), sinks=4, window=32, slots=4, device="cpu", prefill_chunk=16, num_threads=1,
                      dtype="float32", weights="dense")  # the float32 reference path; auto: test_capability.py
        fields.update(overrides)
        return load_engine(EngineConfig(**fields))

    return build
