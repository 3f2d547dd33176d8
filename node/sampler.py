"""`python -m node.sampler --peers <multiaddr>`: a volunteer that generates rollouts for the swarm's learner.

It needs nothing but a peers address: model config, tokenizer, weights and the prompt set (questions only) all come
from the swarm. Each group's prompt is assigned, not chosen: a hash of this sampler's key and the group's sequence
number picks the dataset index, and the learner re-checks it. Completions carry the per-token log-probs of the
temperature-scaled distribution they were drawn from and the policy version that drew them.

`--simulate-delay lognormal|weibull` reproduces the GEPO paper's heterogeneous samplers: before each batch a new
delay d is drawn, and the sampler switches to the newest version only if its current one was loaded more than d
seconds ago.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gepo.data import assign_prompt_index, format_prompt
from gepo.delays import DELAY_KINDS, DelayModel
from node.cli import (ArgumentParser, add_dataclass_args, add_process_args, dataclass_from_args, option,
                      parse_with_recipe, program_name, setup_process)
from node.errors import (EXIT_INTERRUPTED, EXIT_USAGE, BootstrapError, ConfigError, ModelLoadError, TrustError,
                         fail)
from node.metrics import GracefulStop, StatusLine, quiet_transformers
from node.preflight import DTYPES, check_swarm_args, parse_device

if TYPE_CHECKING:
    from gepo.sampling import GeneratedGroup, SamplingParams


def _import_sampling_stack() -> None:
    """torch, transformers and the generation code, imported when a Sampler is built rather than at start-up, so
    that `--help` and a bad argument answer in about a second. They become this module's globals, as a top-level
    import would make them."""
    global np, torch, generate_groups, load_weights, model_from_manifest, read_run_file, resolve_device
    global resolve_dtype, RunInfo, wire, policy_weights, ProtocolError
    import numpy as np
    import torch

    from gepo.sampling import generate_groups
    from node.adapters import policy_weights
    from node.model_io import load_weights, model_from_manifest, read_run_file, resolve_device, resolve_dtype
    from node.run_info import RunInfo
    from protocol import rollout as wire
    from protocol.errors import ProtocolError


log = logging.getLogger("node.sampler")


@dataclass
class SamplerConfig:
    backend: str = option("hf", "generation backend: hf (transformers, CPU or CUDA) or vllm (GPU, if installed)",
                          choices=("hf", "vllm"))
    device: str = option("auto", "cpu, cuda, cuda:N or auto (cuda when there is one)", parse=parse_device)
    dtype: str = option("auto", "auto: bf16 on a GPU that has it, else fp32", choices=DTYPES)
    batch_prompts: int = option(4, "prompts generated together, each with the learner's G completions")
    simulate_delay: str = option("none", "simulate a slow node (the GEPO paper's delay model)", choices=DELAY_KINDS)
    delay_lower: float = option(60.0, "simulated delay: lower bound in seconds (fixed: the delay itself)")
    delay_upper: float = option(1920.0, "simulated delay: upper bound in seconds")
    delay_offset: float = option(400.0, "simulated delay: d = clip(T - offset, lower, upper) as in the paper")
    exit_on_unreachable: bool = option(False, "exit (code 3) when the learner cannot be reached at start, instead "
                                              "of waiting for it and retrying with back-off (1 s doubling to 30 s)")
    wait_learner: float = option(60.0, "with --exit-on-unreachable: seconds to wait for the learner's heartbeat")
    wait_weights: float = option(300.0, "seconds to wait for the first complete policy version")
    max_groups: int = option(0, "stop after sending this many groups (0: run until interrupted)")
    max_pending: int = option(8, "pause generation while this many groups wait for the learner (back-pressure: "
                                 "rollouts generated for a busy learner would only go stale)")
    max_outbox_wait: float = option(600.0, "seconds to wait for room when the outbox is full before giving up")
    gpu_memory_utilization: float = option(0.5, "vllm: share of GPU memory for weights and KV cache")
    seed: int = option(0, "sampling seed (combined with the sequence number)")


def build_parser() -> argparse.ArgumentParser:
    from node.config import SwarmConfig

    parser = ArgumentParser(
        prog=program_name("node.sampler", "gepo-sampler"),
        description="A gepo-swarm sampler: fetches the policy from the swarm, generates signed rollout groups and "
                    "delivers them to the learner. Needs only --peers.",
    )
    add_process_args(parser)
    add_dataclass_args(parser, SamplerConfig, "sampler")
    SwarmConfig.add_argparse_args(parser, role="sampler")
    return parser


class SequenceCounter:
    """Per-identity sequence numbers that survive restarts (the learner rejects a reused one as a replay)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.next = int(path.read_text()) if path is not None and path.is_file() else 0

    def take(self, n: int) -> list[int]:
        seqs = list(range(self.next, self.next + n))
        self.next += n
        if self.path is not None:  # written before use: a crash skips numbers, never repeats them
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(str(self.next))
            os.replace(tmp, self.path)
        return seqs


class HFBackend:
    """transformers generation through gepo.sampling (CPU or CUDA)."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model, self.tokenizer = model, tokenizer

    def load(self, manifest: Any, buffer: Any) -> None:
        load_weights(self.model, manifest, buffer)

    def load_state(self, state: dict[str, Any], version: int) -> None:
        """A LoRA adapter version's merged weights (node/adapters.py)."""
        from node.model_io import load_state

        load_state(self.model, state, version)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[GeneratedGroup]:
        with torch.no_grad():
            return generate_groups(self.model, prompts, params, eos=self.tokenizer,
                                   pad_token_id=self.tokenizer.pad_token_id)


class Sampler:
    def __init__(self, cfg: SamplerConfig, swarm_cfg: Any, stop: GracefulStop | None = None) -> None:
        from node.sampler_swarm import SamplerSwarm

        _import_sampling_stack()
        self.cfg = cfg
        self.swarm_cfg = swarm_cfg
        self.state_dir = Path(swarm_cfg.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.swarm = SamplerSwarm(swarm_cfg, keep_trying=not cfg.exit_on_unreachable)
        self.seqs = SequenceCounter(self.state_dir / "sequence.txt")
        self.delay = DelayModel(cfg.simulate_delay, cfg.delay_lower, cfg.delay_upper, cfg.delay_offset)
        self.rng = np.random.default_rng(cfg.seed)
        self.status = StatusLine()
        self.version: int | None = None
        self.loaded_at = 0.0
        self.sent = 0
        self.tokens = 0
        self.backend: Any = None
        self.refused: int | None = None  # the adapter version last refused (logged once)
        self.merged_names: list[str] = []  # tensors of the last adapter version loaded (for stats.json)
        self.info: RunInfo | None = None
        self.stop = stop or GracefulStop()

    def start(self) -> None:
        started = time.monotonic()

        def waiting(seconds: float) -> None:  # the swarm re-dials with back-off meanwhile
            if self.stop.requested:
                raise KeyboardInterrupt
            # A learner that answers but signs with another key is a trust failure, not an outage: waiting longer
            # than --wait-learner for the trusted one would never end.
            if self.swarm.untrusted_learners and time.monotonic() - started > self.cfg.wait_learner:
                raise self._trust_error()
            self.status.update(f"learner unreachable since {seconds:.0f} s, retrying")

        try:
            self.swarm.start(wait_for_learner=self.cfg.wait_learner if self.cfg.exit_on_unreachable else float("inf"),
                             on_waiting=waiting)
        except TimeoutError:
            if self.swarm.untrusted_learners:
                raise self._trust_error() from None
            pinned = (f"; only a learner signing with --learner-key {self.swarm_cfg.learner_key} is trusted: is that "
                      f"the key the learner printed?" if self.swarm_cfg.learner_key else "")
            raise TimeoutError(f"no learner found within {self.cfg.wait_learner:.0f}s through "
                               f"{' '.join(self.swarm_cfg.peers) or '(no --peers given)'}: is the address right and "
                               f"the learner running with the same --run-id ({self.swarm_cfg.run_id!r})?{pinned}"
                               ) from None
        log.info("joined as %s; learner %s", self.swarm.public_key_str, self.swarm.learner_key)
        version = self.swarm.wait_for_version(timeout=self.cfg.wait_weights)
        if version is None:
            raise TimeoutError(f"no complete policy version arrived within {self.cfg.wait_weights:.0f}s")
        self._load_first(version)

    def _trust_error(self) -> "TrustError":
        other = self.swarm.untrusted_learners[0]
        return TrustError(f"the swarm's learner signs with {other}, but this sampler trusts only "
                          f"{self.swarm.learner_key} (remembered in {self.swarm_cfg.state_dir}/trusted_learner.txt "
                          f"from an earlier run): if the new learner is yours, restart with --learner-key {other}")

    def _load_first(self, version: int) -> None:
        weights = policy_weights(self.swarm, version)  # an adapter version: its base's files, merged weights
        manifest, buffer = weights.manifest, weights.buffer
        self.info = RunInfo.from_json(read_run_file(manifest, buffer))
        device = resolve_device(self.cfg.device)
        dtype = resolve_dtype(self.cfg.dtype, device)
        if weights.state is not None and self.cfg.backend != "hf":
            raise self._adapter_needs_hf(version)
        model, tokenizer = model_from_manifest(manifest, buffer, self.state_dir / "model", device, dtype)
        if self.cfg.backend == "vllm":
            from node.vllm_backend import VLLMBackend

            self.backend = VLLMBackend(self.state_dir / "model", model, tokenizer, manifest, buffer,
                                       gpu_memory_utilization=self.cfg.gpu_memory_utilization)
        else:
            self.backend = HFBackend(model, tokenizer)
        if weights.state is not None:
            self._load_adapter_version(weights)
        self.tokenizer = tokenizer
        self.version, self.loaded_at = version, time.monotonic()
        log.info("policy version %d loaded (%d prompts, G=%d, temperature %.2f)", version, len(self.info.prompts),
                 self.info.group_size, self.info.temperature)

    def maybe_switch(self) -> None:
        """Take the newest version, unless the simulated delay says this node has not caught up yet."""
        newest = self.swarm.latest_version()
        if newest is None or self.version is None or newest <= self.version:
            return
        delay = float(self.delay.sample(self.rng))
        if time.monotonic() - self.loaded_at < delay:
            return
        try:
            weights = policy_weights(self.swarm, newest)
        except KeyError:  # pruned between the two calls; the next batch picks up whatever is newest then
            return
        except ProtocolError as exc:  # an adapter version over another base than the one held
            if self.refused != newest:
                log.error("%s", exc)
                self.refused = newest
            return
        if weights.state is None:
            self.backend.load(weights.manifest, weights.buffer)
            self.merged_names = []
        else:
            self._load_adapter_version(weights)
        self.version, self.loaded_at = newest, time.monotonic()
        log.debug("switched to policy version %d", newest)

    def _load_adapter_version(self, weights: Any) -> None:
        if not hasattr(self.backend, "load_state"):
            raise self._adapter_needs_hf(weights.version)
        self.backend.load_state(weights.state, weights.version)
        self.merged_names = list(weights.state)
        log.info("policy version %d: %s, merged", weights.version, weights.adapter.describe())

    @staticmethod
    def _adapter_needs_hf(version: int) -> ConfigError:
        return ConfigError(f"version {version} is a LoRA adapter version (learner --publish-adapter): it needs "
                           f"--backend hf (vLLM's LoRA loading is not wired)")

    def too_stale(self) -> bool:
        """True when the learner (per its heartbeat) is more than max_staleness versions past ours."""
        learner = self.swarm.learner_version()
        limit = self.info.max_staleness if self.info is not None else 0
        return bool(limit) and learner is not None and self.version is not None and learner - self.version > limit

    def wait_for_room(self) -> None:
        """Back-pressure: a learner that trains slower than the swarm samples answers "busy"; generating more
        meanwhile would only produce stale rollouts."""
        while len(self.swarm.outbox) >= self.cfg.max_pending and not self.stop.requested:
            down = self.swarm.unreachable_for()
            if down is not None:  # e.g. the learner is restarting: say so while this sampler holds back
                self.status.update(f"learner unreachable since {down:.0f} s, retrying")
            time.sleep(0.1)

    def step(self) -> int:
        """Generate one batch of groups and hand them to the outbox; returns how many were sent."""
        assert self.info is not None and self.version is not None
        self.wait_for_room()
        self.maybe_switch()
        if self.too_stale():
            time.sleep(0.2)  # the learner would drop what this version makes: wait for a newer one instead
            return 0
        n_prompts = len(self.info.prompts)
        seqs = self.seqs.take(self.cfg.batch_prompts)
        indices = [assign_prompt_index(self.swarm.identity.public_key, s, n_prompts) for s in seqs]
        prompts = [format_prompt(self.tokenizer, self.info.prompts[i], self.info.system_prompt) for i in indices]
        params = self.info.sampling_params(seed=self.cfg.seed * 1_000_003 + seqs[0])
        started = time.time()
        groups = self.backend.generate(prompts, params)
        finished = time.time()
        sampling = wire.SamplingParams(temperature=params.temperature, top_p=params.top_p,
                                       top_k=params.top_k if params.top_k > 0 else -1,
                                       max_tokens=params.max_new_tokens)
        for seq, index, gen in zip(seqs, indices, groups):
            group = wire.RolloutGroup.from_completions(
                run_id=self.info.run_id, seq=seq, policy_version=self.version, prompt_index=index,
                prompt_ids=gen.prompt_ids, completions=gen.completion_ids, logprobs=gen.logprobs, sampling=sampling,
                started_at=started, finished_at=finished,
            )
            self.swarm.submit(wire.encode_group(group, self.swarm.identity), timeout=self.cfg.max_outbox_wait)
        self.sent += len(groups)
        self.tokens += sum(g.num_tokens for g in groups)
        self.swarm.report(version=self.version, tokens=self.tokens)  # for the status record (node.monitor)
        return len(groups)

    def run(self) -> None:
        self.start()
        while (not self.cfg.max_groups or self.sent < self.cfg.max_groups) and not self.stop.requested:
            self.step()
            s = self.swarm.stats()
            learner_v = s.get("learner_version")
            lag = (learner_v - self.version) if learner_v is not None else 0
            down = self.swarm.unreachable_for()
            self.status.update(
                (f"learner unreachable since {down:.0f} s, retrying; " if down is not None else "") +
                f"v{self.version} (learner v{learner_v}, lag {lag}) sent {self.sent} accepted {s.get('accepted', 0)}"
                f" rejected {sum(s.get('rejections', {}).values())} outbox {s.get('outbox', 0)}"
                f" down {s.get('bytes_down', 0) >> 20} MB up {s.get('bytes_uploaded', 0) >> 20} MB"
            )
        # Let the outbox drain before leaving, bounded (what stays is persisted and sent on the next start).
        deadline = time.monotonic() + (2 if self.stop.requested else 30)
        while self.swarm.stats().get("outbox", 0) and time.monotonic() < deadline:
            time.sleep(0.2)

    def close(self) -> None:
        self.status.close()
        try:  # what this sampler did, for `make demo`'s summary and for the volunteer
            stats = {**self.swarm.stats(), "policy_version": self.version, "sent": self.sent,
                     "public_key": self.swarm.public_key_str}
            if self.merged_names:  # which weights an adapter version gave the model (node/adapters.py)
                from node.adapters import state_digest

                held = self.backend.model.state_dict()
                stats["merged_digest"] = state_digest({n: held[n] for n in self.merged_names})
            (self.state_dir / "stats.json").write_text(json.dumps(stats, default=str, indent=1))
        except Exception as exc:  # noqa: BLE001 - never let reporting break shutdown
            log.debug("could not write stats.json: %r", exc)
        self.swarm.shutdown()


def main(argv: list[str] | None = None) -> int:
    """Exit status: node/errors.py (0 done, 2 usage, 3 no learner reachable, 4 not the trusted learner, 130
    interrupted)."""
    from node.config import SwarmConfig

    args = parse_with_recipe(build_parser(), argv)
    try:  # every flag is checked before torch or the swarm load
        cfg = dataclass_from_args(SamplerConfig, args)
        swarm_cfg = SwarmConfig.from_args(args)
        check_swarm_args(swarm_cfg.peers, swarm_cfg.host_maddrs, swarm_cfg.announce_maddrs, swarm_cfg.learner_key,
                         need_peers=True)
    except ValueError as exc:  # ConfigError is a ValueError
        return fail(exc, EXIT_USAGE)
    setup_process(args)
    quiet_transformers()
    stop = GracefulStop().install()
    if swarm_cfg.state_dir is None:
        home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        swarm_cfg = swarm_cfg.replace(state_dir=str(home / "gepo-swarm" / f"sampler-{swarm_cfg.run_id}"))
    swarm_cfg = swarm_cfg.with_defaults_for_state_dir()
    try:
        sampler = Sampler(cfg, swarm_cfg, stop=stop)
    except ValueError as exc:
        return fail(exc, EXIT_USAGE)
    try:
        sampler.run()
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except (ConfigError, TimeoutError, BootstrapError, TrustError, ModelLoadError) as exc:
        return fail(exc)  # ModelLoadError here: a published version that does not load (exit 1)
    finally:
        sampler.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
