"""Recommended fit settings carried by a base: a small YAML beside the model's own files.

`trainer init-base` (and whoever prepares a base) writes it with `write_recommended`; `trainer fit`
reads it with `read_recommended` and layers it under `--config` and the flags, so a base trains
well with no flags. Only settings that shape the weights may be recommended: paths, names and
runtime switches belong to the run, not to the base.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.config import FIELD_NAMES, RUNTIME_FIELDS

RECOMMENDED_FILE = "recommended_fit.yaml"
NOT_RECOMMENDABLE = frozenset(
    {"base", "data", "validation", "name", "adapters_root", "parent", *RUNTIME_FIELDS}
)
RECOMMENDABLE = tuple(name for name in FIELD_NAMES if name not in NOT_RECOMMENDABLE)

# The embedded tiny base (trainer/base.py): a few million parameters learn fast, so a high
# learning rate and a short run; max_length holds the longest bundled conversation (269 tokens)
# so the last answer, which repeats the facts, is trained. Found with `trainer sweep`.
TINY_BASE_SETTINGS: dict[str, Any] = {
    "max_steps": 200,
    "batch_size": 8,
    "learning_rate": 3.0e-3,
    "rank": 32,
    "alpha": 64.0,
    "dropout": 0.0,
    "warmup": 0.05,
    "max_length": 320,
    "padding_free": True,
    "eval_steps": 50,
    "save_steps": 100,
    "logging_steps": 20,
}


def recommended_path(base_dir: str | Path) -> Path:
    return Path(base_dir) / RECOMMENDED_FILE


def check_settings(settings: dict[str, Any], source: str) -> dict[str, Any]:
    """Keys use underscores or dashes; every key must be a recommendable fit setting."""
    normalised = {str(k).replace("-", "_"): v for k, v in settings.items()}
    refused = sorted(k for k in normalised if k not in RECOMMENDABLE)
    if refused:
        raise ValueError(f"{source}: not recommendable fit settings: {refused} "
                         f"(allowed: {', '.join(RECOMMENDABLE)})")
    # Build a throwaway config so a bad value is refused here, naming the field, not at fit time.
    from trainer.config import build_config

    placeholders = {"base": "b", "data": "d", "name": "n", "adapters_root": "r"}
    try:
        build_config(placeholders, normalised)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from exc
    return normalised


def write_recommended(base_dir: str | Path, settings: dict[str, Any]) -> Path:
    """Write (or replace) the base's recommended fit settings; returns the file's path."""
    import yaml

    path = recommended_path(base_dir)
    checked = check_settings(settings, str(path))
    header = ("# Fit settings recommended for this base; `trainer fit` uses them unless --config\n"
              "# or flags say otherwise.\n")
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(header + yaml.safe_dump(checked, sort_keys=True))
    tmp.replace(path)
    return path


def read_recommended(base_dir: str | Path) -> dict[str, Any]:
    """The base's recommended settings, or {} when the base (a directory or hub id) has none."""
    from trainer.config import read_yaml

    path = recommended_path(base_dir)
    if not path.is_file():
        return {}
    return check_settings(read_yaml(path), str(path))
