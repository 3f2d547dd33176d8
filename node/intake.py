"""What the learner does about lying samplers: bounds on claimed log-probs, spot-checks, bans and their records.

    checked at every step (gepo/plausibility.py, inside train_step):
        the learner's own log-probs against the claimed ones; a group beyond the bounds is dropped and its sampler
        banned (reason implausible_logprobs)
    spot-checked (node/verify.py, a background thread):
        every group of a sampler's first --verify-first groups, and an unpredictable --verify-fraction of the rest:
        log-probs recomputed with the claimed version, and every token checked possible under the run's
        temperature / top-k / top-p; a failure bans the sampler (reason logprob_mismatch or impossible_token)
    a ban:
        persisted in <run_dir>/banned.jsonl (one line per banned sampler: reason, detail, time, and the groups of
        it already trained: seq, policy version, learner step), read back at start; the sampler's groups are
        refused at intake (Reason.BANNED) and its queued ones dropped
    counted:
        `Intake.counts`, merged into the learner's `rejections` (metrics.jsonl) and into the heartbeat's
        `rejected` counter (node.monitor): ban_<reason>, dropped_banned, implausible_logprobs, train_error,
        scoring_failed, verified, verify_unavailable, verify_busy

Everything in this module is cheap bookkeeping; torch is only imported where the verifier starts.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gepo.plausibility import MAX_MEAN_GAP, MAX_TOKEN_GAP, SPOT_MEAN_TOLERANCE, SPOT_TOKEN_TOLERANCE
from node.cli import option

log = logging.getLogger("node.intake")

BANS_FILE = "banned.jsonl"
TRAINED_FILE = "trained_groups.jsonl"


@dataclass
class IntakeConfig:
    max_mean_logprob_gap: float = option(
        MAX_MEAN_GAP, "drop a group (and ban its sampler) when a completion's mean |log p - log q| over its tokens, "
                      "learner vs claimed, exceeds this (nats; honest staleness stays below it, see docs/PROTOCOL.md)")
    max_token_logprob_gap: float = option(
        MAX_TOKEN_GAP, "... or when one token's |log p - log q| exceeds this (nats)")
    max_group_weight: float = option(
        4.0, "swarm mode: dual-clip delta applied when --delta is not given: no row's importance weight counts "
             "above it, so no group can dominate a step's gradient")
    verify_fraction: float = option(0.05, "share of accepted groups spot-checked against their claimed version "
                                          "(drawn unpredictably; 0: only --verify-first)")
    verify_first: int = option(4, "spot-check every one of a sampler's first N groups")
    verify_cache_versions: int = option(8, "recent versions' weights kept in CPU RAM for spot-checks (older claimed "
                                           "versions cannot be checked)")
    verify_token_tolerance: float = option(SPOT_TOKEN_TOLERANCE,
                                           "spot-check: largest |claimed - recomputed| log-prob of one token")
    verify_mean_tolerance: float = option(SPOT_MEAN_TOLERANCE,
                                          "spot-check: largest mean |claimed - recomputed| of a completion")
    verify_queue: int = option(256, "spot-checks waiting at most (beyond: skipped, counted verify_busy)")


def _key(sampler: bytes | str) -> str:
    return sampler if isinstance(sampler, str) else sampler.hex()


class BanBook:
    """Banned samplers, persisted as one JSON line each in <run_dir>/banned.jsonl."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / BANS_FILE
        self.bans: dict[str, dict] = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                    self.bans[rec["sampler"]] = rec
                except (ValueError, KeyError, TypeError):
                    log.warning("ignoring a malformed line in %s", self.path)

    def __contains__(self, sampler: bytes | str) -> bool:
        return _key(sampler) in self.bans

    def reasons(self) -> Counter:
        return Counter(f"ban_{r['reason']}" for r in self.bans.values())

    def add(self, sampler: bytes | str, reason: str, detail: str, trained: list[dict]) -> dict:
        rec = {"sampler": _key(sampler), "reason": reason, "detail": detail, "time": time.time(),
               "trained_groups": trained}
        self.bans[rec["sampler"]] = rec
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        return rec


class Intake:
    """The learner's side of the checks: which groups to spot-check, verdicts, bans, the trained-groups ledger."""

    def __init__(self, cfg: IntakeConfig, run_dir: str | Path, *, track_samplers: int = 65536) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.bans = BanBook(self.run_dir)
        self.counts: Counter = Counter()
        self._rng = random.SystemRandom()  # unpredictable to samplers: no seed they could learn
        self._seen: OrderedDict[str, int] = OrderedDict()  # groups accepted per sampler (bounded LRU)
        self._track = track_samplers
        self.verifier: Any = None
        self.newly_banned: list[str] = []

    # ---- wiring
    def start_verifier(self, model: Any, temperature: float, top_k: int, top_p: float, pad_token_id: int) -> None:
        from gepo.spot_check import SpotCheckConfig
        from node.verify import SamplingRules, VersionCache, Verifier

        check = SpotCheckConfig(token_tolerance=self.cfg.verify_token_tolerance,
                                mean_tolerance=self.cfg.verify_mean_tolerance)
        self.verifier = Verifier(model, VersionCache(self.cfg.verify_cache_versions),
                                 SamplingRules(temperature, top_k, top_p), check, pad_token_id=pad_token_id,
                                 max_queue=self.cfg.verify_queue)

    def published(self, version: int, model: Any) -> None:
        if self.verifier is not None:
            self.verifier.cache.add(version, model)

    def close(self) -> None:
        if self.verifier is not None:
            self.verifier.close()

    # ---- intake
    def is_banned(self, sampler: bytes | str) -> bool:
        return sampler in self.bans

    def drop_if_banned(self, sampler: bytes | str) -> bool:
        if sampler in self.bans:
            self.counts["dropped_banned"] += 1
            return True
        return False

    def accepted(self, group: Any) -> None:
        """A group passed intake and was scored: maybe spot-check it (a sampler's first N always)."""
        key = _key(group.sampler)
        n = self._seen.pop(key, 0)
        self._seen[key] = n + 1
        if len(self._seen) > self._track:
            self._seen.popitem(last=False)
        if self.verifier is None or not (n < self.cfg.verify_first or self._rng.random() < self.cfg.verify_fraction):
            return
        from node.verify import VerifyJob

        if group.policy_version not in self.verifier.cache:
            self.counts["verify_unavailable"] += 1
            return
        job = VerifyJob(group.sampler, group.seq, group.policy_version, group.prompt_ids.tolist(),
                        [c.tolist() for c in group.completions()], [lp.tolist() for lp in group.completion_logprobs()])
        if not self.verifier.submit(job):
            self.counts["verify_busy"] += 1

    def poll(self) -> list[str]:
        """Collect verdicts; ban who failed. Returns the keys (hex) banned since the last poll."""
        from node.verify import UNAVAILABLE

        if self.verifier is not None:
            for v in self.verifier.verdicts():
                if v.result.reason == UNAVAILABLE:
                    self.counts["verify_unavailable"] += 1
                elif v.result.ok:
                    self.counts["verified"] += 1
                else:
                    self.ban(v.job.sampler, v.result.reason, f"group #{v.job.seq} (v{v.job.version}): "
                                                             f"{v.result.detail}")
        out, self.newly_banned = self.newly_banned, []
        return out

    # ---- after a step
    def after_step(self, step: int, version: int, groups: list, rejected: dict[int, str],
                   details: dict[int, str]) -> None:
        """Count what train_step dropped, ban senders of implausible log-probs, append the trained-groups ledger."""
        from gepo.plausibility import IMPLAUSIBLE

        trained, liars = [], []
        for i, g in enumerate(groups):
            if i in rejected:
                self.counts[rejected[i]] += 1
                if rejected[i] == IMPLAUSIBLE and g.tag is not None:
                    liars.append((g.tag[0], f"group #{g.tag[1]} (v{g.policy_version}): {details.get(i, '')}"))
            elif g.tag is not None:
                trained.append([g.tag[0], g.tag[1], g.policy_version])
        with open(self.run_dir / TRAINED_FILE, "a") as f:
            f.write(json.dumps({"step": step, "version": version, "groups": trained}) + "\n")
        for key, detail in liars:  # after the ledger line, so that the record lists this step's groups too
            self.ban(key, IMPLAUSIBLE, detail)

    def trained_groups_of(self, key: str) -> list[dict]:
        path = self.run_dir / TRAINED_FILE
        out: list[dict] = []
        if not path.is_file():
            return out
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                out += [{"seq": s, "policy_version": v, "step": rec["step"]} for k, s, v in rec["groups"] if k == key]
        return out

    def ban(self, sampler: bytes | str, reason: str, detail: str) -> None:
        key = _key(sampler)
        if key in self.bans:
            return
        rec = self.bans.add(key, reason, detail, self.trained_groups_of(key))
        self.counts[f"ban_{reason}"] += 1
        self.newly_banned.append(key)
        log.warning("banned sampler %s: %s: %s (%d of its groups were already trained; listed in %s)", key[:16],
                    reason, detail, len(rec["trained_groups"]), self.bans.path)

    def rejections(self) -> dict[str, int]:
        """Groups refused or dropped by these checks, and bans by reason (persisted bans included)."""
        out = Counter({k: v for k, v in self.counts.items() if k not in _NOT_REJECTIONS})
        for k, v in self.bans.reasons().items():
            out[k] = max(out[k], v)
        return dict(out)

    def checks(self) -> dict[str, int]:
        """Spot-check bookkeeping: verified, verify_unavailable, verify_busy, and the verifier's busy seconds."""
        out = {k: v for k, v in self.counts.items() if k in _NOT_REJECTIONS}
        if self.verifier is not None:
            out["verify_busy_s"] = round(self.verifier.busy_s, 3)
        return out

    def rejected_total(self) -> int:
        return sum(v for k, v in self.rejections().items() if not k.startswith("ban_"))


_NOT_REJECTIONS = frozenset({"verified", "verify_unavailable", "verify_busy"})
