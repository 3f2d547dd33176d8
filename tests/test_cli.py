"""The programs as a new user meets them: every bad input gets one `error:` line naming the flag and the fix, with
the exit status of its class (node/errors.py), and before anything heavy loads; `--help` documents every flag of
the program's own role, with its default.

Each case runs the real program as a subprocess. The time bounds are loose (30 s on a loaded 2-core machine for
what takes ~2 s on a quiet one): they catch a check that waits for a model load or a network timeout, nothing finer.
The --help speed itself is measured by scripts/bench/bench_help.py, not asserted here.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from node.errors import EXIT_TRUST, EXIT_UNREACHABLE, EXIT_USAGE
from tests.paths import GSM8K_TRAIN, REPO_ROOT

PEER = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo"  # well-formed, nobody there
QUICK_S = 30.0  # bound for an answer that needs no model and no network


def run(program: str, *args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", f"node.{program}", *args], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=timeout)
    return out, time.monotonic() - t0


def error_line(out: subprocess.CompletedProcess) -> str:
    """The one `error:` line on stderr (there must be exactly one, and no traceback)."""
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, out.stderr[-3000:]
    return lines[0]


# ---- usage errors (exit 2), answered before torch, the model or the swarm load


@pytest.mark.parametrize("program,args,expect", [  # the cases of issue 17, and one per kind of check
    ("sampler", ["--peers", PEER, "--learner-key", "ed25519:abc"], ["--learner-key", "64 hex"]),
    ("monitor", ["--peers", PEER, "--learner-key", "not-a-key"], ["--learner-key"]),
    ("sampler", [], ["--peers is required", "/p2p/"]),
    ("sampler", ["--peers", "/ip4/127.0.0.1/tcp/31337"], ["--peers", "no /p2p/<peer id>"]),
    ("learner", ["--announce-maddrs", "/ip4/1.2.3.4/tcp/0"], ["--announce-maddrs", "explicit port"]),
    ("learner", ["--loss", "foo"], ["--loss", "invalid choice", "gepo"]),
    ("sampler", ["--device", "gpu"], ["--device", "invalid device value"]),
    ("learner", ["--model", "./models/no-such-model"], ["--model", "no such folder"]),
    ("learner", ["--model", "nobody/no-such-model"], ["--model", "no cached copy"]),
    ("learner", ["--config", "recipes/no-such-recipe.yaml"], ["--config", "not found"]),
])
def test_bad_argument_is_one_line_naming_the_flag(program, args, expect, tmp_path):
    out, took = run(program, *args, "--run-dir", str(tmp_path / "run")) if program == "learner" else \
        run(program, *args)
    line = error_line(out)
    assert out.returncode == EXIT_USAGE, out.stderr[-3000:]
    for text in expect:
        assert text in line, line
    assert took < QUICK_S, f"{took:.1f} s: the check waited for something heavy"


@pytest.mark.parametrize("text,peer,explicit_port,expect", [
    ("127.0.0.1:31337", False, False, "starts with '/'"),
    ("/ip4/300.1.1.1/tcp/1", False, False, "300.1.1.1"),
    ("/ip4/1.2.3.4/tcp/99999", False, False, "port '99999'"),
    ("/ip4/1.2.3.4/tcp", False, False, "/tcp needs a value"),
    ("/ip4/1.2.3.4/sctp/1", False, False, "unknown protocol 'sctp'"),
    ("/ip4/1.2.3.4/tcp/1/p2p/12D3KooWnotapeerid0OIl", True, False, "not base58"),
    ("/ip4/1.2.3.4/tcp/1/p2p/QmTooShort", True, False, "not a multihash"),
    ("/dns4/-bad-/tcp/1/p2p/" + PEER.rsplit("/", 1)[1], True, False, "not a host name"),
    ("/ip4/1.2.3.4/tcp/0", False, True, "explicit port"),
])
def test_multiaddr_check_names_the_problem(text, peer, explicit_port, expect):
    from node.errors import ConfigError
    from node.preflight import check_multiaddr

    with pytest.raises(ConfigError, match="^--flag ") as info:
        check_multiaddr(text, "--flag", peer=peer, explicit_port=explicit_port)
    assert expect in str(info.value)


@pytest.mark.parametrize("text", [PEER, "/ip6/::1/tcp/31337/p2p/QmWxWZ1pPG9aWAgDFLom43W7vPydrGaqTznmHzhgCjws2R",
                                  "/dns4/learner.example.org/tcp/31337/p2p/" + PEER.rsplit("/", 1)[1],
                                  "/ip4/1.2.3.4/udp/1/quic-v1/p2p/" + PEER.rsplit("/", 1)[1]])
def test_multiaddr_check_accepts_what_hivemind_accepts(text):
    from hivemind.p2p import PeerID
    from hivemind.utils.multiaddr import Multiaddr

    from node.preflight import check_multiaddr

    assert check_multiaddr(text, "--peers", peer=True) == text
    assert PeerID.from_base58(Multiaddr(text)["p2p"])  # the real parser agrees


def test_model_folder_without_config_is_named(tmp_path):
    (tmp_path / "model").mkdir()
    out, took = run("learner", "--model", str(tmp_path / "model"), "--run-dir", str(tmp_path / "run"))
    assert out.returncode == EXIT_USAGE and "--model" in error_line(out) and "config.json" in error_line(out)
    assert took < QUICK_S


def test_dataset_typo_is_reported_before_the_model_loads(tmp_path):
    """The model here is a real folder (a copy of nothing: the check must not get that far)."""
    bad = GSM8K_TRAIN.with_name("trian.jsonl")
    out, took = run("learner", "--dataset", str(bad), "--run-dir", str(tmp_path / "run"))
    assert out.returncode == EXIT_USAGE and f"--dataset {bad}" in error_line(out)
    assert "loaded" not in out.stderr  # no model or prompt set was loaded first
    assert took < QUICK_S


def test_recipe_list_option_given_as_a_string_is_one_item(tmp_path):
    """`peers: /ip4/...` (a string, not a list) is one address, not a list of its characters."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("peers: /ip4/127.0.0.1/tcp/31337\n")  # one address, missing its /p2p part
    out, took = run("sampler", "--config", str(recipe))
    line = error_line(out)
    assert out.returncode == EXIT_USAGE and "'/ip4/127.0.0.1/tcp/31337'" in line and "no /p2p/" in line
    assert took < QUICK_S


def test_recipe_errors_name_the_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learnig_rate: 1e-5\n")
    out, _ = run("learner", "--config", str(recipe))
    assert out.returncode == EXIT_USAGE and "learnig_rate (did you mean learning_rate?)" in error_line(out)
    recipe.write_text("loss: foo\n")
    out, _ = run("learner", "--config", str(recipe))
    assert out.returncode == EXIT_USAGE and "loss (--loss): 'foo' is not one of" in error_line(out)
    recipe.write_text("max_steps: many\n")
    out, _ = run("learner", "--config", str(recipe))
    assert out.returncode == EXIT_USAGE and "max_steps (--max-steps): invalid value 'many'" in error_line(out)
    recipe.write_text("num_iterations: 2\n")
    out, _ = run("learner", "--config", str(recipe))
    assert out.returncode == EXIT_USAGE and "num_iterations" in error_line(out)


# ---- unreachable swarm (exit 3) and trust failure (exit 4)


def test_unreachable_peer_exits_3(tmp_path):
    out, _ = run("sampler", "--peers", PEER, "--state-dir", str(tmp_path / "s"), "--bootstrap-timeout", "2",
                 "--exit-on-unreachable",
                 "--no-nat-port-map", "--no-auto-nat", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--torch-threads", "1")
    assert out.returncode == EXIT_UNREACHABLE, out.stderr[-3000:]
    assert "none of the bootstrap peers could be reached" in error_line(out)


@pytest.mark.slow
def test_sampler_that_remembers_another_learner_exits_4(tmp_path):
    """A sampler trusts the learner key it remembered on first use; a learner now signing with another key is a
    trust failure (exit 4) that names both keys, not a silent wait for a heartbeat that never comes."""
    from protocol.identity import Identity
    from tests.swarm_helpers.procs import NodeProc, stop_all

    state = tmp_path / "sampler"
    state.mkdir()
    remembered = Identity.generate().public_key_str
    (state / "trusted_learner.txt").write_text(remembered + "\n")
    learner = NodeProc(["learner", "--state", str(tmp_path / "L")], tmp_path / "learner.log")
    try:
        ready = learner.wait_event("ready", 90)
        out, _ = run("sampler", "--peers", ready["maddrs"][0], "--run-id", "swarm-test", "--state-dir", str(state),
                     "--wait-learner", "15",
                     "--no-nat-port-map", "--no-auto-nat", "--no-use-relay", "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
                     "--torch-threads", "1")
    finally:
        stop_all([learner])
    line = error_line(out)
    assert out.returncode == EXIT_TRUST, out.stderr[-3000:]
    assert ready["key"] in line and remembered in line and "--learner-key" in line


# ---- --help


def help_text(program: str) -> str:
    out, took = run(program, "--help")
    assert out.returncode == 0, out.stderr[-3000:]
    assert took < QUICK_S
    return out.stdout


@pytest.mark.parametrize("program", ["learner", "sampler", "monitor"])
def test_help_imports_nothing_heavy(program):
    """--help must not import torch, transformers, datasets or hivemind (what made it take 6 s)."""
    code = (f"import sys\nfrom node.{program} import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'hivemind', 'datasets') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("program,own,other", [
    ("learner", ["--inbox-size", "--ration", "--heartbeat-ttl", "--max-push-streams", "--loss", "--dataset"],
     ["--learner-key", "--client-mode", "--poll-interval", "--max-outbox-items", "--swarming", "--backend"]),
    ("sampler", ["--learner-key", "--client-mode", "--poll-interval", "--max-outbox-items", "--swarming",
                 "--backend"],
     ["--inbox-size", "--ration", "--heartbeat-ttl", "--max-push-streams", "--loss", "--dataset"]),
])
def test_help_shows_only_the_programs_own_flags(program, own, other):
    text = help_text(program)
    flags = {word.rstrip(",") for word in text.split() if word.startswith("--")}
    for flag in own:
        assert flag in flags, flag
    for flag in other:
        assert flag not in flags, f"{flag} belongs to the other role"


@pytest.mark.parametrize("program", ["learner", "sampler", "monitor"])
def test_help_gives_every_flag_a_default(program):
    """Every option's entry says its default (or its choices for a switch with none), and none points at code."""
    text = help_text(program)
    entries, current = [], None
    for line in text.splitlines():
        if line.startswith("  --"):
            current = [line]
            entries.append(current)
        elif line.startswith("   ") and current is not None:
            current.append(line)
        else:
            current = None
    assert len(entries) > 15
    for entry in entries:
        joined = " ".join(" ".join(entry).split())
        assert "default:" in joined, f"no default in: {joined}"
        assert not any(code in joined for code in ("()", ".py", "`")), f"points at code: {joined}"


def test_help_lists_choices():
    text = help_text("learner")
    for choices in ("{grpo,bnpo,dr_grpo,dapo,gspo,gepo,delta_l,tis,cispo,m2po}", "{auto,group,batch,none}", "{prompt,micro_batch}",
                    "{auto,delta_l}", "{auto,float32,bfloat16,float16}"):
        assert choices in text, choices
    assert "cpu, cuda, cuda:N or auto" in text
