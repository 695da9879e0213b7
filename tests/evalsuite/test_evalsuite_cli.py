"""`evalsuite run` / `promote`: reports from a fixed result set, promotion rules, exit codes, and
one end-to-end run against the real server (tiny base, random adapters) that resumes from cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import free_port

from evalsuite.cli import main
from evalsuite.gate import gate_from_mapping
from evalsuite.promote import PromotionRefused, promote
from evalsuite.replay import ConversationResult, TurnResult
from evalsuite.report import RunInfo, build_report, write_reports
from evalsuite.stats import BootstrapConfig

# ---------------------------------------------------------------- a fixed result set

ANSWERS = {
    "__base__": "hello there friend",
    "alpha@1": "your order {n} ships on Monday",
    "beta@1": "the weather is nice today",
}


def fixed_results() -> dict[str, list[ConversationResult]]:
    out: dict[str, list[ConversationResult]] = {}
    for key, answer in ANSWERS.items():
        convs = []
        for n in range(6):
            turns = [
                TurnResult(index=j, reference=f"your order {n} ships on Monday",
                           prediction=answer.format(n=n), completion_tokens=5 + j,
                           ttft_s=0.01 * (n + 1), total_s=0.05 * (n + 1) * (2 if "beta" in key
                                                                              else 1),
                           log_likelihood=-3.0 - n, score_tokens=6,
                           adapter_name=key.partition("@")[0] if "@" in key else "",
                           adapter_version=1 if "@" in key else 0)
                for j in range(2)
            ]
            convs.append(ConversationResult(f"c{n}", f"sha256:{n}", key, "reference", turns,
                                            facts=(str(n),)))
        out[key] = convs
    return out


INFO = RunInfo(target="127.0.0.1:1", testsets=("test.jsonl",), testset_fingerprint="sha256:ab",
               mode="reference", sampling={"max_new_tokens": 8}, concurrency=2,
               requested={"alpha@1": "alpha"}, baseline="__base__", gate_file="gate.yaml")
GATE = gate_from_mapping({"rougeL": {"max_drop": 0.01}, "p95_latency_ms": {"max_increase_pct": 10}})


def strict_json(path: Path) -> dict:
    def no_nan(value: str) -> None:
        raise AssertionError(f"{path} holds {value}, which is not JSON")
    return json.loads(path.read_text(), parse_constant=no_nan)


def test_report_files_render_from_a_fixed_result_set(tmp_path: Path) -> None:
    report = build_report(fixed_results(), INFO, GATE, BootstrapConfig(n_resamples=200))
    paths = write_reports(report, tmp_path)
    data = strict_json(paths["json"])
    assert data["candidates"] == ["alpha@1", "beta@1"]
    assert data["adapters"][1] == {"key": "alpha@1", "requested": "alpha"}
    alpha = data["comparisons"]["alpha@1"]["rougeL"]
    assert alpha["delta"] > 0.5 and alpha["ci_low"] > 0 and alpha["wins"] == 6
    assert data["results"]["alpha@1"]["metrics"]["fact_recall"]["value"] == 1.0
    assert data["gate"]["results"]["alpha@1"]["passed"] is True
    beta = data["gate"]["results"]["beta@1"]
    assert not beta["passed"] and not data["passed"]
    assert [c["metric"] for c in beta["checks"] if not c["passed"]] == ["p95_latency_ms"]
    assert data["results"]["beta@1"]["corpus"]["bleu"]["signature"].startswith("nrefs:1")
    assert len(data["conversations"]["beta@1"]) == 6
    assert data["examples"][0]["answers"]["alpha@1"].startswith("your order")

    md = paths["md"].read_text()
    assert md.startswith("# Evaluation report\n\n**FAILED**")
    assert "| alpha@1 | rougeL | " in md and "| beta@1 | p95_latency_ms | max_increase_pct" in md
    assert "signature `nrefs:1|case:mixed|eff:no|tok:13a" in md

    page = paths["html"].read_text()
    assert page.count("data:image/png;base64,") == 2
    assert "Where the answers differ most" in page and "your order 4 ships" in page


def test_report_without_a_gate_passes_and_says_so(tmp_path: Path) -> None:
    report = build_report(fixed_results(), INFO, None, BootstrapConfig(n_resamples=50),
                          names=["rougeL", "perplexity"])
    assert report["passed"] and report["gate"] is None
    assert list(report["metrics"]) == ["rougeL", "perplexity"]
    md = write_reports(report, tmp_path)["md"].read_text()
    assert "No gate (`--gate none`): report only" in md


# ---------------------------------------------------------------- promotion rules

class AliasBook:
    """Records SetAlias calls the way the server answers them (previous target)."""

    def __init__(self) -> None:
        self.aliases: dict[str, str] = {"prod": "alpha@0"}
        self.reasons: list[str] = []

    def set_alias(self, alias: str, target: str, *, reason: str = ""):
        previous = self.aliases.get(alias, "")
        self.aliases[alias] = target
        self.reasons.append(reason)
        return type("AliasInfo", (), {"previous": previous})()


def write_fixed_report(tmp_path: Path, gate=GATE) -> Path:
    write_reports(build_report(fixed_results(), INFO, gate, BootstrapConfig(n_resamples=50)),
                  tmp_path)
    return tmp_path


def test_promotion_happens_only_for_a_passing_candidate(tmp_path: Path) -> None:
    report_dir = write_fixed_report(tmp_path / "r")
    book = AliasBook()
    for candidate, why in [("beta@1", "the gate failed for beta@1: p95_latency_ms"),
                           ("alpha", "candidate must be NAME@VERSION"),
                           ("alpha@2", "alpha@2 is not a candidate in this report"),
                           ("__base__@0", "not a candidate")]:
        with pytest.raises(PromotionRefused, match=why):
            promote(book, alias="prod", candidate=candidate, report_dir=report_dir, server="s")
    assert book.aliases == {"prod": "alpha@0"}
    rec = promote(book, alias="prod", candidate="alpha@1", report_dir=report_dir, server="s",
                  record=tmp_path / "adapters" / "promotions.jsonl")
    assert book.aliases == {"prod": "alpha@1"}
    assert (rec.target, rec.previous, rec.report) == ("alpha@1", "alpha@0",
                                                      str(report_dir.resolve()))
    for log in (report_dir / "promotions.jsonl", tmp_path / "adapters" / "promotions.jsonl"):
        lines = log.read_text().splitlines()
        assert len(lines) == 1 and json.loads(lines[0])["who"] == rec.who
    # The server's alias history gets who, when, which report and the gate's verdict.
    (reason,) = book.reasons
    assert reason == json.dumps(json.loads(reason), sort_keys=True, separators=(",", ":"))
    assert json.loads(reason) == {
        "by": "evalsuite promote", "who": rec.who, "when": rec.when, "report": rec.report,
        "gate": {"candidate": "alpha@1", "passed": True,
                 "checks": json.loads(reason)["gate"]["checks"]}}
    assert json.loads(reason)["gate"]["checks"]


def test_promotion_needs_a_gate(tmp_path: Path) -> None:
    report_dir = write_fixed_report(tmp_path, gate=None)
    with pytest.raises(PromotionRefused, match="without a gate file"):
        promote(AliasBook(), alias="prod", candidate="alpha@1", report_dir=report_dir, server="")
    with pytest.raises(PromotionRefused, match="cannot read the report"):
        promote(AliasBook(), alias="p", candidate="a@1", report_dir=tmp_path / "no", server="")


# ---------------------------------------------------------------- exit codes without a server


def write_testset(path: Path, n: int = 2) -> Path:
    lines = [json.dumps({"messages": [{"role": "user", "content": f"hi {i}"},
                                      {"role": "assistant", "content": f"hello {i}"}],
                         "facts": [str(i)]}) for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    testset = write_testset(tmp_path / "t.jsonl")
    bad_gate = tmp_path / "g.yaml"
    bad_gate.write_text("rogueL: {max_drop: 0.1}\n")
    common = ["run", "--target", f"127.0.0.1:{free_port()}", "--out", str(tmp_path / "o")]
    cases = [
        ([*common, "--testset", str(testset), "--adapters", "a,b", "--gate", str(bad_gate)],
         "metric 'rogueL' is unknown"),
        ([*common, "--testset", str(tmp_path / "missing.jsonl"), "--adapters", "a,b"],
         "missing.jsonl"),
        ([*common, "--testset", str(testset), "--adapters", "a"], "needs a candidate"),
        ([*common, "--testset", str(testset), "--adapters", "a,a,b"], "lists an adapter twice"),
        ([*common, "--testset", str(testset), "--adapters", "a,b", "--concurrency", "0"],
         "--concurrency must be >= 1, got 0"),
        ([*common, "--testset", str(testset), "--adapters", "a,b", "--temperature", "-1"],
         "temperature must be >= 0, got -1.0"),
        (["run", "--target", "x"], "required"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err


def test_unreachable_server_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    testset = write_testset(tmp_path / "t.jsonl")
    code = main(["run", "--target", f"127.0.0.1:{free_port()}", "--testset", str(testset),
                 "--adapters", "__base__,a", "--out", str(tmp_path / "o"), "--timeout", "2",
                 "--no-progress"])
    assert code == 2
    assert "UNAVAILABLE" in capsys.readouterr().err


# ---------------------------------------------------------------- end to end, real server

@pytest.fixture(scope="module")
def server(tiny_base: Path, adapters_root: Path, tmp_path_factory: pytest.TempPathFactory):
    from server.app import start_in_thread
    from server.config import ServerConfig

    # Promotion moves aliases: work on a copy so the shared fixture stays as other tests expect.
    root = tmp_path_factory.mktemp("eval-adapters") / "adapters"
    shutil.copytree(adapters_root, root)
    running = start_in_thread(ServerConfig.build(base=str(tiny_base), adapters_root=root,
                                                 port=0, device="cpu", max_batch=8,
                                                 sessions_db=None))
    yield running
    running.stop()


def test_run_gate_cache_and_promotion_end_to_end(
    server, bundled_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from clients.client import SwitchboardClient

    domain = sorted(p for p in bundled_data.iterdir() if (p / "test.jsonl").exists())[0]
    out = tmp_path / "report"
    passing, failing = tmp_path / "pass.yaml", tmp_path / "fail.yaml"
    passing.write_text("failure_rate: {max_value: 0}\nrougeL: {max_drop: 1.0}\n")
    failing.write_text("answer_length: {max_value: 0.5}\n")
    argv = ["run", "--target", server.target, "--testset", str(domain / "test.jsonl"),
            "--limit", "3", "--adapters", "alpha@1,beta,__base__", "--max-new-tokens", "6",
            "--concurrency", "4", "--bootstrap", "100", "--out", str(out), "--no-progress"]

    assert main([*argv, "--gate", str(passing)]) == 0
    first = strict_json(out / "report.json")
    assert first["baseline"] == "__base__" and first["candidates"] == ["alpha@1", "beta@1"]
    assert {a["requested"] for a in first["adapters"]} == {"alpha@1", "beta", "__base__"}
    assert first["results"]["beta@1"]["adapter_versions"] == ["beta@1"]
    assert first["results"]["alpha@1"]["failures"] == {}
    assert first["results"]["alpha@1"]["cached_conversations"] == 0
    assert first["results"]["__base__"]["metrics"]["perplexity"]["value"] > 1
    assert (out / "report.md").exists() and (out / "report.html").stat().st_size > 10_000
    assert "| alpha@1 | rougeL |" in capsys.readouterr().out

    assert main(["promote", "--target", server.target, "--alias", "prod", "--candidate",
                 "alpha@1", "--report", str(out), "--record", str(tmp_path / "log.jsonl")]) == 0
    with SwitchboardClient(server.target) as client:
        assert {a.alias: a.target for a in client.list_aliases()}["prod"] == "alpha@1"
        promoted = client.alias_history("prod")[-1]
    assert json.loads((tmp_path / "log.jsonl").read_text())["target"] == "alpha@1"
    reason = json.loads(promoted.reason)
    assert (promoted.target, reason["report"], reason["gate"]["passed"]) == (
        "alpha@1", str(out.resolve()), True)
    assert reason["who"] == json.loads((tmp_path / "log.jsonl").read_text())["who"]

    # Same settings, stricter gate: nothing is replayed, the candidates now fail (exit 1).
    assert main([*argv, "--gate", str(failing)]) == 1
    second = strict_json(out / "report.json")
    assert all(r["cached_conversations"] == 3 for r in second["results"].values())
    assert second["conversations"]["alpha@1"] == first["conversations"]["alpha@1"]
    assert main(["promote", "--target", server.target, "--alias", "prod", "--candidate",
                 "beta@1", "--report", str(out)]) == 1
    assert "refused: the gate failed for beta@1" in capsys.readouterr().err


def test_unknown_adapter_on_a_live_server_exits_2(
    server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["run", "--target", server.target, "--testset",
                 str(write_testset(tmp_path / "t.jsonl")), "--adapters", "__base__,nosuch@9",
                 "--out", str(tmp_path / "o"), "--no-progress"])
    assert code == 2
    assert "adapter 'nosuch@9': the server answered NOT_FOUND" in capsys.readouterr().err
