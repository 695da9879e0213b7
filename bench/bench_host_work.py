"""The host's share of a GPU step, counted or timed on any machine, each form beside its baseline.

  (a) LoRA launches: the kernel-launching aten ops (and all aten calls) LoRA adds to one
      forward of a randomly initialised Llama of --layers layers (tiny widths: the count does
      not depend on them), rows over distinct adapters, for each form `server.lora` has: the
      gathered rows (the CPU's form; a prefill gathers afresh), every slot at once per layer, and
      every slot at once with the layers that read one input sharing their shrink (CUDA's
      form, for prefills and captured decode steps). Counted with a TorchDispatchMode: on CUDA
      each kernel op is one launch, replayed from a graph in a decode step.
  (b) Waking readers: what the engine thread spends handing one step's tokens to --rows async
      readers (one asyncio loop on another thread), waking each reader with its own
      `call_soon_threadsafe` vs one call per loop for the whole step (`server.request.Wakeups`).

    .venv/bin/python bench/bench_host_work.py [--layers 16] [--rows 64] [--out host_work.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from server.lora import LoraStack, LoraWeights
from server.output import OutputProcessor
from server.request import RequestHandle, Wakeups

# Aten ops that make no kernel: views, metadata, allocation, and no-op conversions.
NO_KERNEL = frozenset({
    "view", "_unsafe_view", "t", "transpose", "permute", "select", "slice", "unsqueeze",
    "squeeze", "expand", "unbind", "as_strided", "alias", "detach", "_reshape_alias",
    "lift_fresh", "empty", "empty_like", "to", "reshape", "contiguous"})


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        self.ops.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def _llama(layers: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    return LlamaForCausalLM(config).eval()


def _stack(layers: int, adapters: int, rank: int, *, launch_bound: bool, shared: bool,
           ) -> LoraStack:
    torch.manual_seed(0)
    stack = LoraStack(_llama(layers), num_slots=adapters + 1, max_rank=64,
                      launch_bound=launch_bound)
    # Every linear, lm_head too, so that each form wraps the same layers.
    for slot in range(1, adapters + 1):
        stack.install(slot, {
            name: LoraWeights(torch.randn(rank, s[0]) * 0.01, torch.randn(s[1], rank) * 0.01, 2.0)
            for name, s in stack.module_shapes.items()})
    if shared:
        stack.wrap_all()  # the engine does this on CUDA; it finds the layers that share inputs
    return stack


def _counted(stack: LoraStack, ids: torch.Tensor, route: Callable[[], None] | None,
             ) -> tuple[int, int]:
    """(aten calls, kernel ops) of one forward after `route` (None: no LoRA)."""
    with torch.inference_mode():
        if route is None:
            stack.context.set(None, 0)
        else:
            route()
            stack.model(input_ids=ids, use_cache=False)  # per-rank views made once
            route()  # a new batch layout again, as a prefill sees it
        with OpCounter() as counter:
            if route is not None:
                stack.refresh_static()  # part of a captured step; nothing outside one
            stack.model(input_ids=ids, use_cache=False)
    return len(counter.ops), sum(op not in NO_KERNEL for op in counter.ops)


def lora_launches(args: argparse.Namespace) -> list[dict[str, Any]]:
    forms = {"gathered rows (CPU)": (False, False),
             "every slot, per layer": (True, False),
             "every slot, shared shrinks (CUDA)": (True, True)}
    rows = []
    for shape, tokens in (("prefill", args.prefill_tokens), ("decode step", 1)):
        ids = torch.randint(0, 512, (args.rows_lora, tokens))
        slots = [1 + i % args.adapters for i in range(args.rows_lora)]
        for form, (launch_bound, shared) in forms.items():
            if shape == "decode step" and not launch_bound:
                continue  # only CUDA captures decode steps
            stack = _stack(args.layers, args.adapters, args.rank, launch_bound=launch_bound,
                           shared=shared)
            route = (partial(stack.route_static, torch.tensor(slots), args.rank)
                     if shape == "decode step" else partial(stack.route, slots))
            bare = _counted(stack, ids, None)
            lora = _counted(stack, ids, route)
            rows.append({"shape": shape, "tokens": tokens, "form": form,
                         "lora_aten_calls": lora[0] - bare[0],
                         "lora_kernel_ops": lora[1] - bare[1],
                         "bare_kernel_ops": bare[1]})
    return rows


class _Letters:
    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        return "".join(chr(97 + i % 26) for i in ids)


def push_seconds(rows: int, steps: int, step_s: float, batched: bool) -> list[float]:
    """Seconds the pushing thread spent per step handing `rows` tokens to async readers."""
    handles = [RequestHandle(f"r{i}", OutputProcessor(_Letters(), [0], ()), 1)
               for i in range(rows)]
    loop = asyncio.new_event_loop()

    async def read(handle: RequestHandle) -> None:
        async for _ in handle:
            pass

    async def read_all() -> None:
        await asyncio.gather(*map(read, handles))

    reader = threading.Thread(target=lambda: loop.run_until_complete(read_all()))
    reader.start()
    time.sleep(0.2)  # every reader asleep on its first token
    wakeups = Wakeups() if batched else None
    spent = []
    for step in range(steps):
        finish = "length" if step == steps - 1 else None
        started = time.perf_counter()
        for handle in handles:
            handle.push_token(step % 26, False, finish, wakeups)
        if wakeups is not None:
            wakeups.flush()
        spent.append(time.perf_counter() - started)
        time.sleep(step_s)  # the device's step, during which the readers run
    reader.join()
    loop.close()
    return spent


def wake_costs(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for rounds in range(args.rounds):  # alternated, as the machine's load drifts
        for form, batched in (("a call per reader", False), ("one call per loop", True)):
            spent = sorted(push_seconds(args.rows, args.steps, args.step_ms / 1e3, batched))
            rows.append({"round": rounds, "form": form, "rows": args.rows,
                         "median_ms": statistics.median(spent) * 1e3,
                         "p90_ms": spent[int(0.9 * len(spent))] * 1e3})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16, help="(a): the kit's 1B shape has 16")
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rows-lora", type=int, default=16, help="(a): rows of the forward")
    parser.add_argument("--prefill-tokens", type=int, default=32)
    parser.add_argument("--rows", type=int, default=64, help="(b): streams of one step")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--step-ms", type=float, default=5.0,
                        help="(b): the device's step between two pushes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    launches = lora_launches(args)
    print(f"(a) LoRA ops per forward, {args.layers}-layer Llama, {args.rows_lora} rows over "
          f"{args.adapters} adapters, rank {args.rank}")
    print(f"  {'shape':12s} {'form':36s} {'kernel ops':>10s} {'aten calls':>10s}")
    for row in launches:
        print(f"  {row['shape']:12s} {row['form']:36s} {row['lora_kernel_ops']:10d} "
              f"{row['lora_aten_calls']:10d}")
    wakes = wake_costs(args)
    print(f"(b) engine thread per step, handing {args.rows} tokens to async readers")
    print(f"  {'round':>5s} {'form':20s} {'median ms':>9s} {'p90 ms':>7s}")
    for row in wakes:
        print(f"  {row['round']:5d} {row['form']:20s} {row['median_ms']:9.3f} "
              f"{row['p90_ms']:7.3f}")
    if args.out is not None:
        args.out.write_text(json.dumps({"lora_launches": launches, "wakeups": wakes}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
