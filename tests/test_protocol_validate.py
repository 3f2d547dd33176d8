"""RolloutValidator: every reason code it produces, counting, the bounded replay window."""

from __future__ import annotations

import hashlib
import threading

import numpy as np
import pytest

from protocol.errors import ProtocolError, Reason
from protocol.rollout import encode_group
from protocol.validate import PromptTable, ReplayWindow, RolloutValidator, ValidatorConfig
from tests.test_protocol_util import OTHER, RUN, SAMPLER, VOCAB, make_group, resign_group, signed_group, split_group


def make_validator(current=5, **kw):
    state = {"v": current}
    prompts = {3: make_group().prompt_ids}  # make_group's default prompt lives at index 3
    table = PromptTable(hashes=[hashlib.sha256(prompts[3].tobytes()).digest() if i == 3 else b"" for i in range(10)])
    cfg = ValidatorConfig(run_id=RUN, vocab_size=VOCAB, max_completion_tokens=512, **kw)
    v = RolloutValidator(cfg, current_version=lambda: state["v"], prompt_check=table)
    return v, state


def reason(v, data) -> Reason:
    with pytest.raises(ProtocolError) as ei:
        v.validate(data)
    return ei.value.reason


def test_accepts_valid_group():
    v, _ = make_validator()
    g = v.validate(signed_group(seq=1))
    assert g.sampler == SAMPLER.public_key and g.seq == 1
    assert v.counts() == {"accepted": 1}


def test_reason_codes():
    v, state = make_validator(max_staleness=2, group_size=8)
    base = make_group(seq=100)
    assert reason(v, signed_group(seq=1, run_id="other-run")) == Reason.WRONG_RUN
    assert reason(v, signed_group(seq=2, policy_version=6)) == Reason.FUTURE_VERSION
    assert reason(v, signed_group(seq=3, policy_version=2)) == Reason.STALE
    assert v.validate(signed_group(seq=4, policy_version=3)).policy_version == 3  # exactly max_staleness old
    assert reason(v, signed_group(seq=5, G=4)) == Reason.SHAPE_MISMATCH
    assert reason(v, signed_group(seq=6, prompt_index=4)) == Reason.PROMPT_MISMATCH
    assert reason(v, signed_group(seq=7, prompt_index=10**6)) == Reason.PROMPT_MISMATCH  # outside the dataset

    def with_arrays(seq, **arrays):
        g = make_group(seq=seq)
        for k, a in arrays.items():
            getattr(g, k)[:] = a
        return encode_group(g, SAMPLER)

    ids = base.completion_ids.copy()
    ids[5] = VOCAB
    assert reason(v, with_arrays(8, completion_ids=ids)) == Reason.TOKEN_OUT_OF_VOCAB
    ids[5] = -1
    assert reason(v, with_arrays(9, completion_ids=ids)) == Reason.TOKEN_OUT_OF_VOCAB
    # out-of-vocab prompt token: prompt reference check would also fail, vocab is checked first
    p = base.prompt_ids.copy()
    p[0] = 2**31 - 1
    assert reason(v, with_arrays(10, prompt_ids=p)) == Reason.TOKEN_OUT_OF_VOCAB
    for bad in (np.nan, np.inf, -np.inf, 0.5):
        lp = base.logprobs.copy()
        lp[7] = bad
        assert reason(v, with_arrays(11, logprobs=lp)) == Reason.BAD_LOGPROBS
    # exactly 0.0 is a valid log-prob
    lp = base.logprobs.copy()
    lp[:] = 0.0
    assert v.validate(with_arrays(12, logprobs=lp)).seq == 12

    data = signed_group(seq=13)
    assert v.validate(data).seq == 13
    assert reason(v, data) == Reason.REPLAY
    assert reason(v, data[:-1] + bytes([data[-1] ^ 1])) == Reason.HASH_MISMATCH
    # another sampler may copy the content, but only under its own key and its own replay state
    assert v.validate(resign_group(data, OTHER)).sampler == OTHER.public_key
    tampered = bytearray(data)
    tampered[60] ^= 1
    assert reason(v, bytes(tampered)) == Reason.BAD_SIGNATURE
    assert reason(v, b"garbage") == Reason.MALFORMED
    assert reason(v, b"GSR\x09" + bytes(200)) == Reason.UNKNOWN_VERSION
    counts = v.counts()
    assert counts["accepted"] == 4
    assert counts["bad_logprobs"] == 4 and counts["replay"] == 1 and counts["token_out_of_vocab"] == 3
    assert sum(counts.values()) == sum(v.rejections.values()) + v.accepted


def test_rejected_message_does_not_burn_sequence_number():
    v, state = make_validator()
    assert reason(v, signed_group(seq=1, policy_version=6)) == Reason.FUTURE_VERSION
    state["v"] = 6
    assert v.validate(signed_group(seq=1, policy_version=6)).seq == 1


def test_allow_list_checked_before_signature():
    v, _ = make_validator(allowed_samplers=[OTHER.public_key])
    assert reason(v, signed_group(seq=1)) == Reason.UNTRUSTED_SIGNER
    # even a message with a broken signature is reported as untrusted (no verification cost is paid)
    data = bytearray(signed_group(seq=2))
    data[60] ^= 1
    assert reason(v, bytes(data)) == Reason.UNTRUSTED_SIGNER
    assert v.validate(signed_group(OTHER, seq=1)).sampler == OTHER.public_key


def test_oversize_by_config():
    v, _ = make_validator()
    v2 = RolloutValidator(ValidatorConfig(run_id=RUN, vocab_size=VOCAB, max_group_size=4), current_version=lambda: 5)
    assert reason(v2, signed_group(seq=1)) == Reason.OVERSIZE
    v3 = RolloutValidator(ValidatorConfig(run_id=RUN, vocab_size=VOCAB, max_prompt_tokens=64), current_version=lambda: 5)
    assert reason(v3, signed_group(seq=1)) == Reason.OVERSIZE


def test_replay_window_semantics():
    w = ReplayWindow(window=8, max_samplers=2)
    a, b, c = b"a" * 32, b"b" * 32, b"c" * 32
    for s in (5, 3, 10, 4, 9):
        w.record(a, s)
    for s in (5, 3, 10, 4, 9):
        with pytest.raises(ProtocolError) as ei:
            w.record(a, s)
        assert ei.value.reason == Reason.REPLAY
    with pytest.raises(ProtocolError):
        w.record(a, 2)  # 10 - 2 >= window: too old
    w.record(a, 6)  # inside the window, unseen
    w.record(a, 1000)  # big jump resets the mask
    with pytest.raises(ProtocolError):
        w.record(a, 10)
    w.record(a, 999)
    # per-sampler state
    w.record(b, 5)
    # bounded number of samplers: LRU eviction
    w.record(c, 1)
    assert len(w) == 2 and w.evicted == 1


def test_replay_state_is_bounded():
    w = ReplayWindow(window=64, max_samplers=100)
    for i in range(1000):
        w.record(i.to_bytes(32, "little"), i)
    assert len(w) == 100
    # huge sequence numbers do not blow up the bitmask
    k = b"k" * 32
    w.record(k, 0)
    w.record(k, 2**63 - 1)
    assert w._state[k][1] == 1


def test_thread_safety_no_double_accept():
    v, _ = make_validator()
    data = signed_group(seq=42)
    results = []

    def worker():
        try:
            v.validate(data)
            results.append("ok")
        except ProtocolError as e:
            results.append(e.reason)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("ok") == 1 and results.count(Reason.REPLAY) == 7


def test_prompt_table_and_exceptions_from_callback():
    g = make_group()
    table = PromptTable([np.zeros(3, np.int32)] * 3 + [g.prompt_ids])
    assert table(3, g.prompt_hash) and not table(2, g.prompt_hash) and not table(-1, g.prompt_hash)

    def lookup(i, h):
        return {3: g.prompt_hash}[i] == h  # raises KeyError for unknown indices

    v = RolloutValidator(ValidatorConfig(run_id=RUN, vocab_size=VOCAB), current_version=lambda: 5, prompt_check=lookup)
    assert v.validate(signed_group(seq=1)).seq == 1
    assert reason(v, signed_group(seq=2, prompt_index=7)) == Reason.PROMPT_MISMATCH


def test_header_prompt_hash_must_match_prompt_ids():
    """A sampler cannot claim a dataset prompt while sending other prompt tokens."""
    data = signed_group(seq=1)
    header, payload = split_group(data)
    other_prompt = make_group(seed=9).prompt_ids
    v, _ = make_validator()
    forged = resign_group(data, prompt_hash=hashlib.sha256(other_prompt.tobytes()).digest())
    assert reason(v, forged) == Reason.PROMPT_MISMATCH
