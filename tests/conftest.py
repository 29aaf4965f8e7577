"""Shared fixtures: a tiny random Llama (GQA) and a tiny random Qwen2 (GQA, q/k/v biases, tied
embeddings) built from configs, and the embedded model.

`tiny_lm` runs a test on both tiny architectures; `make_tiny(arch)` builds either."""
import os

# Triton's CPU interpreter runs faedkv's kernels on CPU tensors in the tests. It must be on
# before triton is first imported (its library functions are built for it then); on a machine
# without CUDA nothing else changes (faedkv only launches kernels on CUDA unless fused=True).
os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

from analysis.harness.models import build_tiny_llama, build_tiny_qwen2

torch.set_num_threads(min(2, os.cpu_count() or 1))

# Every test's random draws (random, numpy, torch) are seeded from its id, so a failure reproduces;
# FAEDKV_TEST_SEED=<int> draws a different sample of every test.
BASE_SEED = int(os.environ.get("FAEDKV_TEST_SEED", "0"))


@pytest.fixture(autouse=True)
def seeded_draws(request):
    import random
    import zlib

    import numpy as np

    seed = (zlib.crc32(request.node.nodeid.encode()) + BASE_SEED) % 2**31
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    request.node.draw_seed = seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    seed = getattr(item, "draw_seed", None)
    if report.failed and seed is not None:
        report.sections.append(("random draws", f"seeded with {seed} (from the test id and "
                                                 f"FAEDKV_TEST_SEED={BASE_SEED})"))


@torch.no_grad()
def prefill(model, ids, press=None):
    """A DynamicCache after one prefill of ids, compressed by press (None: the full cache)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    if press is None:
        model.model(input_ids=ids, past_key_values=cache)
    else:
        with press(model):
            model.model(input_ids=ids, past_key_values=cache)
    return cache


@torch.no_grad()
def next_logits(model, cache, ids, start):
    """float32 logits of the tokens after the prefill, read from the (compressed) cache at their
    true positions start, start + 1, ... (what kvpress's pipeline does)."""
    positions = torch.arange(start, start + ids.shape[1]).unsqueeze(0)
    return model(input_ids=ids, past_key_values=cache, position_ids=positions).logits.float()


@pytest.fixture(params=[torch.float32], ids=["fp32"])
def tiny_llama(request):
    """3 layers, 4 query heads, 2 KV heads, head_dim 16, vocab 128: fast and download-free."""
    return build_tiny_llama(seed=0, dtype=request.param, vocab_size=128, num_layers=3)


def make_tiny_llama(dtype=torch.float32, **config):
    """The same model as the fixture, for tests that need another dtype or geometry."""
    config.setdefault("vocab_size", 128)
    config.setdefault("num_layers", 3)
    return build_tiny_llama(seed=0, dtype=dtype, **config)


def make_tiny_qwen2(dtype=torch.float32, **config):
    """The Qwen2 counterpart: same geometry as the tiny Llama, q/k/v biases drawn at random."""
    config.setdefault("vocab_size", 128)
    config.setdefault("num_layers", 3)
    return build_tiny_qwen2(seed=0, dtype=dtype, **config)


TINY_ARCHS = {"llama": make_tiny_llama, "qwen2": make_tiny_qwen2}


def make_tiny(arch: str, dtype=torch.float32, **config):
    return TINY_ARCHS[arch](dtype=dtype, **config)


@pytest.fixture(params=[torch.float32], ids=["fp32"])
def tiny_qwen2(request):
    """3 layers, 4 query heads, 2 KV heads, head_dim 16, vocab 128, q/k/v biases."""
    return make_tiny_qwen2(dtype=request.param)


@pytest.fixture(params=list(TINY_ARCHS))
def tiny_lm(request):
    """The tiny Llama, then the tiny Qwen2 (fp32): for tests every architecture must pass."""
    return make_tiny(request.param)


@pytest.fixture(scope="session")
def embedded():
    """The real embedded SmolLM2-135M-Instruct (bf16, CPU); loaded once per test session."""
    from analysis.harness.models import load_model

    return load_model()


class MinusKeyNorm:
    """A stand-in exact-token scorer: minus the key norm, as kvpress's KnormPress scores (deterministic)."""

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        return -keys.float().norm(dim=-1)
