"""Adapter safety: references cannot name a path, symlinks cannot lead out of the adapters root,
only safetensors are read and only up to a size, and a damaged or half-written adapter, or one
over the memory budget, fails precisely while the same server keeps serving every other adapter.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch
from conftest import write_random_adapter
from safetensors.torch import load_file, save_file
from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

from common.modeling import base_fingerprint, load_base
from server.adapters import AdapterRegistry, parse_ref
from server.app import RunningServer, start_in_thread
from server.config import ServerConfig
from server.engine_config import AdapterCacheConfig
from server.errors import AdapterLoadError, InvalidArgumentError
from server.lora import LoraStack

WEIGHTS = "adapter_model.safetensors"


# ---------------------------------------------------------------- references and the registry

@pytest.fixture
def root(adapters_root: Path, tmp_path: Path) -> Path:
    """A private copy of the fixture adapters (alpha@1, alpha@2, beta@1) to damage at will."""
    return Path(shutil.copytree(adapters_root, tmp_path / "adapters"))


@pytest.fixture
def registry_of(tiny_base: Path) -> Callable[[Path], AdapterRegistry]:
    fingerprint = base_fingerprint(str(tiny_base))
    return lambda root: AdapterRegistry(root, fingerprint, base_id=str(tiny_base))


PATH_LIKE = [
    "/etc/passwd", "/alpha", "/alpha@1", "alpha/1", "alpha\\1", ".", "..", "../alpha",
    "alpha/../beta", "alpha@1/../x", "alpha@1/../../etc", "alpha@0", "alpha@-1", "alpha@01",
    "alpha@1.0", "alpha@+1", "alpha@ 1", "alpha@", "@1", "alpha@1@2", "alpha@9999999999",
    "alpha\x00", "al\x00pha", "alpha@1\x00", "alpha\n", "alpha@1\n", "a" * 129,
    "a" * 100_000, "alpha@" + "1" * 100_000, "~alpha", "$HOME", "alpha*", "alph?",
]


@pytest.mark.parametrize("ref", PATH_LIKE, ids=lambda r: repr(r[:24]))
def test_path_like_references_are_invalid_with_a_short_message(root, registry_of, ref) -> None:
    with pytest.raises(InvalidArgumentError) as refused:
        parse_ref(ref)
    assert len(str(refused.value)) < 400  # the caller's megabyte is not echoed back
    with pytest.raises(InvalidArgumentError):
        registry_of(root).resolve(ref)


def test_the_longest_valid_name_is_accepted(root, registry_of) -> None:
    name = "a" * 128
    shutil.copytree(root / "beta" / "1", root / name / "1")
    assert parse_ref(f"{name}@1") == (name, 1)
    assert registry_of(root).resolve(name).key == f"{name}@1"


def test_versions_named_oddly_on_disk_are_not_served(root, registry_of) -> None:
    for odd in ("01", "1.0", "-1", "0"):
        shutil.copytree(root / "beta" / "1", root / "beta" / odd)
    assert [v.key for v in registry_of(root).versions()] == ["alpha@1", "alpha@2", "beta@1"]


def test_symlinks_out_of_the_root_are_never_followed(root, registry_of, tmp_path) -> None:
    outside = Path(shutil.copytree(root / "alpha" / "1", tmp_path / "outside"))
    (root / "escape").mkdir()
    os.symlink(outside, root / "escape" / "1")  # a version directory
    for name, file in (("leak", WEIGHTS), ("leakcfg", "adapter_config.json"),
                       ("leakmanifest", "manifest.json")):  # one file of a version
        version = Path(shutil.copytree(root / "alpha" / "1", root / name / "1"))
        (version / file).unlink()
        os.symlink(outside / file, version / file)
    registry = registry_of(root)
    for ref, file in (("escape@1", ""), ("leak@1", WEIGHTS),
                      ("leakcfg@1", "adapter_config.json"), ("leakmanifest@1", "manifest.json")):
        with pytest.raises(AdapterLoadError, match="outside the adapters root") as refused:
            registry.resolve(ref)
        assert file in str(refused.value)
    assert registry.resolve("alpha").key == "alpha@2"


def test_a_symlink_inside_the_root_is_served(root, registry_of) -> None:
    (root / "mirror").mkdir()
    os.symlink(root / "beta" / "1", root / "mirror" / "1")
    assert registry_of(root).resolve("mirror").path == (root / "beta" / "1").resolve()


def test_pickle_weights_are_never_read(root, registry_of) -> None:
    version = Path(shutil.copytree(root / "alpha" / "1", root / "pickled" / "1"))
    (version / WEIGHTS).rename(version / "adapter_model.bin")
    with pytest.raises(AdapterLoadError) as refused:
        registry_of(root).resolve("pickled@1")
    message = str(refused.value)
    assert "missing adapter_model.safetensors" in message
    assert "found adapter_model.bin; only safetensors weights are read" in message


def test_a_half_written_version_is_skipped_and_named(root, registry_of) -> None:
    version = Path(shutil.copytree(root / "alpha" / "2", root / "alpha" / "3"))
    (version / WEIGHTS).unlink()  # the trainer died after the config
    registry = registry_of(root)
    assert registry.resolve("alpha").key == "alpha@2"  # the newest complete version
    with pytest.raises(AdapterLoadError, match="incomplete: missing adapter_model.safetensors"):
        registry.resolve("alpha@3")
    only = Path(shutil.copytree(version, root / "fresh" / "1"))
    assert not (only / WEIGHTS).exists()
    with pytest.raises(AdapterLoadError, match="'fresh' has no servable version: fresh@1: .*"
                                               "missing adapter_model.safetensors"):
        registry_of(root).resolve("fresh")


# ---------------------------------------------------------------- on the real server

def _truncate(version: Path) -> None:
    file = version / WEIGHTS
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _garbage_header(version: Path) -> None:
    (version / WEIGHTS).write_bytes((10**12).to_bytes(8, "little") + b"{not json" * 100)


def _nan(version: Path) -> None:
    tensors = load_file(str(version / WEIGHTS))
    first = sorted(tensors)[0]
    tensors[first][0, 0] = float("nan")
    save_file(tensors, str(version / WEIGHTS))


def _half_written(version: Path) -> None:
    (version / WEIGHTS).unlink()


def _pickled(version: Path) -> None:
    (version / WEIGHTS).rename(version / "adapter_model.bin")


def _with_lm_head(version: Path, base: Path) -> None:
    """Also a LoRA on lm_head: more modules than any all-linear adapter, so more memory."""
    tensors = load_file(str(version / WEIGHTS))
    rank = tensors[next(k for k in sorted(tensors) if ".lora_A." in k)].shape[0]
    config = json.loads((base / "config.json").read_text())
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    tensors["base_model.model.lm_head.lora_A.weight"] = torch.randn(rank, hidden) * 0.01
    tensors["base_model.model.lm_head.lora_B.weight"] = torch.randn(vocab, rank) * 0.01
    save_file(tensors, str(version / WEIGHTS))


def _memory_bytes(tiny_base: Path, version: Path) -> int:
    """What the server counts for an adapter: its modules' LoRA slot slices."""
    model, _ = load_base(str(tiny_base))
    stack = LoraStack(model, num_slots=2, max_rank=AdapterCacheConfig.max_lora_rank)
    names = {k.split(".lora_")[0].removeprefix("base_model.model.")
             for k in load_file(str(version / WEIGHTS))}
    return stack.slice_bytes(sorted(names))


@pytest.fixture(scope="module")
def safety_root(adapters_root: Path, tiny_base: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("safety")
    root = Path(shutil.copytree(adapters_root, work / "adapters"))
    alpha = root / "alpha" / "1"
    for name, damage in (("corrupt", _truncate), ("garbage", _garbage_header), ("nan", _nan),
                         ("half", _half_written), ("pickled", _pickled)):
        damage(Path(shutil.copytree(alpha, root / name / "1")))
    outside = Path(shutil.copytree(alpha, work / "outside"))
    (root / "escape").mkdir()
    os.symlink(outside, root / "escape" / "1")
    leak = Path(shutil.copytree(alpha, root / "leak" / "1"))
    (leak / WEIGHTS).unlink()
    os.symlink(outside / WEIGHTS, leak / WEIGHTS)
    write_random_adapter(tiny_base, root, "big", 1, seed=5, rank=16)
    _with_lm_head(Path(shutil.copytree(alpha, root / "wide" / "1")), tiny_base)
    return root


@pytest.fixture(scope="module")
def limits(safety_root: Path, tiny_base: Path) -> tuple[int, int]:
    """(max_adapter_bytes, adapter_memory_budget_bytes): the first lets every fixture adapter
    but big@1 be read, the second holds one all-linear adapter but not wide@1 (+ lm_head)."""
    size = {n: (safety_root / n / "1" / WEIGHTS).stat().st_size for n in ("alpha", "big", "wide")}
    max_bytes = (size["wide"] + size["big"]) // 2
    assert size["alpha"] < max_bytes and size["wide"] < max_bytes < size["big"]
    alpha = _memory_bytes(tiny_base, safety_root / "alpha" / "1")
    wide = _memory_bytes(tiny_base, safety_root / "wide" / "1")
    assert alpha < wide < 2 * alpha
    return max_bytes, (alpha + wide) // 2


@pytest.fixture(scope="module")
def server(tiny_base: Path, safety_root: Path, limits: tuple[int, int]
           ) -> Iterator[RunningServer]:
    max_bytes, budget = limits
    config = ServerConfig.build(
        base=str(tiny_base), adapters_root=safety_root, port=0, device="cpu", max_batch=4,
        default_max_new_tokens=4, max_adapter_bytes=max_bytes, adapter_memory_budget_bytes=budget,
        shutdown_grace_seconds=0.5, sessions_db=None)
    running = start_in_thread(config)
    yield running
    running.stop()


def chat(adapter: str, max_new_tokens: int = 2, **sampling) -> pb.ChatRequest:
    return pb.ChatRequest(messages=[pb.Message(role="user", content="hello there")],
                          adapter=adapter,
                          sampling=pb.SamplingParams(max_new_tokens=max_new_tokens, **sampling))


def loaded(admin: pb_grpc.AdapterServiceStub) -> set[str]:
    listing = admin.ListAdapters(pb.ListAdaptersRequest(), timeout=30)
    return {f"{a.name}@{a.version}" for a in listing.adapters if a.loaded}


FAILED = grpc.StatusCode.FAILED_PRECONDITION
BROKEN = {
    "truncated weights": ("corrupt@1", FAILED, "adapter_model.safetensors is unreadable"),
    "garbage header": ("garbage@1", FAILED, "adapter_model.safetensors is unreadable"),
    "NaN weights": ("nan@1", FAILED, "holds NaN or infinite values"),
    "config without weights": ("half@1", FAILED, "incomplete: missing adapter_model.safetensors"),
    "bare name, only version half-written": ("half", FAILED, "has no servable version"),
    "pickle weights": ("pickled@1", FAILED, "only safetensors weights are read"),
    "version symlinked outside": ("escape@1", FAILED, "outside the adapters root"),
    "weights symlinked outside": ("leak@1", FAILED, "outside the adapters root"),
    "weights over max_adapter_bytes": ("big@1", FAILED, "(setting max_adapter_bytes"),
    "over the memory budget": ("wide@1", grpc.StatusCode.RESOURCE_EXHAUSTED,
                               "more than the whole budget"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_bad_adapter_fails_precisely_and_the_others_keep_serving(infer, admin, case,
                                                                  safety_root) -> None:
    ref, code, phrase = BROKEN[case]
    calls = {
        "Chat": lambda: infer.Chat(chat(ref), timeout=60),
        "LoadAdapter": lambda: admin.LoadAdapter(pb.LoadAdapterRequest(adapter=ref), timeout=60),
        "Score": lambda: infer.Score(pb.ScoreRequest(
            messages=[pb.Message(role="user", content="hi")], continuation="ok", adapter=ref),
            timeout=60),
    }
    for name, call in calls.items():
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == code, (name, info.value.details())
        assert phrase in info.value.details(), (name, info.value.details())
        # Where the server keeps its files is not the caller's business (the log has it).
        assert str(safety_root) not in info.value.details(), (name, info.value.details())
    reply = infer.Chat(chat("alpha@1"), timeout=60)
    assert (reply.adapter.name, reply.adapter.version) == ("alpha", 1)
    assert reply.usage.completion_tokens > 0


def test_the_size_and_budget_messages_say_what_to_change(admin, limits) -> None:
    max_bytes, budget = limits
    with pytest.raises(grpc.RpcError) as info:
        admin.LoadAdapter(pb.LoadAdapterRequest(adapter="big@1"), timeout=60)
    assert f"over this server's limit of {max_bytes} bytes" in info.value.details()
    assert "--max-adapter-bytes" in info.value.details() and "not read" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        admin.LoadAdapter(pb.LoadAdapterRequest(adapter="wide@1"), timeout=60)
    assert "wide@1 needs " in info.value.details()
    assert f"whole budget of {budget} bytes" in info.value.details()
    assert "--adapter-memory-budget-bytes" in info.value.details()


def test_the_budget_evicts_the_least_recently_used_adapter(infer, admin) -> None:
    admin.LoadAdapter(pb.LoadAdapterRequest(adapter="alpha@1"), timeout=60)
    beta = admin.LoadAdapter(pb.LoadAdapterRequest(adapter="beta@1"), timeout=60)
    assert beta.adapter.loaded and beta.adapter.memory_bytes > 0
    assert loaded(admin) == {"beta@1"}  # the budget holds one all-linear adapter
    assert infer.Chat(chat("alpha@2"), timeout=60).adapter.version == 2
    assert loaded(admin) == {"alpha@2"}


def test_a_budget_held_by_a_running_request_is_resource_exhausted(infer, admin) -> None:
    stream = infer.ChatStream(chat("alpha@1", max_new_tokens=1500, ignore_eos=True),
                              timeout=120)
    try:
        next(stream)  # alpha@1 is loaded and pinned by a running request
        with pytest.raises(grpc.RpcError) as info:
            admin.LoadAdapter(pb.LoadAdapterRequest(adapter="beta@1"), timeout=60)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "held by adapters in use by running requests" in info.value.details()
        assert "alpha@1" in info.value.details()
        assert loaded(admin) == {"alpha@1"}
    finally:
        stream.cancel()
    with pytest.raises(grpc.RpcError):  # the rest of the stream was cancelled
        list(stream)
    for _ in range(200):
        try:
            admin.LoadAdapter(pb.LoadAdapterRequest(adapter="beta@1"), timeout=60)
            break
        except grpc.RpcError as e:  # until the server has processed the cancellation
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            time.sleep(0.05)
    assert loaded(admin) == {"beta@1"}


def test_weights_swapped_for_an_outside_symlink_after_the_scan_are_not_read(
        infer, admin, safety_root, tmp_path) -> None:
    version = Path(shutil.copytree(safety_root / "alpha" / "1", safety_root / "swapped" / "1"))
    assert "swapped" in {a.name for a in admin.ListAdapters(pb.ListAdaptersRequest(),
                                                           timeout=30).adapters}
    outside = Path(shutil.copy(version / WEIGHTS, tmp_path / WEIGHTS))
    (version / WEIGHTS).unlink()
    os.symlink(outside, version / WEIGHTS)  # after the scan that accepted the version

    with pytest.raises(grpc.RpcError) as info:
        infer.Chat(chat("swapped@1"), timeout=60)
    assert info.value.code() == FAILED, info.value.details()
    assert "now points outside the adapters root" in info.value.details()
    assert infer.Chat(chat("alpha@1"), timeout=60).usage.completion_tokens > 0
