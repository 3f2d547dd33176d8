"""LoRA adapter versions (``--publish-adapter``): what the learner publishes and how a sampler rebuilds the policy.

The learner's first version in a life is a full version, the **base**; every later one carries only the adapter
factors, rounded to --publish-dtype, with the signed :class:`protocol.adapter.AdapterInfo` naming the base
(:class:`AdapterVersions`). A sampler fetches the base once (node/sampler_swarm.py; the weight store never prunes a
version that a held adapter version refers to) and builds each adapter version's weights with :func:`merge_adapter`:
``W = W_base + scaling * B @ A`` in float32, rounded once to the base tensor's dtype - a function of the published
bytes only, so every sampler holds bit-identical weights (:func:`policy_weights`). HF backend only.

At a fresh start the base is the frozen base model itself (the adapters start at B = 0, so it *is* version 0). A
resumed learner's base is its merged policy at the resumed version N; its adapter versions then carry the rank-2r
factors ``[A_v; A_N]`` and ``[B_v, -B_N]``, whose product ``B_v A_v - B_N A_N`` moves the base from N to v.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from protocol.adapter import AdapterInfo, adapter_tensor_names, check_base
from protocol.manifest import WeightManifest, torch_state_dict

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# the merge (sampler; tests compare it with peft's merge_and_unload)


def merge_adapter(base: Mapping[str, torch.Tensor], adapter: Mapping[str, torch.Tensor],
                  info: AdapterInfo) -> Dict[str, torch.Tensor]:
    """The adapter version's state dict: ``base`` with ``<t>.weight = round(W + scaling * B @ A)`` for every target
    (float32 arithmetic, one rounding to W's dtype); untouched tensors are shared with ``base``."""
    out = dict(base)
    with torch.no_grad():
        for target in info.targets:
            a_name, b_name = adapter_tensor_names(target)
            w = base[f"{target}.weight"]
            delta = adapter[b_name].float() @ adapter[a_name].float()
            out[f"{target}.weight"] = (w.float() + info.scaling * delta).to(w.dtype)
    return out


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of a state dict's names, dtypes, shapes and bytes, in name order: which weights a model holds."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# the learner's side


def lora_factors(policy: Any) -> Tuple[Dict[str, Tuple[torch.Tensor, torch.Tensor]], float]:
    """``({module name in the plain model: (A, B) in float32}, scaling)`` of a peft LoRA policy's active adapter."""
    from peft.tuners.lora import LoraLayer

    adapter = policy.active_adapter
    factors: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
    scalings = set()
    for name, module in policy.get_base_model().named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            if getattr(module, "fan_in_fan_out", False) or module.use_dora.get(adapter, False):
                raise ValueError(f"--publish-adapter: {name} is a fan-in-fan-out or DoRA layer (not supported)")
            if not hasattr(module.lora_A[adapter], "weight"):
                raise ValueError(f"--publish-adapter: {name} is not a linear LoRA layer (not supported)")
            a = module.lora_A[adapter].weight.detach().float().cpu().clone()
            b = module.lora_B[adapter].weight.detach().float().cpu().clone()
            factors[name] = (a, b)
            scalings.add(float(module.scaling[adapter]))
    if not factors:
        raise ValueError("--publish-adapter: the policy has no LoRA layers")
    if len(scalings) != 1:
        raise ValueError(f"--publish-adapter needs one scaling for every layer, got {sorted(scalings)}")
    return factors, scalings.pop()


@dataclasses.dataclass
class _Base:
    version: int
    digest: bytes  # SHA-256 of its signed manifest
    factors: Optional[Dict[str, Tuple[torch.Tensor, torch.Tensor]]]  # the adapters merged into it (None: B = 0)


class AdapterVersions:
    """The learner's --publish-adapter state: the base of this life, and each later version's adapter tensors."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.base: Optional[_Base] = None

    def published(self, version: int, manifest_digest: bytes, policy: Any) -> None:
        """Record a just-published full version as the base (the first version of this life)."""
        if self.base is not None:
            return
        factors, _ = lora_factors(policy)
        merged = None if all(not b.any() for _, b in factors.values()) else factors
        self.base = _Base(version, manifest_digest, merged)
        log.info("--publish-adapter: version %d is the base; later versions carry only the LoRA adapters%s",
                 version, "" if merged is None else " (rank 2r: resumed adapters are merged into the base)")

    def tensors(self, policy: Any) -> Tuple[Dict[str, torch.Tensor], AdapterInfo]:
        """The adapter tensors of the current policy relative to the base, rounded to the publish dtype."""
        assert self.base is not None, "publish the base first"
        factors, scaling = lora_factors(policy)
        tensors: Dict[str, torch.Tensor] = {}
        rank = None
        for target, (a, b) in factors.items():
            if self.base.factors is not None:  # B_v A_v - B_N A_N as one product of rank 2r
                a0, b0 = self.base.factors[target]
                a, b = torch.cat([a, a0], dim=0), torch.cat([b, -b0], dim=1)
            a_name, b_name = adapter_tensor_names(target)
            tensors[a_name], tensors[b_name] = a.to(self.dtype), b.to(self.dtype)
            rank = a.shape[0]
        info = AdapterInfo(base_version=self.base.version, base_digest=self.base.digest, scaling=float(scaling),
                           rank=int(rank), targets=tuple(factors))
        return tensors, info


# ---------------------------------------------------------------------------------------------------------------
# the sampler's side


@dataclasses.dataclass
class PolicyWeights:
    """A held version ready to load: ``manifest``/``buffer`` are the full version holding the model files (the
    version itself, or its base); ``state`` the merged weights of an adapter version (None: a full version)."""

    version: int
    manifest: WeightManifest
    buffer: Any
    state: Optional[Dict[str, torch.Tensor]] = None
    adapter: Optional[AdapterInfo] = None


def policy_weights(swarm: Any, version: int) -> PolicyWeights:
    """The weights of a held version (``swarm``: a :class:`node.sampler_swarm.SamplerSwarm`). KeyError when it (or
    its base) is not held completely; ProtocolError when the held base is not the one the adapter version names."""
    manifest, buffer = swarm.get_weights(version)
    info = manifest.adapter
    if info is None:
        return PolicyWeights(version, manifest, buffer)
    base_vb = swarm.store.get(info.base_version)
    if base_vb is None or not base_vb.complete:
        raise KeyError(f"base version {info.base_version} of adapter version {version} is not held")
    check_base(info, version, manifest.tensors, base_vb.version, base_vb.digest, base_vb.manifest.tensors)
    base_buffer = base_vb.readonly_view()
    state = merge_adapter(torch_state_dict(base_vb.manifest, base_buffer), torch_state_dict(manifest, buffer), info)
    return PolicyWeights(version, base_vb.manifest, base_buffer, state, info)
