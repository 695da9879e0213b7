"""scripts/demo.py's pure parts: its plans check themselves, and the second evaluation starts
from the first one's replay cache (a real evalsuite cache in SQLite), so the food adapter's
answers are read back, not generated twice."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest

from evalsuite.cache import ResultCache, cache_key

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "demo.py"


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("demo_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


def test_the_real_model_is_served_as_trained_with_one_batch_row_per_eval_stream(demo) -> None:
    plan = demo.PLANS["smollm2"]
    args = list(plan.server_args)
    assert args[args.index("--quantize") + 1] == "none"  # trained unquantized (trainer/smollm2)
    assert plan.eval_concurrency <= int(args[args.index("--max-batch") + 1])


@pytest.mark.parametrize("field", ["eval_limit", "eval_max_new_tokens", "eval_concurrency",
                                   "chat_max_new_tokens"])
def test_a_plan_refuses_a_count_below_one(demo, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(demo.PLANS["tiny"], **{field: 0})


def _cache_with(out: Path, adapter: str, answer: str) -> str:
    key = cache_key(adapter, "conv-1", "reference", {"max_new_tokens": 32})
    cache = ResultCache(out / "cache.sqlite")
    cache.put(key, {"answer": answer}, adapter=adapter, conversation="conv-1", mode="reference")
    cache.close()
    return key


def test_the_second_evaluation_reads_the_first_ones_answers(demo, tmp_path: Path) -> None:
    first, second = tmp_path / "eval-base", tmp_path / "eval-food"
    key = _cache_with(first, "food@1", "Hi Maria! Yum!")
    demo.seed_cache(first, second)
    cache = ResultCache(second / "cache.sqlite")
    assert cache.get(key) == {"answer": "Hi Maria! Yum!"}
    cache.close()


def test_a_cache_of_its_own_is_kept(demo, tmp_path: Path) -> None:
    first, second = tmp_path / "eval-base", tmp_path / "eval-food"
    _cache_with(first, "food@1", "from the first run")
    own = _cache_with(second, "helpdesk@1", "its own")
    demo.seed_cache(first, second)
    cache = ResultCache(second / "cache.sqlite")
    assert len(cache) == 1 and cache.get(own) == {"answer": "its own"}
    cache.close()
