"""The vLLM generation backend (node/vllm_backend.py) on a real GPU.

Skipped where vllm is not importable (it is an optional extra: `pip install -e '.[gpu]'`, CUDA machines only) and
where CUDA is not available. The tiny policy travels the way a sampler receives it: a weight manifest, built into a
model folder with `model_from_manifest`, then handed to `VLLMBackend`.
"""

from __future__ import annotations

import gc
import math

import pytest

vllm = pytest.importorskip("vllm")

import torch  # noqa: E402

from gepo.data import format_prompt  # noqa: E402
from gepo.sampling import SamplingParams, generate_groups  # noqa: E402
from gepo.train_step import recompute_logprobs  # noqa: E402
from node.model_io import load_policy, model_from_manifest, policy_files, policy_tensors  # noqa: E402
from protocol.manifest import build_manifest  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

QUESTIONS = ["What is 23 + 45?", "What is 7 + 8?", "What is 90 + 19?", "What is (12 * 3) - 4?", "What is 5 * 6?"]
MAX_NEW = 12


def _version(model, tokenizer, version: int):
    return build_manifest(policy_tensors(model), run_id="vllm-test", version=version,
                          files=policy_files(model, tokenizer))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from node.vllm_backend import VLLMBackend

    policy, tokenizer = load_policy(None)  # the shipped tiny policy, on the CPU
    manifest, buffer = _version(policy, tokenizer, 0)
    folder = tmp_path_factory.mktemp("vllm-sampler") / "model"
    # float32 on both sides, so greedy decoding can be compared token for token
    hf_model, tok = model_from_manifest(manifest, buffer, folder, device="cuda", dtype=torch.float32)
    backend = VLLMBackend(folder, hf_model, tok, manifest, buffer, gpu_memory_utilization=0.3)
    prompts = [format_prompt(tok, q) for q in QUESTIONS]
    yield backend, policy, tok, prompts
    del backend.llm
    gc.collect()
    torch.cuda.empty_cache()


def _greedy_vllm(backend, prompts):
    groups = backend.generate(prompts, SamplingParams(n=1, top_k=1, max_new_tokens=MAX_NEW, seed=0))
    return [g.completion_ids[0] for g in groups]


def _greedy_hf(backend, prompts):
    groups = generate_groups(backend.hf_model, prompts, SamplingParams(n=1, top_k=1, max_new_tokens=MAX_NEW),
                             eos=backend.tokenizer, pad_token_id=backend.tokenizer.pad_token_id)
    return [g.completion_ids[0] for g in groups]


def _agreement(a, b) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


def test_generate_returns_completions_and_logprobs(setup):
    backend, _, tok, prompts = setup
    G = 4
    groups = backend.generate(prompts, SamplingParams(n=G, max_new_tokens=MAX_NEW, temperature=1.0, seed=3))
    assert len(groups) == len(prompts)
    vocab = backend.hf_model.config.vocab_size
    all_lps = []
    for prompt, group in zip(prompts, groups):
        assert group.prompt_ids == list(prompt)
        assert group.size == G and len(group.logprobs) == G and len(group.finished) == G
        for ids, lps, finished in zip(group.completion_ids, group.logprobs, group.finished):
            assert 1 <= len(ids) <= MAX_NEW
            assert len(lps) == len(ids)
            assert all(0 <= t < vocab for t in ids)
            assert all(math.isfinite(x) and x <= 0.0 for x in lps)
            assert finished == (ids[-1] == tok.eos_token_id)
            all_lps.extend(lps)
        # the attached log-probs are the learner-side ones: log_softmax(logits / T) of the HF copy
        ref = recompute_logprobs(backend.hf_model, prompt, group.completion_ids, 1.0, tok.pad_token_id or 0)
        for got, want in zip(group.logprobs, ref):
            assert got == pytest.approx(want, abs=1e-4)
    # vLLM really samples from this policy: its tokens are likely under the HF copy (uniform would be ~ -4.6)
    assert sum(all_lps) / len(all_lps) > -2.0


def test_greedy_matches_the_hf_model(setup):
    backend, _, _, prompts = setup
    assert _agreement(_greedy_vllm(backend, prompts), _greedy_hf(backend, prompts)) >= 0.8


def test_load_updates_weights_in_place(setup):
    from transformers import AutoModelForCausalLM

    backend, policy, tok, prompts = setup
    before = _greedy_vllm(backend, prompts)
    torch.manual_seed(1)
    other = AutoModelForCausalLM.from_config(policy.config)  # same architecture, other weights
    manifest1, buffer1 = _version(other, tok, 1)
    backend.load(manifest1, buffer1)
    for name, p in other.state_dict().items():
        assert torch.equal(backend.hf_model.state_dict()[name].cpu(), p), name
    after = _greedy_vllm(backend, prompts)
    assert _agreement(after, _greedy_hf(backend, prompts)) >= 0.8
    assert _agreement(after, before) < 1.0
    # and back: the prefix cache must not serve prompt KV computed with the other weights
    manifest0, buffer0 = _version(policy, tok, 2)
    backend.load(manifest0, buffer0)
    assert _agreement(_greedy_vllm(backend, prompts), before) >= 0.8
