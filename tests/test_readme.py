"""The README tells the truth: its commands answer --help, its figures follow from the configs."""

import dataclasses
import re
import subprocess
import sys

import pytest

from conftest import ROOT, subprocess_env
from gpt.config import load_run_config
from gpt.model import GPT

README = (ROOT / "README.md").read_text(encoding="utf-8")
CODE = "\n".join(re.findall(r"```(?:bash|sh)?\n(.*?)```", README, flags=re.S))
MODULES = sorted(set(re.findall(r"python -m ([a-z_.]+)", README)))
SCRIPTS = sorted(set(re.findall(r"python ((?:bench|notebooks)/[a-z_]+\.py)", README)))


def test_the_readme_shows_the_commands_it_is_about():
    assert {"launch", "export", "serve", "serve.server", "gpt.data", "launch.plot", "pytest"} <= set(MODULES)
    assert "bench/prepare.py" in SCRIPTS and "bench/soak.py" in SCRIPTS


@pytest.mark.parametrize("module", MODULES)
def test_every_python_m_command_answers_help(module):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage" in proc.stdout.lower()


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s.startswith("bench/")])
def test_every_benchmark_answers_help(script):
    proc = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def parameter_count(config_name: str) -> float:
    """Millions of parameters of a config's model with the 65-character vocabulary (position table excluded)."""
    config = load_run_config(ROOT / "configs" / config_name, ["--data.path=unused"] if "gpt2" in config_name else [])
    model = GPT(dataclasses.replace(config.model, vocab_size=65, init_from=None))
    return model.num_parameters() / 1e6


def test_parameter_counts_quoted_for_configs_are_the_configs():
    quoted = re.findall(r"`configs/([a-z0-9_]+\.yaml)` \| [^|\n]*?(\d+(?:\.\d+)?)M[- ]parameter", README)
    assert len(quoted) >= 2, quoted
    for name, millions in quoted:
        digits = len(millions.split(".")[1]) if "." in millions else 0
        assert round(parameter_count(name), digits) == float(millions), (name, millions, parameter_count(name))


def test_every_config_the_readme_names_exists():
    for name in set(re.findall(r"configs/([a-z0-9_/]+\.yaml)", README)):
        assert (ROOT / "configs" / name).is_file(), name


def test_every_benchmark_calls_export_with_keywords_it_takes():
    """No test runs a benchmark whole (each takes minutes), so a renamed export() keyword would break
    one unseen: every keyword a benchmark passes to export() or make_export() must be export()'s (or,
    to make_export, one of its own)."""
    import ast
    import inspect

    from bench.common import make_export
    from export.pipeline import export

    takes, calls = set(inspect.signature(export).parameters), 0
    own = set(inspect.signature(make_export).parameters) - {"options"}
    for path in sorted((ROOT / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            name = getattr(node, "func", None)
            name = getattr(name, "id", None) or getattr(name, "attr", None)
            if isinstance(node, ast.Call) and name in ("export", "make_export"):
                calls += 1
                unknown = {k.arg for k in node.keywords if k.arg} - takes - (own if name == "make_export" else set())
                assert not unknown, f"bench/{path.name} line {node.lineno} passes {sorted(unknown)} to export()"
    assert calls >= 4  # decode, export, serve, step_profile at least


def test_ci_installs_as_readme_command_2_does():
    """CI runs the README's test command: the same install (llama.cpp's build arguments included)."""
    command = next(line for line in README.splitlines() if line.startswith("python3 -m venv") and ".[test]" in line)
    install = next(part.strip() for part in command.split("&&") if "pip install" in part)
    assert install.replace("pip install", "python -m pip install --quiet") in (ROOT / ".ci" / "run").read_text()
