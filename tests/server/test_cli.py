"""`switchboard-server serve` flags come from the settings tree: one flag per setting, parsed
into the tree, listed by section in --help; the old flag names keep working."""

from __future__ import annotations

from pathlib import Path

import pytest

from common import settings
from server.cli import build_parser, config_from_args
from server.config import ServerConfig


def _parse(*flags: str):
    return build_parser().parse_args(["serve", "--base", "tiny", "--adapters-root", ".", *flags])


def _help() -> str:
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    return serve.format_help()


def test_every_setting_but_the_keys_has_a_documented_flag() -> None:
    text = _help()
    for leaf in settings.leaves(ServerConfig):
        if leaf.name in ("api_keys", "admin_keys"):  # from the environment only
            assert not leaf.on_cli
            continue
        assert leaf.flag in text, leaf.name
        assert leaf.field.metadata["help"], f"{leaf.name} has no help"


def test_help_lists_the_sections() -> None:
    text = _help()
    for title in ("engine:", "scheduler:", "adapter cache:", "sessions:", "security:",
                  "limits:", "observability:"):
        assert f"\n{title}\n" in text, title
    assert "--max-prefill-tokens N" in text and "(default: 4096)" in text


def test_cli_flags_map_to_the_config(tmp_path: Path) -> None:
    args = build_parser().parse_args([
        "serve", "--base", "tiny", "--adapters-root", str(tmp_path), "--port", "0",
        "--device", "cpu", "--max-batch", "4", "--max-loaded-adapters", "3", "--max-queue", "9",
        "--default-truncation", "middle_out", "--no-sessions", "--metrics-port", "9100",
        "--max-prefill-tokens", "256", "--context-length", "512", "--no-cuda-graphs",
        "--decode-ahead", "--max-adapter-bytes", "1000", "--log-json", "--burst-window-ms", "0.5",
    ])
    config = config_from_args(args, {})
    scheduler, cache = config.engine.scheduler, config.engine.cache
    assert (config.port, config.device, scheduler.max_batch, cache.max_loaded_adapters,
            scheduler.max_queue) == (0, "cpu", 4, 3, 9)
    assert scheduler.max_prefill_tokens == 256 and config.engine.context_length == 512
    assert config.engine.cuda_graphs is False and cache.max_adapter_bytes == 1000
    assert config.engine.decode_ahead is True and scheduler.burst_window_ms == 0.5
    assert config.default_truncation == "middle_out" and config.sessions_db is None
    assert config.metrics_port == 9100 and config.adapters_root == tmp_path and config.log_json


def test_no_flags_give_the_dataclass_defaults() -> None:
    config = config_from_args(_parse(), {})
    assert config == ServerConfig(base="tiny", adapters_root=Path("."))
    assert config.engine.cuda_graphs is None and config.sessions_db is not None
    assert config.engine.decode_ahead is None


def test_sessions_flags_keep_their_meaning() -> None:
    assert config_from_args(_parse("--sessions-db", "x.db"), {}).sessions_db == Path("x.db")
    off = config_from_args(_parse("--sessions", "redis://r/0", "--no-sessions"), {})
    assert off.sessions_location is None
    assert config_from_args(_parse("--sessions", "redis://r/0"), {}).sessions_url \
        == "redis://r/0"


def test_a_bad_value_is_refused_by_argparse_or_the_config(capsys) -> None:
    with pytest.raises(SystemExit):
        _parse("--default-truncation", "shred")
    assert "--default-truncation: invalid TruncationStrategy value: 'shred'" \
        in capsys.readouterr().err
    with pytest.raises(ValueError, match="max_prefill_tokens must be an integer >= 1, got 0"):
        config_from_args(_parse("--max-prefill-tokens", "0"), {})
