"""A finished `evalsuite run` on disk (test set, replayed answers and report), made from fixed
answers without a server, for the tests of the `ab` rating workflow. (A module, not a second
conftest.py: the suite's tests import `conftest` by name and must get tests/conftest.py.)"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from evalsuite.gate import Gate
from evalsuite.replay import ConversationResult, TurnResult
from evalsuite.report import RunInfo, build_report
from evalsuite.stats import BootstrapConfig
from evalsuite.testsets import dataset_fingerprint, load_testset

BASELINE = "__base__"
# Each adapter's answers carry a word of their own (never its name, which must not leak).
VOICES = {BASELINE: "plain", "alpha@1": "first", "beta@2": "second", "gamma@1": "third"}


def answer(adapter: str, conversation: int, turn: int) -> str:
    """What each adapter "said" to question `conversation`.`turn`."""
    return f"{VOICES[adapter]} answer to question {conversation}.{turn}"


def write_run(out: Path, *, conversations: int = 6, turns: int = 2,
              candidates: Sequence[str] = ("alpha@1",), gate: Gate | None = None,
              mode: str = "reference", failed: Sequence[tuple[str, int, int]] = ()) -> Path:
    """A test set and a report in `out` as `evalsuite run --out out` leaves them; `failed`
    lists (adapter, conversation, turn) answers that failed."""
    out.mkdir(parents=True, exist_ok=True)
    testset = out / "test.jsonl"
    lines = []
    for i in range(conversations):
        messages = []
        for j in range(turns):
            messages += [{"role": "user", "content": f"question {i}.{j}"},
                         {"role": "assistant", "content": f"reference {i}.{j}"}]
        lines.append(json.dumps({"id": f"c{i}", "messages": messages}))
    testset.write_text("\n".join(lines) + "\n")
    convs = load_testset([testset])
    results = {}
    for adapter in (BASELINE, *candidates):
        results[adapter] = [ConversationResult(
            conv.id, conv.hash, adapter, mode,
            [TurnResult(index=j, reference=f"reference {i}.{j}",
                        prediction=answer(adapter, i, j), completion_tokens=4, total_s=0.1,
                        status="failed" if (adapter, i, j) in failed else "ok",
                        error_code="INTERNAL" if (adapter, i, j) in failed else "")
             for j in range(turns)]) for i, conv in enumerate(convs)]
    info = RunInfo(target="127.0.0.1:1", testsets=(str(testset),),
                   testset_fingerprint=dataset_fingerprint(convs), mode=mode,
                   sampling={"max_new_tokens": 8}, concurrency=1,
                   requested={c: c for c in candidates}, baseline=BASELINE,
                   gate_file="gate.yaml" if gate else "")
    report = build_report(results, info, gate, BootstrapConfig(n_resamples=50),
                          names=["rougeL", "failure_rate"])
    # report.json is all `ab` reads; rendering the Markdown and HTML is left to `ab results`.
    (out / "report.json").write_text(json.dumps(report), encoding="utf-8")
    return out
