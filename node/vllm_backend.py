"""The vLLM generation backend (GPU; `pip install -e '.[gpu]'`).

vLLM draws the tokens; the log-probs the learner needs are then recomputed with the Hugging Face copy of the model
at the learner's temperature, as the GEPO authors' own sampler does. That avoids the numeric mismatch between vLLM's
kernels and the learner's, and vLLM's choice of raw versus processed log-probs, which differs across its versions.

A new version is written to the model folder and the engine reloads it in place:
`LLM.collective_rpc("reload_weights")` makes every worker re-read the weights from the folder it was built from
(vLLM's V1 workers have that method; a method name, unlike a function, needs no pickling into the engine-core
process). The prefix cache is then reset, as its cached prompt KV was computed with the old weights. An engine
without the method is rebuilt from the folder instead: slower, but works with any vLLM.

Tested by tests/test_vllm_backend.py, which runs only where vllm is importable and CUDA is available.
"""

from __future__ import annotations

import gc
import logging
import os
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

        # Written aside and renamed: the engine never sees a half-written file, and a reader still mapping the old
        # one keeps its (unlinked) inode instead of having it truncated under it.
        tmp = self.model_dir / "model.safetensors.tmp"
        save_file(torch_state_dict(manifest, buffer, copy=True), str(tmp), metadata={"format": "pt"})
        os.replace(tmp, self.model_dir / "model.safetensors")

    def _engine(self) -> Any:
        from vllm import LLM

        dtype = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(self.hf_model.dtype, "float32")
        return LLM(model=str(self.model_dir), dtype=dtype, gpu_memory_utilization=self.gpu_memory_utilization,
                   enable_prefix_caching=True)

    def load(self, manifest: Any, buffer: Any) -> None:
        load_weights(self.hf_model, manifest, buffer)
        self._save(manifest, buffer)
        try:
            self.llm.collective_rpc("reload_weights")
        except Exception as exc:  # noqa: BLE001 - no in-place reload in this vLLM: rebuild the engine
            log.info("vLLM could not reload in place (%s); rebuilding the engine for version %d",
                     str(exc).splitlines()[0] if str(exc) else type(exc).__name__, manifest.version)
            del self.llm
            gc.collect()
            torch.cuda.empty_cache()
            self.llm = self._engine()
            return
        self.llm.reset_prefix_cache()

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
