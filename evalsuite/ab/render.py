"""People's ratings (and the model judge's, apart) as report sections: Markdown lines, HTML and
one matplotlib plot, all read from the JSON-ready `report["human"]` dict that `ab results` merges.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from evalsuite.ab.dimensions import DIMENSIONS, OUTCOMES


def _num(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}g}"


def _iv(d: Mapping[str, Any]) -> str:
    return f"{_num(d['value'])} [{_num(d['ci_low'])}, {_num(d['ci_high'])}]"


def agreement_line(a: Mapping[str, Any] | None) -> str:
    if a is None:
        return "no pair was rated by two people"
    name = "Cohen's" if a["method"] == "cohen" else "Fleiss'"
    return (f"{name} kappa {_num(a['kappa'])} over {a['items']} pairs "
            f"({a['raters']} raters; observed {_num(a['observed'])}, chance {_num(a['expected'])})")


def people_tables(people: Mapping[str, Any]) -> list[str]:
    """Win / tie / loss and dimension scores per candidate, as Markdown tables."""
    lines = ["| candidate | baseline | ratings | conversations | win rate [95% CI] | "
             + " | ".join(OUTCOMES) + " |", "|---|---|---|---|---|" + "---|" * len(OUTCOMES)]
    for cand, c in people["candidates"].items():
        shares = " | ".join(f"{c['outcomes'][o]['count']} ({_num(c['outcomes'][o]['value'])})"
                            for o in OUTCOMES)
        lines.append(f"| {cand} | {c['baseline']} | {c['ratings']} | {c['conversations']} | "
                     f"{_iv(c['win_rate'])} | {shares} |")
    lines += ["", "| candidate | dimension | candidate [95% CI] | baseline [95% CI] | "
              "delta [95% CI] | p |", "|---|---|---|---|---|---|"]
    for cand, c in people["candidates"].items():
        for d in c["dimensions"].values():
            lines.append(f"| {cand} | {d['label']} | {_iv(d['candidate'])} | "
                         f"{_iv(d['baseline'])} | {_num(d['delta'])} [{_num(d['ci_low'])}, "
                         f"{_num(d['ci_high'])}] | {_num(d['p_value'], 2)} |")
    return lines


def position_line(people: Mapping[str, Any]) -> str:
    pb = people["position_bias"]
    verdict = "**position bias**: raters favour one side" if pb["biased"] else "no position bias"
    return (f"Left chosen in {_num(pb['left_share'])} [{_num(pb['ci_low'])}, "
            f"{_num(pb['ci_high'])}] of {pb['decisive']} decisive choices (p "
            f"{_num(pb['p_value'], 2)} against 0.5): {verdict}.")


def _judge_lines(judge: Mapping[str, Any]) -> list[str]:
    lines = ["## Model judge (not people; never mixed with their ratings)", "",
             "| judge | candidate | win | tie | loss | unparsed |", "|---|---|---|---|---|---|"]
    for name, j in judge.items():
        for cand, n in j["candidates"].items():
            lines.append(f"| {name} | {cand} | {n['win']} | {n['tie']} | {n['loss']} | "
                         f"{n['error']} |")
    lines.append("")
    for name, j in judge.items():
        agree = j["agreement_with_people"]
        text = ("no pair judged by both" if agree is None else
                f"Cohen's kappa {_num(agree['kappa'])} over {agree['items']} pairs")
        lines.append(f"- `{name}` agreement with people's majority: {text}")
    return lines


def human_markdown(human: Mapping[str, Any]) -> list[str]:
    """The report's sections for people's ratings and, apart, the model judge."""
    people = human["people"]
    lines = ["## People's blind ratings", "",
             f"{people['ratings']} ratings by {len(people['raters'])} raters "
             f"({', '.join(people['raters']) or 'none'}) on {people['pairs_rated']} of "
             f"{people['pairs']} pairs; set `{human['set']}`. Intervals: bootstrap over "
             "conversations. Win rate counts ties and both-bad as half.", ""]
    lines += people_tables(people)
    lines += ["", f"Agreement between raters: {agreement_line(people['agreement'])}.", "",
              position_line(people), ""]
    if human.get("judge"):
        lines += _judge_lines(human["judge"]) + [""]
    return lines


def human_png(people: Mapping[str, Any]) -> str:
    """Outcome shares per candidate (left) and dimension means with intervals (right)."""
    cands = list(people["candidates"])
    fig = Figure(figsize=(11, 1.8 + 0.6 * max(1, len(cands))), layout="constrained")
    ax = fig.add_subplot(1, 2, 1)
    left = np.zeros(len(cands))
    for k, outcome in enumerate(OUTCOMES):
        shares = np.array([people["candidates"][c]["outcomes"][outcome]["value"] or 0.0
                           for c in cands])
        ax.barh(range(len(cands)), shares, left=left, color=f"C{k}", label=outcome)
        left += shares
    for y, cand in enumerate(cands):  # the win rate (ties count half) with its interval
        rate = people["candidates"][cand]["win_rate"]
        if rate["value"] is not None:
            err = [[rate["value"] - (rate["ci_low"] or rate["value"])],
                   [(rate["ci_high"] or rate["value"]) - rate["value"]]]
            ax.errorbar(rate["value"], y, xerr=err, fmt="kD", capsize=4, label=(
                "win rate, 95% CI" if y == 0 else None))
    ax.set_yticks(range(len(cands)), cands, fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_title("people's choices (candidate's view)", fontsize=9)
    ax.legend(fontsize=7, ncols=5, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    ax = fig.add_subplot(1, 2, 2)
    width = 0.8 / (2 * max(1, len(cands)))
    for j, cand in enumerate(cands):
        dims = people["candidates"][cand]["dimensions"]
        for s, side in enumerate(("candidate", "baseline")):
            vals = [dims[d][side] for d in DIMENSIONS]
            h = np.array([v["value"] or 0.0 for v in vals])
            err = np.array([[max(0.0, hv - (v["ci_low"] or hv)), max(0.0, (v["ci_high"] or hv)
                            - hv)] for hv, v in zip(h, vals, strict=True)]).T
            x = np.arange(len(DIMENSIONS)) + (2 * j + s) * width - 0.4 + width / 2
            ax.bar(x, h, width, yerr=err, capsize=2, color=f"C{2 * j + s}",
                   label=f"{cand}" if side == "candidate" else f"{cand}'s baseline")
    ax.set_xticks(range(len(DIMENSIONS)), list(DIMENSIONS), fontsize=8)
    ax.set_ylim(0, 5.5)
    ax.set_title("mean 1-5 scores, 95% intervals", fontsize=9)
    ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def human_html(human: Mapping[str, Any], table_to_html: Any) -> str:
    """The HTML sections; `table_to_html` turns the Markdown tables into HTML tables."""
    people = human["people"]
    tables = "\n".join(people_tables(people)).split("\n\n")
    parts = [f"<h2>People's blind ratings</h2><p>{people['ratings']} ratings by "
             f"{len(people['raters'])} raters on {people['pairs_rated']} of {people['pairs']} "
             f"pairs (set <code>{html.escape(human['set'])}</code>).</p>"]
    if people["candidates"]:
        parts.append(f"<img alt='human ratings' src='data:image/png;base64,{human_png(people)}'>")
    parts += [table_to_html(t) for t in tables]
    parts.append(f"<p>Agreement between raters: {html.escape(agreement_line(people['agreement']))}."
                 f"</p><p>{html.escape(position_line(people).replace('**', ''))}</p>")
    if human.get("judge"):
        judge_md = _judge_lines(human["judge"])
        parts.append("<h2>Model judge (not people; never mixed with their ratings)</h2>")
        parts.append(table_to_html("\n".join(judge_md[2:-len(human["judge"]) - 1])))
        parts += [f"<p>{html.escape(line[2:])}</p>" for line in judge_md[-len(human["judge"]):]]
    return "".join(parts)
