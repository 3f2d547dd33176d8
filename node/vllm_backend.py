"""The vLLM generation backend (GPU; `pip install -e '.[gpu]'`).

vLLM draws the tokens; the log-probs the learner needs are then recomputed with the Hugging Face copy of the model
at the learner's temperature, as the GEPO authors' own sampler does. That avoids the numeric mismatch between vLLM's
kernels and the learner's, and vLLM's choice of raw versus processed log-probs, which differs across its versions.

New versions are copied into vLLM's model in place when the engine exposes it (single-GPU engines do); otherwise the
engine is rebuilt from the model folder, which is slower but works with any vLLM.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from gepo.sampling import GeneratedGroup, SamplingParams
from gepo.train_step import recompute_logprobs
from node.model_io import load_weights
from protocol.manifest import torch_state_dict

log = logging.getLogger(__name__)


class VLLMBackend:
    def __init__(self, model_dir: Path, hf_model: Any, tokenizer: Any, manifest: Any, buffer: Any, *,
                 gpu_memory_utilization: float = 0.5) -> None:
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise RuntimeError("--backend vllm needs vLLM: pip install -e '.[gpu]' (on a CUDA machine)") from None
        self.model_dir = Path(model_dir)
        self.hf_model, self.tokenizer = hf_model, tokenizer
        self.gpu_memory_utilization = gpu_memory_utilization
        self._save(manifest, buffer)
        self.llm = self._engine()

    def _save(self, manifest: Any, buffer: Any) -> None:
        from safetensors.torch import save_file

        save_file(torch_state_dict(manifest, buffer, copy=True), str(self.model_dir / "model.safetensors"),
                  metadata={"format": "pt"})

    def _engine(self) -> Any:
        from vllm import LLM

        dtype = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(self.hf_model.dtype, "float32")
        return LLM(model=str(self.model_dir), dtype=dtype, gpu_memory_utilization=self.gpu_memory_utilization,
                   enable_prefix_caching=True)

    def load(self, manifest: Any, buffer: Any) -> None:
        load_weights(self.hf_model, manifest, buffer)
        try:
            inner = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        except AttributeError:
            inner = None
        if inner is not None and hasattr(inner, "load_weights"):
            inner.load_weights(weights=list(torch_state_dict(manifest, buffer, copy=True).items()))
            return
        log.info("this vLLM does not expose its model; rebuilding the engine for version %d", manifest.version)
        del self.llm
        torch.cuda.empty_cache()
        self._save(manifest, buffer)
        self.llm = self._engine()

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[GeneratedGroup]:
        from vllm import SamplingParams as VSamplingParams

        vparams = VSamplingParams(n=params.n, temperature=params.temperature, top_p=params.top_p,
                                  top_k=params.top_k if params.top_k > 0 else -1, max_tokens=params.max_new_tokens,
                                  seed=params.seed)
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], vparams, use_tqdm=False)
        eos = self.tokenizer.eos_token_id
        groups = []
        for prompt, out in zip(prompts, outputs):
            completions = [list(o.token_ids) or [eos] for o in out.outputs]
            logprobs = recompute_logprobs(self.hf_model, prompt, completions, params.temperature,
                                          self.tokenizer.pad_token_id or 0)
            finished = [bool(c) and c[-1] == eos for c in completions]
            groups.append(GeneratedGroup(list(prompt), completions, logprobs, finished))
        return groups
