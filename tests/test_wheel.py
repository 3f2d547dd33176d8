"""The wheel a user would `pip install`: built from this checkout, installed into a fresh virtualenv, run from outside
the repository through its console scripts.

A fresh virtualenv that downloads and installs the dependencies takes 16 min here (5 min for torch alone), beyond CI's
budget, so the fresh venv takes its dependencies from the project's virtualenv through a .pth file, and the wheel is
installed with --no-deps; a check then verifies that every dependency the wheel declares is satisfied. What this
proves: the wheel carries every module and data file the programs need (the tiny policy, the default --model) and
its console scripts work, without the source tree on the path.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.paths import REPO_ROOT

pytestmark = pytest.mark.slow

# Every requirement the installed wheel declares (extras aside) is met by some visible distribution. (Not `pip check`:
# it also judges packages the Makefile installs with --no-deps on purpose.)
REQUIREMENTS_CHECK = """
from importlib.metadata import PackageNotFoundError, distribution, version
from packaging.requirements import Requirement
unmet = []
for text in distribution("gepo-swarm").requires or []:
    req = Requirement(text)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    try:
        if not req.specifier.contains(version(req.name), prereleases=True):
            unmet.append(f"{req} (have {version(req.name)})")
    except PackageNotFoundError:
        unmet.append(f"{req} (missing)")
print(unmet)
"""


def sh(*argv: str | Path, cwd: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    command = " ".join(map(str, argv))
    assert out.returncode == 0, f"{command} -> {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


def source_copy(dest: Path) -> Path:
    """The files git would ship (tracked, plus new ones not ignored), so the build never sees build/ or .venv/."""
    files = sh("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=REPO_ROOT).stdout
    for name in filter(None, files.split("\0")):
        if (REPO_ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("needs a git checkout to know which files ship")
    root = tmp_path_factory.mktemp("wheel")
    src = source_copy(root / "src")
    sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", root / "dist", src, cwd=root)
    (wheel,) = (root / "dist").glob("gepo_swarm-*.whl")
    venv = root / "venv"
    sh(sys.executable, "-m", "venv", "--without-pip", venv, cwd=root)
    purelib = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (purelib / "project_deps.pth").write_text("\n".join(deps) + "\n")  # appended after the venv's own packages
    sh(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--no-deps", wheel, cwd=root)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return venv, root / "outside", env


def test_wheel_ships_the_tiny_policy_and_its_requirements_are_met(installed):
    venv, _, env = installed
    work = venv.parent
    where = sh(venv / "bin" / "python", "-c", "import node, gepo.tiny_policy as t; print(node.__file__); "
               "print(t.tiny_policy_path()); print((t.tiny_policy_path() / 'model.safetensors').is_file())",
               cwd=work, env=env).stdout.split()
    assert where[0].startswith(str(venv)) and where[1].startswith(str(venv)), where  # the wheel's copy, not the repo
    assert where[2] == "True"
    unmet = sh(venv / "bin" / "python", "-c", REQUIREMENTS_CHECK, cwd=work, env=env).stdout.strip()
    assert unmet == "[]", f"requirements of the wheel not met: {unmet}"


def test_console_scripts_run_outside_the_repository(installed):
    venv, outside, env = installed
    outside.mkdir(exist_ok=True)
    for script, flag in (("gepo-sampler", "--learner-key"), ("gepo-learner", "--loss"), ("gepo-monitor", "--once")):
        text = sh(venv / "bin" / script, "--help", cwd=outside, env=env).stdout
        assert text.startswith(f"usage: {script} ") and flag in text
    sh(venv / "bin" / "gepo-learner", "--online", "--max-steps", "2", "--groups-per-step", "2", "--group-size", "4",
       "--eval-every", "0", "--reward-workers", "1", "--torch-threads", "1", "--no-tensorboard", "--run-dir", "run",
       cwd=outside, env=env, timeout=600)
    assert (outside / "run" / "checkpoints" / "step-000002").is_dir()
    assert sum(1 for _ in (outside / "run" / "metrics.jsonl").open()) >= 2
