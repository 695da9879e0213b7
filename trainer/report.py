"""The training report: one self-contained HTML page in each version folder.

Built from the version's manifest alone (so a sweep's best trial gets the same page): loss
curves (train and validation), learning rate, gradient norm, data statistics, settings,
recovery events and, for a sweep, its trial table and plot. Images are matplotlib PNGs
embedded as data URIs, so the page can be copied anywhere.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

REPORT_FILE = "report.html"


def _png(figure: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=96, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _series(points: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    kept = [p for p in points if isinstance(p.get(key), int | float)]
    return [p["step"] for p in kept], [p[key] for p in kept]


def training_figure(curves: dict[str, list[dict[str, Any]]]) -> str:
    """Loss (train and validation), learning rate and gradient norm against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_ax, lr_ax, grad_ax) = plt.subplots(1, 3, figsize=(14, 3.6))
    loss_ax.plot(*_series(curves.get("train", []), "loss"), label="train")
    loss_ax.plot(*_series(curves.get("validation", []), "loss"), marker="o", label="validation")
    loss_ax.set(title="loss", xlabel="step")
    loss_ax.legend()
    lr_ax.plot(*_series(curves.get("train", []), "learning_rate"), color="tab:green")
    lr_ax.set(title="learning rate", xlabel="step")
    grad_ax.plot(*_series(curves.get("train", []), "grad_norm"), color="tab:red")
    grad_ax.set(title="gradient norm (before clipping)", xlabel="step")
    return _png(figure)


def _table(rows: list[dict[str, Any]] | dict[str, Any]) -> str:
    """A dict as a two-column table, a list of dicts as a table with one column per key."""
    if isinstance(rows, dict):
        body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_cell(v))}</td></tr>"
                       for k, v in rows.items())
        return f"<table>{body}</table>"
    if not rows:
        return "<p>none</p>"
    keys = list(dict.fromkeys(k for row in rows for k in row))
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(row.get(k)))}</td>" for k in keys)
                   + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return ""
    return str(value)


def _data_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"split": split, **data[split]} for split in ("train", "validation") if data.get(split)]


def render(manifest: dict[str, Any], sweep_plot: str | None = None) -> str:
    name = html.escape(str(manifest.get("name", "")))
    sections = [
        f"<h1>Training report: {name}</h1>",
        f"<p>base {html.escape(str(manifest['base']['path_or_id']))}, created "
        f"{html.escape(str(manifest.get('created', '')))}, wall time "
        f"{manifest.get('wall_time_s', '')} s</p>",
        "<h2>Curves</h2>",
        f'<img alt="training curves" src="{training_figure(manifest["curves"])}">',
        "<h2>Metrics</h2>", _table(manifest.get("metrics", {})),
        "<h2>Data</h2>", _table(_data_rows(manifest.get("data", {}))),
        "<h2>Settings</h2>", _table({**manifest.get("hyperparameters", {}),
                                     **{f"lora.{k}": v for k, v in manifest["lora"].items()}}),
        "<h2>Recovery events</h2>", _table(manifest.get("recovery") or []),
    ]
    sweep = manifest.get("sweep")
    if sweep:
        sections += ["<h2>Sweep</h2>", f"<p>study {html.escape(sweep['study'])}, best trial "
                     f"{sweep['best_trial']}</p>", _table(sweep["trials"])]
        if sweep_plot:
            sections.append(f'<img alt="sweep" src="{sweep_plot}">')
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{name}</title>"
            f"<style>{style}</style></head><body>{''.join(sections)}</body></html>\n")


def write_report(folder: Path, manifest: dict[str, Any]) -> Path:
    """Write REPORT_FILE into `folder`; a sweep's plot (a PNG named by manifest["sweep"]["plot"]
    in the same folder) is embedded too."""
    sweep_plot = None
    plot_name = (manifest.get("sweep") or {}).get("plot")
    if plot_name and (folder / plot_name).is_file():
        encoded = base64.b64encode((folder / plot_name).read_bytes()).decode("ascii")
        sweep_plot = "data:image/png;base64," + encoded
    path = folder / REPORT_FILE
    path.write_text(render(manifest, sweep_plot))
    return path
