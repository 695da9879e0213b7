"""More adapters in flight than slots, on the real server: requests wait for their adapter.

200 adapters on disk, 8 slots, Zipf-distributed traffic from 32 concurrent streams: no request
fails, and every answer is the one its adapter gives when asked alone.
"""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import save_file
from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

from common.modeling import base_fingerprint
from server.app import start_in_thread
from server.config import ServerConfig

ADAPTERS = 200
SLOTS = 8
STREAMS = 32
REQUESTS_PER_STREAM = 3
TOKENS = 4
PROMPT = "Tell me about your day"


def write_small_adapters(base: Path, root: Path, count: int) -> None:
    """`count` rank-4 PEFT adapters on every q_proj / v_proj, random and strong enough that
    different adapters answer differently; written directly, without loading the model."""
    config = json.loads((base / "config.json").read_text())
    hidden, layers, rank = config["hidden_size"], config["num_hidden_layers"], 4
    fingerprint = base_fingerprint(str(base))
    generator = torch.Generator().manual_seed(0)
    for index in range(count):
        out = root / f"zipf{index}" / "1"
        out.mkdir(parents=True)
        tensors = {}
        for layer in range(layers):
            for module in ("q_proj", "v_proj"):
                prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
                tensors[f"{prefix}.lora_A.weight"] = torch.randn(
                    rank, hidden, generator=generator) / hidden**0.5
                tensors[f"{prefix}.lora_B.weight"] = torch.randn(hidden, rank, generator=generator)
        save_file(tensors, str(out / "adapter_model.safetensors"))
        (out / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "bias": "none",
            "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": str(base),
            "task_type": "CAUSAL_LM"}))
        (out / "manifest.json").write_text(json.dumps({
            "name": f"zipf{index}", "version": 1, "created": datetime.now(UTC).isoformat(),
            "base": {"path_or_id": str(base), "fingerprint": fingerprint}}))


@pytest.fixture(scope="module")
def stub(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("zipf") / "adapters"
    write_small_adapters(tiny_base, root, ADAPTERS)
    running = start_in_thread(ServerConfig.build(
        base=str(tiny_base), adapters_root=root, port=0, device="cpu", max_batch=16,
        max_loaded_adapters=SLOTS, max_queue=256, context_length=256, sessions_db=None))
    channel = grpc.insecure_channel(running.target)
    yield pb_grpc.InferenceServiceStub(channel)
    channel.close()
    running.stop()


def ask(stub: pb_grpc.InferenceServiceStub, adapter: str) -> str:
    response = stub.Chat(pb.ChatRequest(
        adapter=adapter, messages=[pb.Message(role="user", content=PROMPT)],
        sampling=pb.SamplingParams(max_new_tokens=TOKENS, ignore_eos=True)), timeout=300)
    assert (response.adapter.name, response.adapter.version) == (adapter, 1)
    return response.text


def zipf_traffic(seed: int) -> list[list[str]]:
    """For each stream, the adapters it asks for, drawn with weight 1/k^1.1 by popularity."""
    rng = random.Random(seed)
    names = [f"zipf{k}" for k in range(ADAPTERS)]
    weights = [1 / (k + 1) ** 1.1 for k in range(ADAPTERS)]
    return [rng.choices(names, weights, k=REQUESTS_PER_STREAM) for _ in range(STREAMS)]


def test_zipf_traffic_over_more_adapters_than_slots_never_fails(stub):
    traffic = zipf_traffic(seed=1)
    with ThreadPoolExecutor(STREAMS) as pool:
        answers = list(pool.map(lambda names: [(n, ask(stub, n)) for n in names], traffic))
    asked = sorted({name for stream in traffic for name in stream})
    assert len(asked) > 2 * SLOTS  # far more adapters in flight than there are slots
    alone = {name: ask(stub, name) for name in asked}  # one at a time, nothing else running
    assert len(set(alone.values())) > len(asked) // 2  # adapters really answer differently
    for stream in answers:
        for name, text in stream:
            assert text == alone[name], f"{name} answered as another adapter would"
