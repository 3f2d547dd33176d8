"""gepo.rewards: answer forms, the fast path against math-verify, hostile input within its bound, the timeout path,
threads, and the format reward. Uses the real math-verify in real worker processes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gepo.rewards import (
    RewardConfig,
    RewardResult,
    RewardScorer,
    RewardWorkerError,
    accuracy_reward,
    answer_region,
    format_reward,
    score_completions,
)
from tests.paths import GSM8K_TRAIN

TIMEOUT_S = 1.0  # short, so the tests that wait for a timeout stay fast
SLACK_S = 3.0  # respawn, pipes, a busy CI machine
POW_TOWER = "$9^{9^{9^9}}$"  # C-level big-integer power: no signal interrupts it, only killing the process does


@pytest.fixture(scope="module")
def scorer():
    """Default config: for verdicts, with the default timeout's margin for a busy machine."""
    with RewardScorer() as s:
        s.warm_up()
        yield s


@pytest.fixture(scope="module")
def tight():
    """A short timeout, for the tests that wait on one."""
    with RewardScorer(RewardConfig(timeout_s=TIMEOUT_S)) as s:
        s.warm_up()
        yield s


# (completion, gold, expected accuracy)
ANSWER_FORMS = [
    ("42", "42", 1.0),
    ("The answer is 42.", "42", 1.0),
    ("so we get 40, then add 2 to get 42", "42", 1.0),
    ("\\boxed{42}", "42", 1.0),
    ("First 41... no. Final: \\boxed{42}. Checking: 42 - 1 = 41", "42", 1.0),  # boxed beats a later plain number
    ("<think>maybe 41</think><answer>42</answer>", "42", 1.0),
    ("<think>\\boxed{41}</think><answer>42</answer>", "42", 1.0),  # the answer block beats a boxed in the thinking
    ("<think>It is 41.</think> The answer is 42", "42", 1.0),  # no answer block: text after </think>
    ("<think>42</think>", "42", 0.0),  # closed thinking with nothing after: no answer
    ("<think>x</think><answer>42", "42", 1.0),  # truncated answer block still counts
    ("Janet pays 18 dollars.\n#### 18", "#### 18", 1.0),
    ("She sold 72 clips.", "Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", 1.0),  # raw GSM8K gold
    ("The total is 1,000 dollars.", "1000", 1.0),
    ("\\boxed{1,080}", "#### 1,080", 1.0),
    ("It costs $18.", "18", 1.0),
    ("It costs \\$18.", "18", 1.0),
    ("$18.00", "18", 1.0),
    ("\\boxed{-5}", "-5", 1.0),
    ("The temperature is \u22125 degrees", "-5", 1.0),  # unicode minus
    ("\uff14\uff12", "42", 1.0),  # full-width digits
    ("\\boxed{5}", "-5", 0.0),
    ("3.50", "3.5", 1.0),
    ("0.5", "\\frac{1}{2}", 1.0),
    ("\\frac{1}{2}", "0.5", 1.0),
    ("1/2", "0.5", 1.0),
    ("<answer>\\dfrac{3}{4}</answer>", "0.75", 1.0),  # bare LaTeX in the answer block
    ("$\\frac{2}{4}$", "\\frac{1}{2}", 1.0),
    ("<answer>2\\sqrt{2}</answer>", "\\sqrt{8}", 1.0),
    ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}", 1.0),
    ("\\boxed{\\sqrt{2}}", "2\\sqrt{2}", 0.0),
    ("10%", "10", 1.0),  # math-verify: a percentage matches its number ...
    ("\\boxed{10\\%}", "0.1", 1.0),  # ... and its fraction
    ("0.1", "10", 0.0),  # but not the other way round
    ("0.333333", "\\frac{1}{3}", 1.0),  # floats compare to 6 decimals
    ("0.33", "\\frac{1}{3}", 0.0),
    ("x = 5", "5", 1.0),
    ("23 + 45 = 68", "68", 1.0),
    ("23 + 45", "68", 0.0),  # copying the question is not an answer (literal_answers)
    ("\\boxed{2 \\cdot 34}", "68", 0.0),
    ("\\boxed{1} and \\boxed{42}", "42", 0.0),  # two answers are a set, not 42
    ("\\boxed{1, 2, 3, 42}", "42", 0.0),
    ("", "42", 0.0),
    ("no idea", "42", 0.0),
    ("\\boxed{}", "42", 0.0),
    ("\\boxed{42", "42", 0.0),  # unbalanced
    ("123456789012345678", "123456789012345679", 0.0),  # big integers compare exactly
]


@pytest.mark.parametrize(("completion", "gold", "expected"), ANSWER_FORMS)
def test_answer_forms(scorer, completion, gold, expected):
    (result,) = scorer.score([completion], [gold])
    assert result.accuracy == expected, (completion, gold)
    assert not result.timed_out


def test_literal_answers_can_be_turned_off():
    with RewardScorer(RewardConfig(literal_answers=False, num_workers=1)) as s:
        assert s.score(["23 + 45"], ["68"])[0].accuracy == 1.0  # math-verify's own verdict


def test_answer_region_order_and_cap():
    assert answer_region("<think>a</think><answer> 7 </answer>") == " 7 "
    assert answer_region("<answer>1</answer> text <answer>2</answer>") == "2"  # the last complete block
    assert answer_region("<think>a</think> b") == " b"
    assert answer_region("plain 3") == "plain 3"
    assert answer_region("x" * 5000 + "42", max_chars=10) == "xxxxxxxx42"


def test_fast_path_agrees_with_math_verify():
    """Every pair the fast path decides gets the same verdict from math-verify itself (run here, in-process)."""
    from gepo.rewards import _check, _fast_accuracy, _prepare_answer, _prepare_gold

    rng = random.Random(0)

    def number() -> str:
        kind = rng.randrange(7)
        if kind == 0:
            return str(rng.randint(-1000, 1000))
        if kind == 1:
            return str(rng.randint(-(10**15) + 1, 10**15 - 1))
        if kind == 2:
            return f"{rng.uniform(-1000, 1000):.{rng.randint(1, 6)}f}"
        if kind == 3:
            return "0" * rng.randint(1, 3) + str(rng.randint(0, 99))  # leading zeros
        if kind == 4:
            return rng.choice(["0", "-0", "0.0", "-0.0", "0.000001", "1.000000", "999999999999999", "-00.50"])
        if kind == 5:  # decimals of up to 15 digits, the fast path's limit
            digits = rng.randint(1, 6)
            whole = rng.randint(0, 10 ** rng.randint(0, 15 - digits) - 1)
            return f"{whole}.{rng.randint(0, 10**digits - 1):0{digits}d}"
        whole, digits = rng.randint(0, 10**15 - 1), rng.randint(1, 6)  # too long: must fall back to math-verify
        return f"{whole}.{rng.randint(0, 10**digits - 1):0{digits}d}"

    decided = 0
    for _ in range(1500):
        gold = number()
        variants = [gold, number(), gold + "0" if "." in gold else gold + ".0", gold.lstrip("-"), "-" + gold]
        variants.append(gold.rstrip("0") if "." in gold else gold)
        answer = rng.choice(variants)
        if rng.random() < 0.3:
            answer = f"\\boxed{{{answer}}}"
        a, g = _prepare_answer(answer, 1000), _prepare_gold(gold, 1000)
        fast = _fast_accuracy(a, g)
        if fast is None:
            continue
        decided += 1
        assert fast == _check(a, g, True)[0], (answer, gold)
    assert decided > 800


def test_fast_path_and_pool_give_identical_results(scorer):
    completions = ["42", "\\boxed{42}", "41", " 42.0 ", "-42", "0042"]
    with RewardScorer(RewardConfig(fast_path=False, num_workers=1)) as slow:
        assert scorer.score(completions, ["42"] * 6) == slow.score(completions, ["42"] * 6)
        assert slow.stats.fast_path == 0


HOSTILE = {
    "10 MB of digits": "7" * 10_000_000,
    "10 MB of tags": "<answer>" * 1_000_000 + "</answer>" * 100_000,
    "10 MB of junk": "".join(chr(c) for c in random.Random(1).choices(range(0x80, 0x30000), k=200_000)) * 50,
    "braces 10k deep": "{" * 10_000 + "42" + "}" * 10_000,
    "boxed braces 10k deep": "\\boxed{" + "{" * 10_000 + "42" + "}" * 10_000 + "}",
    "frac 10k deep": "$" + "\\frac{" * 10_000 + "1" + "}{2}" * 10_000 + "$",
    "frac 30 deep (under the cap)": "$" + "\\frac{" * 30 + "1" + "}{2}" * 30 + "$",
    "boxed braces 300 deep (under the cap)": "\\boxed{" + "{" * 300 + "42" + "}" * 300 + "}",
    "sqrt 10k deep in answer": "<answer>" + "\\sqrt{" * 10_000 + "2" + "}" * 10_000 + "</answer>",
    "power tower": POW_TOWER,
    "power tower boxed": "\\boxed{9^{9^{9^9}}}",
    "power tower plain": "9^9^9^9",
    "lone surrogates and NUL": "\ud800\udfff\x00" * 1000 + "42\ud800",
    "control characters": "".join(chr(i) for i in range(32)) * 100,
    "dollars": "$" * 100_000,
    "backslashes": "\\" * 100_001,
    "empty": "",
    "whitespace": " \n\t" * 1000,
}


@pytest.mark.parametrize("name", list(HOSTILE))
@pytest.mark.parametrize("gold", ["42", "\\sqrt{2}"])
def test_hostile_answers_are_bounded(tight, name, gold):
    # A symbolic gold ("\sqrt{2}") reaches math-verify's verify, where the power tower runs for ever.
    completion = HOSTILE[name]
    start = time.monotonic()
    (result,) = tight.score([completion], [gold])
    elapsed = time.monotonic() - start
    assert result.accuracy == 0.0
    assert elapsed < TIMEOUT_S + SLACK_S, f"{name}: {elapsed:.2f} s"


def test_timeout_kills_the_stuck_worker_and_the_scorer_keeps_working():
    with RewardScorer(RewardConfig(timeout_s=TIMEOUT_S, num_workers=1)) as s:
        s.warm_up()
        (stuck_worker,) = s._workers
        start = time.monotonic()
        results = s.score(["\\boxed{2\\sqrt{2}}", POW_TOWER, "\\sqrt{8}"], ["\\sqrt{8}", "\\sqrt{2}", "2\\sqrt{2}"])
        elapsed = time.monotonic() - start
        assert [r.accuracy for r in results] == [1.0, 0.0, 1.0]
        assert [r.timed_out for r in results] == [False, True, False]
        assert elapsed < TIMEOUT_S + SLACK_S
        assert not stuck_worker.process.is_alive()  # killed, not left burning a core
        assert s.stats.timeouts == 1 and s.stats.respawns == 1
        (fresh,) = s._workers
        assert fresh is not stuck_worker and fresh.process.is_alive()
        assert s.score(["\\frac{1}{2}"], ["0.5"])[0].accuracy == 1.0


def test_a_worker_killed_from_outside_is_replaced():
    with RewardScorer(RewardConfig(num_workers=1)) as s:
        s.warm_up()
        (worker,) = s._workers
        os.kill(worker.process.pid, signal.SIGKILL)
        worker.process.join(5)
        assert s.score(["1/2", "\\frac{1}{3}"], ["0.5", "0.5"]) == [
            RewardResult(1.0, 0.0, 1.0),
            RewardResult(0.0, 0.0, 0.0),
        ]
        assert s.stats.respawns == 1


def test_orphaned_worker_is_stopped_by_its_cpu_limit():
    """A worker whose parent was SIGKILLed mid-check has no one to kill it; the kernel does (SIGXCPU)."""
    code = "from gepo.rewards import _cpu_bound_next_check as f; f(0.5)\nwhile True: pass"
    proc = subprocess.run([sys.executable, "-c", code], timeout=60, cwd=Path(__file__).parents[1])
    assert proc.returncode == -signal.SIGXCPU


def test_a_worker_that_cannot_start_is_an_error_not_a_zero():
    with RewardScorer(RewardConfig(startup_timeout_s=0.001, num_workers=1)) as s:
        with pytest.raises(RewardWorkerError, match="did not start"):
            s.score(["1/2"], ["0.5"])
        assert len(s._workers) == 1  # replaced, so a later call tries again
    with pytest.raises(RewardWorkerError, match="closed"):
        s.score(["1/2"], ["0.5"])


# Run in a child process: it stops that process's own fork server, which every scorer of the process shares.
_STOPPED_FORK_SERVER = """
import dataclasses, json, os, signal, sys, tempfile, time
from multiprocessing import forkserver
from gepo.reward_funcs import RewardFunctionPool
from gepo.rewards import RewardConfig, RewardScorer, RewardWorkerError

def attempt(call):
    start = time.monotonic()
    try:
        outcome = repr(call())
    except RewardWorkerError as e:
        outcome = "RewardWorkerError: " + str(e)
    return {"outcome": outcome, "elapsed": time.monotonic() - start}

if __name__ == "__main__":
    config = RewardConfig(num_workers=1)
    plugin = os.path.join(tempfile.mkdtemp(), "plugin.py")
    with open(plugin, "w") as f:
        f.write("def one(prompts, completions, **kwargs):\\n    return [1.0] * len(completions)\\n")
    scorer, pool = RewardScorer(config), RewardFunctionPool([plugin + ":one"], config, timeout_s=5.0)
    scorer.warm_up()  # the default launch timeout here: the first start includes the server's preload imports
    pool.warm_up()
    stuck = dataclasses.replace(config, launch_timeout_s=3.0)
    report = {}
    # One pool at a time: the fork server is shared, and the first pool to time out kills it, so the second would
    # launch through a fresh one. Each pool's worker is killed while the server is stopped, so the call needs a new one.
    for name, owner in (("scorer", scorer), ("pool", pool)):
        server = forkserver._forkserver._forkserver_pid
        print(json.dumps({"fork_server": server}), flush=True)
        owner.config = stuck
        os.kill(server, signal.SIGSTOP)  # a stopped (or swapped-out, or stuck) fork server: no worker can be forked
        for worker in owner._workers:
            os.kill(worker.process.pid, signal.SIGKILL)
            # dead before the call: a worker still dying when the call is handed to it is a "crash", not a launch
            worker.process.join(10)
        if name == "scorer":
            report[name] = attempt(lambda: scorer.score(["1/2"], ["0.5"]))
        else:
            report[name] = attempt(lambda: pool.run([(0, ["q"], ["a"], {})]))
        # the stuck server was killed: the next call starts a fresh one (which imports math-verify again) and works
        owner.config = config
        if name == "scorer":
            report["scorer_after"] = attempt(lambda: scorer.score(["1/2", "\\\\frac{1}{3}"], ["0.5", "0.5"]))
        else:
            report["pool_after"] = attempt(lambda: pool.run([(0, ["q"], ["a"], {})]))
    report["workers_after"] = [len(scorer._workers), len(pool._workers)]
    scorer.close()
    pool.close()
    print(json.dumps(report), flush=True)
"""


def test_a_fork_server_that_does_not_answer_is_an_error_within_the_start_up_timeout():
    """Starting a worker through a stopped fork server used to block the learner for ever (process.start() waits for
    the server's reply); now it is a RewardWorkerError after launch_timeout_s, and the next call works again."""
    proc = subprocess.Popen([sys.executable, "-c", _STOPPED_FORK_SERVER], cwd=Path(__file__).parents[1],
                            stdout=subprocess.PIPE, text=True)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # the bug this test is for: a start that blocks for ever
        proc.kill()
        out, _ = proc.communicate(timeout=10)
    finally:
        proc.kill()
        proc.wait(10)
        # a stopped server is orphaned if the child hung: never leave one behind
        for line in out.splitlines() if out else []:
            if line.startswith('{"fork_server"'):
                try:
                    os.kill(json.loads(line)["fork_server"], signal.SIGKILL)
                except ProcessLookupError:
                    pass
    assert proc.returncode == 0, out
    report = json.loads(out.strip().splitlines()[-1])
    for name in ("scorer", "pool"):
        assert report[name]["outcome"].startswith("RewardWorkerError: a reward worker process was not started "
                                                  "within 3 s"), report
        # the launch bound, plus joining the killed worker (5 s) and slack for a loaded machine; it was for ever
        assert report[name]["elapsed"] < 3.0 + 5 + 20, report
    assert report["scorer_after"]["outcome"] == repr([RewardResult(1.0, 0.0, 1.0), RewardResult(0.0, 0.0, 0.0)])
    assert report["pool_after"]["outcome"] == repr([("ok", [1.0])])
    assert report["workers_after"] == [1, 1]  # the pools have their size again


def test_worker_reports_a_failed_self_check(monkeypatch):
    """A broken install (or memory cap) must not silently score everything 0.0: the worker refuses to start."""
    import multiprocessing

    from gepo import rewards

    monkeypatch.setattr(rewards, "_worker_setup", lambda memory_mb: None)  # keep this process's signals as they are
    monkeypatch.setattr(rewards, "_WARM_UP", [("1", "1"), ("41", "42")])
    ours, theirs = multiprocessing.Pipe()
    rewards._worker_main(theirs, None, 10.0)
    kind, message = ours.recv()
    assert kind == "broken" and "[1.0, 0.0]" in message


def test_many_threads_share_one_scorer(tight):
    rng = random.Random(3)
    batches = []
    for _ in range(12):
        values = [rng.randint(1, 50) for _ in range(8)]
        # fractions go through the workers; a few timeouts run alongside
        completions = [f"\\frac{{{2 * v}}}{{2}}" if i % 2 else f"\\boxed{{{v + i % 3}}}" for i, v in enumerate(values)]
        batches.append((completions, [str(v) for v in values]))
    batches.append(([POW_TOWER, "\\frac{6}{2}"], ["\\sqrt{2}", "3"]))
    results: dict[int, list[RewardResult]] = {}
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            results[k] = tight.score(*batches[k])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    for k, (completions, golds) in enumerate(batches[:-1]):
        expected = [1.0 if i % 2 or i % 3 == 0 else 0.0 for i in range(len(completions))]
        assert [r.accuracy for r in results[k]] == expected
    assert [r.timed_out for r in results[len(batches) - 1]] == [True, False]


FORMAT_CASES = [
    ("<think>a</think><answer>42</answer>", 1.0),
    ("<think>\nsteps\n</think>\n<answer>\n42\n</answer>\n", 1.0),
    ("  <think></think><answer>42</answer>", 1.0),  # empty thinking is allowed
    ("<think>a</think><answer>  </answer>", 0.0),  # a blank answer is not
    ("<think>a</think><answer>42</answer> trailing", 0.0),
    ("intro <think>a</think><answer>42</answer>", 0.0),
    ("<answer>42</answer><think>a</think>", 0.0),
    ("<think>a</think>text<answer>42</answer>", 0.0),
    ("<think>a</think><answer>1</answer><answer>2</answer>", 0.0),
    ("<think>a<think>b</think></think><answer>42</answer>", 0.0),
    ("<think>a</think><answer>42", 0.0),
    ("<answer>42</answer>", 0.0),
    ("42", 0.0),
    ("", 0.0),
    ("<think>" * 1_000_000 + "</think><answer>1</answer>", 0.0),
]


@pytest.mark.parametrize(("completion", "expected"), FORMAT_CASES)
def test_format_reward(completion, expected):
    assert format_reward(completion) == expected


def test_weights_combine_accuracy_and_format():
    with RewardScorer(RewardConfig(accuracy_weight=1.0, format_weight=0.25, num_workers=1)) as s:
        good, wrong, bare = s.score(
            ["<think>a</think><answer>42</answer>", "<think>a</think><answer>41</answer>", "42"], ["42"] * 3
        )
    assert good == RewardResult(1.0, 1.0, 1.25)
    assert wrong == RewardResult(0.0, 1.0, 0.25)
    assert bare == RewardResult(1.0, 0.0, 1.0)


def test_bad_arguments():
    with pytest.raises(TypeError, match="completions\\[1\\] must be str"):
        score_completions(["1", None], ["1", "1"])
    with pytest.raises(TypeError):
        format_reward(b"<think></think>")
    with pytest.raises(ValueError, match="2 completions but 1 golds"):
        score_completions(["1", "2"], ["1"])
    with pytest.raises(ValueError):
        RewardConfig(timeout_s=0)
    assert score_completions([], []) == []


def test_module_level_convenience():
    assert accuracy_reward("\\boxed{\\dfrac{1}{2}}", "0.5") == 1.0
    assert accuracy_reward("41", "42") == 0.0
    (r,) = score_completions(["<think>a</think><answer>7</answer>"], ["7"], RewardConfig(format_weight=1.0))
    assert r == RewardResult(1.0, 1.0, 2.0)


def test_spawn_start_method_works():
    with RewardScorer(RewardConfig(start_method="spawn", num_workers=1)) as s:
        assert s.score(["\\frac{1}{2}"], ["0.5"])[0].accuracy == 1.0


@pytest.mark.skipif(not GSM8K_TRAIN.exists(), reason=f"GSM8K training file not found at {GSM8K_TRAIN}")
def test_real_gsm8k_golds(scorer):
    rows = [json.loads(line) for line in GSM8K_TRAIN.open()]
    sample = random.Random(0).sample(rows, 300)
    golds = [row["answer"] for row in sample]  # raw: reasoning, then "#### n"
    finals = [g.rsplit("####", 1)[1].strip() for g in golds]
    forms = ["{}", "The answer is {}.", "\\boxed{{{}}}", "<think>ok</think><answer>{}</answer>", "${}"]
    right = [forms[i % len(forms)].format(f) for i, f in enumerate(finals)]
    wrong = [f"\\boxed{{{int(f.replace(',', '')) + 1}}}" for f in finals]
    assert all(r.accuracy == 1.0 for r in scorer.score(right, golds))
    assert all(r.accuracy == 0.0 for r in scorer.score(wrong, golds))
