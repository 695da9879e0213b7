"""Thread choice: validated settings, flags read from a whole command line, applied before torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common import threads

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_passive_one_interop_and_every_core() -> None:
    config = threads.ThreadConfig()
    assert (config.wait_policy, config.interop_threads) == ("passive", 1)
    assert config.resolved_threads({}) == threads.available_cores()


def test_explicit_threads_win_over_omp_num_threads() -> None:
    assert threads.ThreadConfig(threads=3).resolved_threads({"OMP_NUM_THREADS": "5"}) == 3
    assert threads.ThreadConfig().resolved_threads({"OMP_NUM_THREADS": "5"}) == 5
    # A malformed variable is ignored rather than crashing the start.
    assert threads.ThreadConfig().resolved_threads({"OMP_NUM_THREADS": "many"}) == \
        threads.available_cores()


@pytest.mark.parametrize(("field", "value", "message"), [
    ("threads", -1, "threads must be >= 0 (0 = every available core), got -1"),
    ("interop_threads", 0, "interop_threads must be >= 1, got 0"),
    ("wait_policy", "spin", "wait_policy must be one of ('passive', 'active'), got 'spin'"),
])
def test_bad_settings_name_the_field_and_value(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError) as raised:
        threads.ThreadConfig(**{field: value})
    assert str(raised.value) == message


def test_thread_flags_are_found_anywhere_in_a_command_line() -> None:
    argv = ["fit", "--base", "b", "--threads", "1", "--early-stopping-threshold", "0.1",
            "--omp-wait-policy", "active"]
    assert threads.config_from_argv(argv) == threads.ThreadConfig(threads=1,
                                                                  wait_policy="active")
    assert threads.config_from_argv(["fit", "--base", "b"]) == threads.ThreadConfig()


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}


def _fresh_interpreter(code: str, env: dict[str, str]) -> dict:
    """Run `code` in a new Python (torch not yet loaded) and return the JSON it prints."""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_apply_sets_the_wait_policy_before_torch_loads_and_sizes_the_pools() -> None:
    seen = _fresh_interpreter(
        "import json, os, sys\n"
        "from common import threads\n"
        "assert 'torch' not in sys.modules\n"
        "r = threads.apply(threads.ThreadConfig(threads=1, interop_threads=2))\n"
        "import torch\n"
        "print(json.dumps({'policy': os.environ['OMP_WAIT_POLICY'], 'omp': "
        "os.environ['OMP_NUM_THREADS'], 'intra': torch.get_num_threads(), 'interop': "
        "torch.get_num_interop_threads(), 'report': r.describe()}))\n", _clean_env())
    assert seen == {"policy": "PASSIVE", "omp": "1", "intra": 1, "interop": 2,
                    "report": "threads: 1 intra-op, 2 inter-op, OpenMP wait policy passive"}


def test_apply_after_torch_loaded_changes_only_the_intra_op_count() -> None:
    env = {**_clean_env(), "OMP_WAIT_POLICY": "ACTIVE"}
    seen = _fresh_interpreter(
        "import json, torch\n"
        "from common import threads\n"
        "r = threads.apply(threads.ThreadConfig(threads=1))\n"
        "print(json.dumps({'intra': torch.get_num_threads(), 'report': r.describe()}))\n", env)
    assert seen == {"intra": 1, "report": "threads: 1 intra-op, unchanged inter-op, OpenMP wait "
                                          "policy active (torch loaded before)"}


def test_trainer_cli_rejects_a_bad_thread_count_with_exit_2(
        capsys: pytest.CaptureFixture[str]) -> None:
    from trainer.cli import main

    assert main(["make-data", "--out", "unused", "--threads", "-2"]) == 2
    assert "threads must be >= 0 (0 = every available core), got -2" in capsys.readouterr().err


def test_server_cli_accepts_the_thread_flags() -> None:
    from server.cli import build_parser

    args = build_parser().parse_args(["serve", "--base", "b", "--adapters-root", "r",
                                      "--threads", "1", "--omp-wait-policy", "active"])
    assert threads.config_from_args(args) == threads.ThreadConfig(threads=1,
                                                                  wait_policy="active")
