"""The layers stay apart (import-linter contracts) and the generated API code is current."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint), "--config", str(ROOT / "pyproject.toml")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "broken" not in result.stdout.lower().replace("0 broken", "")


def test_generated_grpc_code_matches_the_proto(tmp_path: Path) -> None:
    from common.protogen import generate

    fresh = generate(tmp_path)
    committed_dir = ROOT / "proto"
    assert fresh, "protoc generated nothing"
    for path in fresh:
        committed = committed_dir / path.relative_to(tmp_path)
        assert committed.exists(), f"{committed} missing: run `make proto` and commit"
        assert filecmp.cmp(path, committed, shallow=False), (
            f"{committed} is stale: run `make proto` and commit the result"
        )
