"""The settings tree checks itself: each section validates its fields, the server checks
combinations across sections, and every default is written once."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from common import settings
from common.names import TruncationStrategy
from server.config import ServerConfig
from server.engine_config import AdapterCacheConfig, EngineConfig, SchedulerConfig

API_KEY = "k-api-0123456789abcdef"


def test_the_tree_nests_server_engine_scheduler_and_cache(tmp_path: Path) -> None:
    config = ServerConfig.build(base="tiny", adapters_root=tmp_path, max_batch=4,
                                max_lora_rank=8, context_length=256, port=0)
    assert config.engine.scheduler == SchedulerConfig(max_batch=4)
    assert config.engine.cache == AdapterCacheConfig(max_lora_rank=8)
    assert config.engine.context_length == 256 and config.port == 0


def test_defaults_are_written_once_and_agree(tmp_path: Path) -> None:
    config = ServerConfig(base="tiny", adapters_root=tmp_path)
    assert config.engine == EngineConfig() and config.engine.scheduler == SchedulerConfig()
    assert config.sessions_db == Path("switchboard-sessions.db")
    assert config.default_truncation is TruncationStrategy.DROP_OLDEST
    flat = settings.flatten(config)
    for leaf in settings.leaves(ServerConfig):
        if leaf.default is not dataclasses.MISSING:
            assert flat[leaf.name] == leaf.default, leaf.name


def test_build_refuses_an_unknown_setting_by_name(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="ServerConfig has no setting 'max_seq_len'"):
        ServerConfig.build(base="tiny", adapters_root=tmp_path, max_seq_len=64)


def test_a_setting_name_is_unique_in_the_tree() -> None:
    @dataclasses.dataclass
    class Clash:
        max_batch: int = 1
        engine: EngineConfig = settings.section(EngineConfig, "engine")

    with pytest.raises(TypeError, match=r"unique in the tree: \['max_batch'\]"):
        settings.leaves(Clash)


@pytest.mark.parametrize("field, value, message", [
    ("port", 70000, "port must be in 0..65535 (0 picks a free one), got 70000"),
    ("device", "tpu", "device must be one of"),
    ("max_batch", 0, "max_batch must be an integer >= 1, got 0"),
    ("max_queue", -1, "max_queue must be an integer >= 1, got -1"),
    ("max_prefill_tokens", True, "max_prefill_tokens must be an integer >= 1, got True"),
    ("burst_window_ms", -1.0, "burst_window_ms must be a number of milliseconds from 0 to 1000"),
    ("burst_window_ms", float("nan"), "burst_window_ms must be a number of milliseconds"),
    ("max_loaded_adapters", 0, "max_loaded_adapters must be an integer >= 1, got 0"),
    ("adapter_memory_budget_bytes", -1, "adapter_memory_budget_bytes must be an integer >= 0"),
    ("context_length", -1, "context_length must be an integer >= 0 (0 = the model's own)"),
    ("cuda_graphs", "yes", "cuda_graphs must be true, false or None"),
    ("tune_cpu_threads", "yes", "tune_cpu_threads must be true, false or None"),
    ("cuda_graphs", 1, "cuda_graphs must be true, false or None"),
    ("decode_ahead", "no", "decode_ahead must be true, false or None"),
    ("default_truncation", "shred", "default_truncation must be one of"),
    ("default_max_new_tokens", 10_000, "default_max_new_tokens must be <= max_new_tokens_limit"),
    ("session_ttl_seconds", 0, "session_ttl_seconds must be a positive number of seconds"),
    ("base", "", "base must be a model directory or hub id"),
    ("slow_workers", 0, "slow_workers must be an integer >= 1, got 0"),
    ("quantize", "int8", "quantize must be one of"),
])
def test_each_field_is_checked_with_a_precise_message(tmp_path: Path, field: str,
                                                       value: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        ServerConfig.build(**({"base": "tiny", "adapters_root": tmp_path} | {field: value}))
    assert message in str(info.value) and repr(value) in str(info.value)


@pytest.mark.parametrize("kwargs, message", [
    ({"context_length": 64, "default_max_new_tokens": 64},
     "default_max_new_tokens must be < context_length (64), got 64"),
    ({"device": "cpu", "cuda_graphs": True}, "off with device cpu"),
    ({"device": "cuda", "tune_cpu_threads": True}, "off with device cuda"),
    ({"port": 9000, "metrics_port": 9000}, "metrics_port must be different from port (9000)"),
    ({"max_concurrent_requests": 4, "max_concurrent_per_adapter": 8},
     "max_concurrent_per_adapter must be <= max_concurrent_requests (4), got 8"),
])
def test_combinations_across_sections_are_checked(tmp_path: Path, kwargs: dict,
                                                  message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ServerConfig.build(base="tiny", adapters_root=tmp_path, **kwargs)


def test_sections_check_themselves_alone() -> None:
    with pytest.raises(ValueError, match="max_batch must be an integer >= 1, got 0"):
        EngineConfig.build(max_batch=0)
    with pytest.raises(ValueError, match="scheduler must be a SchedulerConfig"):
        EngineConfig(scheduler={"max_batch": 4})  # type: ignore[arg-type]
    assert EngineConfig(context_length=256).context_for(2048) == 256
    assert EngineConfig().context_for(512) == 512 and EngineConfig().context_for(0) == 2048


@pytest.mark.parametrize("kwargs, phrase", [
    ({"api_keys": ("short",)}, "at least 16 characters"),
    ({"api_keys": ("has a space in the key",)}, "no spaces"),
    ({"api_keys": (API_KEY,), "admin_keys": (API_KEY,)}, "one kind"),
    ({"tls_cert": "server.pem"}, "together"),
    ({"tls_client_ca": "ca.pem"}, "mutual TLS needs TLS"),
    ({"max_messages": 0}, "max_messages"),
    ({"max_prompt_tokens": -1}, "max_prompt_tokens"),
    ({"max_concurrent_requests": 4, "max_concurrent_per_adapter": 8}, "max_concurrent_per"),
])
def test_security_and_limit_settings_are_checked(tmp_path: Path, kwargs: dict,
                                                 phrase: str) -> None:
    with pytest.raises(ValueError, match=phrase) as info:
        ServerConfig.build(base="tiny", adapters_root=tmp_path, **kwargs)
    assert "short" not in str(info.value) and API_KEY not in str(info.value)


def test_truncation_names_are_one_enum_equal_to_their_strings(tmp_path: Path) -> None:
    config = ServerConfig.build(base="tiny", adapters_root=tmp_path,
                                default_truncation="middle_out")
    assert config.default_truncation is TruncationStrategy.MIDDLE_OUT
    assert config.default_truncation == "middle_out" and f"{config.default_truncation}" \
        == "middle_out"
