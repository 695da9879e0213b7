"""Stacked multi-adapter LoRA math: every loaded adapter's A and B, in one tensor per layer.

Each targeted Linear / Linear4bit of the base is wrapped once by `StackedLoraLinear`, which
keeps the A and (scaled) B of every slot stacked. A forward either gathers the rows' slices and
runs two batched matmuls (the BGMV idea of Punica and S-LoRA, in plain torch), or multiplies by
every slot at once and zeroes each row's other slots under a mask: that reads each slot's
weights once instead of copying them per row, and launches the fewest kernels. Layers that read
one input (a layer's q, k and v projections) then share that first matmul (`SharedShrink`), as
vLLM's merged qkv LoRA does. Either way a step costs about the same whether its rows share one
adapter or use sixteen. Slot 0 is all zeros: the bare base. Ranks are padded with zeros to
`max_rank`; a forward only uses the rank its context names. `LoraStack` owns the wrappers and
the `LoraContext` they read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from server.cpu4bit import Cpu4bitLinear

BASE_SLOT = 0
# The all-slots form multiplies each token by every slot: past this many token-slot products a
# forward (a long prefill) is bound by that arithmetic, not by launches, and gathers instead.
# 32768 is 1,927 tokens over 17 slots: about 0.7 TFLOP more for a ~1B base at rank 16, some
# 1.5 ms on an H100 (estimated, not measured).
ALL_SLOTS_MAX_TOKEN_SLOTS = 1 << 15


@dataclass(frozen=True)
class LoraWeights:
    """One module's LoRA factors as PEFT stores them: A (r, in), B (out, r), and alpha/r."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


class LoraContext:
    """Which slot each row of the current forward uses; shared by every wrapped layer.

    `version` changes whenever the routing or any slot's weights change, so layers can keep
    their gathered slices across decode steps of an unchanged batch. Inside a CUDA graph no
    Python runs at replay, so there `cache_gathers` is off and every forward reads the static
    `slots` tensor afresh; `others` then marks, for each row, the slots that are not its own,
    when the layers multiply by every slot at once (None: they gather). While `seen` is a list,
    every wrapped layer notes itself and its input there and runs without LoRA.
    """

    def __init__(self) -> None:
        self.slots: torch.Tensor | None = None  # (B,) long; None = no LoRA this forward
        self.rank = 0
        self.version = 0
        self.cache_gathers = True
        self.others: torch.Tensor | None = None  # (B, S) bool
        self.others_by_row: torch.Tensor | None = None  # the same as (B, 1, S)
        self.seen: list[tuple[StackedLoraLinear, torch.Tensor]] | None = None

    def set(self, slots: torch.Tensor | None, rank: int, *, cache_gathers: bool = True,
            others: torch.Tensor | None = None) -> None:
        self.slots = slots if rank > 0 else None
        self.rank = rank
        self.cache_gathers = cache_gathers
        self.others = others
        self.others_by_row = None if others is None else others[:, None, :]
        self.version += 1


class SharedShrink:
    """The A stacks of the layers that read one input, side by side as (R, M, S, in): in the
    all-slots form the first of them to run multiplies the input by every member's A in one
    matmul and masks the product once; each member then reads its own (rows, r * S) part.

    A lone layer is a group of one. The product is kept only from the first member to the last
    of one forward, for that very input tensor (and routing), so a member called out of turn
    or with another input computes it again rather than read a stale one.
    """

    def __init__(self, a: torch.Tensor) -> None:
        self.a = a
        self.members = a.shape[1]
        self._key: tuple[torch.Tensor, int] | None = None
        self._parts: tuple[torch.Tensor, ...] | None = None
        self._a_t: tuple[int, torch.Tensor] | None = None
        self._zero = torch.zeros((), dtype=a.dtype, device=a.device)  # `where` takes no scalar

    def part(self, x: torch.Tensor, member: int, ctx: LoraContext) -> torch.Tensor:
        """Member `member`'s masked product of `x`, (B * T, r * S), columns (rank, slot)."""
        key = self._key
        if key is None or key[0] is not x or key[1] != ctx.version:
            self._parts = self._product(x, ctx)
            self._key = (x, ctx.version)
        part = self._parts[member]
        if member == self.members - 1:  # the last reader: hold neither the input nor the product
            self._key = self._parts = None
        return part

    def _product(self, x: torch.Tensor, ctx: LoraContext) -> tuple[torch.Tensor, ...]:
        r, members = ctx.rank, self.members
        if self._a_t is None or self._a_t[0] != r:
            # The rank prefix of (R, M, S, in) is one contiguous (r * M * S, in) matrix.
            self._a_t = (r, self.a[:r].view(-1, self.a.shape[-1]).t())
        batch, tokens, features = x.shape
        slots = self.a.shape[2]
        # Converted here, not by the caller: the members know their shared input by identity.
        x = x.to(self.a.dtype)
        h = torch.mm(x.reshape(batch * tokens, features), self._a_t[1])  # columns (r, M, S)
        # Zeroed, not multiplied by a 0/1 mask: 0 x inf is NaN, so a slot whose product
        # overflows (a damaged adapter) would otherwise fail every row of the step.
        if members == 1:
            h.view(batch, tokens * r, slots).masked_fill_(ctx.others_by_row, 0)
            return (h,)
        # Masked and reordered member-first in one kernel, so each member's part is contiguous.
        by_member = h.view(batch, tokens, r, members, slots).permute(3, 0, 1, 2, 4)
        parts = torch.empty(by_member.shape, dtype=h.dtype, device=h.device)
        shape = (members, batch, tokens * r, slots)  # the mask is (B, 1, S)
        torch.where(ctx.others_by_row, self._zero, by_member.view(shape), out=parts.view(shape))
        return parts.view(members, batch * tokens, r * slots).unbind(0)


def is_linear(module: nn.Module) -> bool:
    """A plain or 4-bit Linear (the layers LoRA can target here)."""
    if isinstance(module, nn.Linear | Cpu4bitLinear):
        return True
    try:
        import bitsandbytes as bnb
    except ImportError:  # the CPU build without bitsandbytes only has plain Linear layers
        return False
    return isinstance(module, bnb.nn.Linear4bit)


class StackedLoraLinear(nn.Module):
    """A base Linear plus the LoRA of every slot: y = base(x) + B[s] (A[s] x) per row."""

    def __init__(
        self, base_layer: nn.Module, context: LoraContext, num_slots: int, max_rank: int,
        dtype: torch.dtype, device: torch.device,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.context = context
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        # Rank first, so a rank prefix is contiguous and flattens to one (r * S, features)
        # matrix for the all-slots product: A (R, S, in), B^T (R, S, out).
        self.register_buffer(
            "lora_a", torch.zeros(max_rank, num_slots, self.in_features, dtype=dtype, device=device)
        )
        self.register_buffer(
            "lora_bt",
            torch.zeros(max_rank, num_slots, self.out_features, dtype=dtype, device=device),
        )
        self.shrink = SharedShrink(self.lora_a.view(max_rank, 1, num_slots, self.in_features))
        self.member = 0  # this layer's index in `shrink`
        self._gathered_version = -1
        self._a_rows: torch.Tensor | None = None
        self._bt_rows: torch.Tensor | None = None
        self._bt_flat: tuple[int, torch.Tensor] | None = None

    def share(self, shrink: SharedShrink, member: int) -> None:
        """Read A from `member` of a shrink shared with the layers that read the same input."""
        shrink.a[:, member].copy_(self.lora_a)
        self.lora_a = shrink.a[:, member]
        self.shrink, self.member = shrink, member

    def install(self, slot: int, weights: LoraWeights | None) -> None:
        """Write one slot (zeros beyond the adapter's rank; all zeros when `weights` is None)."""
        self.lora_a[:, slot].zero_()
        self.lora_bt[:, slot].zero_()
        if weights is not None:
            r = weights.rank
            self.lora_a[:r, slot].copy_(weights.a)
            # Fold alpha/r into B once, so the forward needs no per-row scaling.
            self.lora_bt[:r, slot].copy_(weights.b.t() * weights.scaling)

    def _gather(self) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = self.context
        if not ctx.cache_gathers:
            return self._gathered(ctx)
        if self._gathered_version != ctx.version:
            # Per-row slices of the stacks, gathered once per batch layout, not once per step;
            # made contiguous then, since the CPU's bmm would copy strided operands every step.
            a_rows, bt_rows = self._gathered(ctx)
            self._a_rows, self._bt_rows = a_rows.contiguous(), bt_rows.contiguous()
            self._gathered_version = ctx.version
        return self._a_rows, self._bt_rows

    def _gathered(self, ctx: LoraContext) -> tuple[torch.Tensor, torch.Tensor]:
        r = ctx.rank
        # Slice the rank before gathering, so only r of max_rank rows are copied.
        a_rows = self.lora_a[:r].index_select(1, ctx.slots)  # (r, B, in)
        bt_rows = self.lora_bt[:r].index_select(1, ctx.slots)  # (r, B, out)
        # Both (B, r, features): made contiguous, that is a copy of whole rows, where A as
        # (B, in, r) would be a transposing copy, 4-6x slower on a CPU. The forward reads A
        # transposed, which BLAS does without a copy.
        return a_rows.transpose(0, 1), bt_rows.transpose(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        ctx = self.context
        if ctx.seen is not None:
            ctx.seen.append((self, x))
            return result
        if ctx.slots is None:
            return result
        if x.shape[0] != ctx.slots.shape[0]:
            raise ValueError(
                f"LoRA routing has {ctx.slots.shape[0]} rows but the batch has {x.shape[0]}"
            )
        if (ctx.others is not None
                and x.shape[0] * x.shape[1] * self.lora_a.shape[1] <= ALL_SLOTS_MAX_TOKEN_SLOTS):
            return self._all_slots(x, result, ctx)
        if x.dtype != self.lora_a.dtype:
            x = x.to(self.lora_a.dtype)
        a_rows, bt_rows = self._gather()
        h = torch.bmm(x, a_rows.transpose(1, 2))  # (B, T, in) @ (B, in, r) -> (B, T, r)
        if result.dtype == h.dtype:
            # result += h @ B^T in one kernel, (B, T, r) @ (B, r, out), in place: the base
            # layer's output is this forward's own, and out of place it would be copied first.
            return result.baddbmm_(h, bt_rows)
        return result + torch.bmm(h, bt_rows).to(result.dtype)

    def _all_slots(self, x: torch.Tensor, result: torch.Tensor,
                   ctx: LoraContext) -> torch.Tensor:
        """result + B[s] A[s] x for each row's slot s, as x through every slot, masked."""
        shrunk = self.shrink.part(x, self.member, ctx)
        r = ctx.rank
        if self._bt_flat is None or self._bt_flat[0] != r:
            self._bt_flat = (r, self.lora_bt[:r].view(-1, self.out_features))
        bt = self._bt_flat[1]
        if result.dtype == shrunk.dtype and result.is_contiguous():
            # result += h @ B^T in one kernel, in place (as above): in a CUDA graph step at
            # small batches, each kernel costs its launch more than its arithmetic.
            result.view(-1, self.out_features).addmm_(shrunk, bt)
            return result
        return result + (shrunk @ bt).view(result.shape).to(result.dtype)


def _parent_and_name(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


class LoraStack:
    """All slots of every wrapped layer of one base model; mutated only on the engine thread."""

    def __init__(self, model: nn.Module, num_slots: int, max_rank: int, *,
                 launch_bound: bool | None = None) -> None:
        if num_slots < 2:
            raise ValueError(f"num_slots must be >= 2 (slot 0 is the base), got {num_slots}")
        self.model = model
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.context = LoraContext()
        self._dtype, self._device = _compute_dtype_and_device(model)
        # Where launching kernels, not arithmetic, bounds a forward (CUDA, default there), every
        # forward takes the all-slots form, which launches the fewest; elsewhere eager ones
        # gather, which multiplies S times less.
        self.launch_bound = self._device.type == "cuda" if launch_bound is None else launch_bound
        self._inputs_shared = False
        self._wrapped: dict[str, StackedLoraLinear] = {}
        self._slot_ranks = [0] * num_slots
        self._slot_modules: list[frozenset[str]] = [frozenset()] * num_slots
        # (in_features, out_features) of every LoRA-able Linear, for validating adapters on
        # any thread: immutable after construction.
        self.module_shapes: Mapping[str, tuple[int, int]] = {
            name: (module.in_features, module.out_features)
            for name, module in model.named_modules()
            if is_linear(module) and not isinstance(module, StackedLoraLinear)
        }

    def slice_bytes(self, module_names: Sequence[str]) -> int:
        """Bytes one slot takes in the given modules' stacks (ranks padded to max_rank)."""
        itemsize = torch.empty((), dtype=self._dtype).element_size()
        return sum(
            self.max_rank * (self.module_shapes[n][0] + self.module_shapes[n][1]) * itemsize
            for n in module_names
        )

    def install(self, slot: int, modules: Mapping[str, LoraWeights]) -> int:
        """Put an adapter into `slot` (clearing what was there); return its memory in bytes."""
        if not 0 < slot < self.num_slots:
            raise ValueError(f"slot must be in 1..{self.num_slots - 1}, got {slot}")
        for name in modules:
            self._wrap(name)
        for name in self._slot_modules[slot] - modules.keys():
            self._wrapped[name].install(slot, None)
        for name, weights in modules.items():
            self._wrapped[name].install(slot, weights)
        self._slot_modules[slot] = frozenset(modules)
        self._slot_ranks[slot] = max(w.rank for w in modules.values())
        self.context.version += 1  # cached gathers may hold this slot's old weights
        return self.slice_bytes(list(modules))

    def wrap_all(self) -> None:
        """Wrap every LoRA-able layer now (a captured CUDA graph must see every wrapper that
        a later adapter could need), and let the layers that read one input share a shrink."""
        for name in self.module_shapes:
            self._wrap(name)
        if not self._inputs_shared:
            self._share_inputs()
            self._inputs_shared = True

    def _share_inputs(self) -> None:
        """Run one token through the model to see which layers read the very same tensor (no
        names of any architecture assumed), and give each such group one `SharedShrink`."""
        seen: list[tuple[StackedLoraLinear, torch.Tensor]] = []
        self.context.seen = seen
        try:
            with torch.inference_mode():
                self.model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=self._device),
                           use_cache=False)
        finally:
            self.context.seen = None
        # `seen` keeps every input alive, so no two of them share an id meanwhile.
        groups: dict[int, list[StackedLoraLinear]] = {}
        placed: set[int] = set()
        for layer, x in seen:
            if id(layer) not in placed:  # a layer run twice joins the group it ran in first
                placed.add(id(layer))
                groups.setdefault(id(x), []).append(layer)
        for members in groups.values():
            if len(members) > 1:
                a = torch.zeros(self.max_rank, len(members), self.num_slots,
                                members[0].in_features, dtype=self._dtype, device=self._device)
                shrink = SharedShrink(a)
                for member, layer in enumerate(members):
                    layer.share(shrink, member)

    def _wrap(self, name: str) -> None:
        if name in self._wrapped:
            return
        parent, child = _parent_and_name(self.model, name)
        wrapper = StackedLoraLinear(
            getattr(parent, child), self.context, self.num_slots, self.max_rank,
            self._dtype, self._device,
        )
        setattr(parent, child, wrapper)
        self._wrapped[name] = wrapper

    def route(self, slots: Sequence[int], index: torch.Tensor | None = None) -> None:
        """Set the per-row slots for the next forward passes (slot 0 = bare base); `index`,
        when given, already holds `slots` on the model's device (no new tensor is made)."""
        empty = sorted({s for s in slots if s != BASE_SLOT and self._slot_ranks[s] == 0})
        if empty:
            raise ValueError(f"rows are routed to LoRA slots with no adapter installed: {empty}")
        rank = max((self._slot_ranks[s] for s in slots), default=0)
        if rank == 0:
            self.context.set(None, 0)
            return
        if index is None:
            index = torch.tensor(list(slots), dtype=torch.long, device=self._device)
        others = self._others_of(index) if self.launch_bound else None
        self.context.set(index, rank, others=others)

    def route_static(self, index: torch.Tensor, rank: int) -> None:
        """Route from a static slots tensor at `rank`, reading it every forward (for CUDA graph
        capture: the replay reads whatever `index` holds then; see `refresh_static`)."""
        others = None
        if self.launch_bound or 2 * index.shape[0] >= self.num_slots:
            # Launch-bound, or enough rows that reading every slot once beats copying one
            # slice per row (on the CPU, where only tests capture).
            others = self._others_of(index)
        self.context.set(index, rank, cache_gathers=False, others=others)

    def refresh_static(self) -> None:
        """Recompute the other-slots mask from the static slots, in place (part of each
        captured step, so a replay masks with the slots the rows hold then)."""
        ctx = self.context
        if ctx.others is not None and ctx.slots is not None:
            _mark_others(ctx.others, ctx.slots)

    def _others_of(self, index: torch.Tensor) -> torch.Tensor:
        """A new (rows, slots) mask of the slots each row of `index` does not use."""
        others = torch.empty(index.shape[0], self.num_slots, dtype=torch.bool,
                             device=index.device)
        return _mark_others(others, index)

    @property
    def installed_rank(self) -> int:
        """The largest rank of any adapter installed now (0 when none is)."""
        return max(self._slot_ranks)


def _mark_others(others: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """In place: True everywhere but at each row's own slot."""
    return others.fill_(True).scatter_(1, slots[:, None], False)


def _compute_dtype_and_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The dtype activations flow in (the embeddings'), and the model's device."""
    embeddings = model.get_input_embeddings()
    return embeddings.weight.dtype, embeddings.weight.device
