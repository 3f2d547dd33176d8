"""`python -m tests.swarm_helpers.liar MODE <node.sampler args>`: the real sampler program, lying in one way.

Everything is the real `node.sampler` (its own key, signatures, network, weights from the swarm); only what its
backend returns from generation is altered before the group is signed:

    empty         the last completion of every group has 0 tokens (passes the wire format; intake refuses it)
    slack         a near-certain token's log-prob reported as +5e-5 (inside the one tolerance: accepted, trained)
    minus41       every log-prob is -41
    shift         every log-prob lowered by 0.5 (inside the plausibility bounds: the spot-check's job)
    scale         every log-prob times 3, minus 0.4
    other_model   completions and log-probs of another model: the same architecture, differently seeded
"""

from __future__ import annotations

import sys

import torch

import node.sampler as sampler_program
from gepo.sampling import GeneratedGroup, generate_groups

MODES = ("empty", "slack", "minus41", "shift", "scale", "other_model")


def _lie_logprobs(gen: GeneratedGroup, how) -> GeneratedGroup:
    gen.logprobs = [[min(0.0, how(x)) for x in row] for row in gen.logprobs]
    return gen


def install(mode: str) -> None:
    honest = sampler_program.HFBackend.generate
    other: dict = {}

    def generate(self, prompts, params):
        if mode == "other_model":
            if "model" not in other:
                from transformers import AutoModelForCausalLM

                torch.manual_seed(12345)
                other["model"] = AutoModelForCausalLM.from_config(self.model.config).eval()
            with torch.no_grad():
                return generate_groups(other["model"], prompts, params, eos=self.tokenizer,
                                       pad_token_id=self.tokenizer.pad_token_id)
        groups = honest(self, prompts, params)
        for gen in groups:
            if mode == "empty":
                gen.completion_ids[-1], gen.logprobs[-1] = [], []
            elif mode == "slack":  # a (near-)certain token reported a hair above 0, as rounding in an engine does
                row = gen.logprobs[0]
                t = max(range(len(row)), key=lambda i: row[i])
                if row[t] > -5e-5:
                    row[t] = 5e-5
            elif mode == "minus41":
                _lie_logprobs(gen, lambda x: -41.0)
            elif mode == "shift":
                _lie_logprobs(gen, lambda x: x - 0.5)
            elif mode == "scale":
                _lie_logprobs(gen, lambda x: 3 * x - 0.4)
        return groups

    sampler_program.HFBackend.generate = generate


def main() -> int:
    mode, argv = sys.argv[1], sys.argv[2:]
    if mode not in MODES:
        print(f"error: mode must be one of {', '.join(MODES)}", file=sys.stderr)
        return 2
    install(mode)
    return sampler_program.main(argv)


if __name__ == "__main__":
    sys.exit(main())
