"""What ``hf-optim mutransfer`` writes: ``tuned.yaml`` (the target recipe with the transferred values and a provenance
block), ``report.json`` (:func:`hf_optim.runner._mutransfer_search.summarize` plus the settings), ``report.md`` (the
tables) and ``report.png`` (loss against lr: the proxy's lr stages, the direct sweep and the verification runs)."""

from __future__ import annotations

import datetime
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from . import schema


def tuned_recipe(target_path: Path, optimum: Mapping[str, float], out: Path, provenance: Mapping[str, Any]) -> dict:
    """The target recipe file as written (its ``base`` chain kept) with the transferred values and the provenance."""
    raw = yaml.safe_load(target_path.read_text()) or {}
    base = raw.get("base")
    if base and not Path(str(base)).is_absolute():
        try:  # a bundled name resolves anywhere; a relative file path must be re-rooted at the output folder
            schema.resolve_path(str(base))
            bundled = not (target_path.parent / str(base)).is_file()
        except schema.RecipeError:
            bundled = False
        if not bundled:
            raw["base"] = os.path.relpath((target_path.parent / str(base)).resolve(), out.resolve())
    raw["name"] = f"{raw.get('name', target_path.stem)}_mutransfer"
    optimizer = raw.setdefault("optimizer", {})
    optimizer["lr"] = float(2.0 ** optimum["log2_lr"])
    if optimum["weight_decay"] or optimizer.get("weight_decay") is not None:
        optimizer["weight_decay"] = float(optimum["weight_decay"])
    mup = raw.setdefault("model", {}).setdefault("mup", {})
    mup["output_mult"] = float(optimum["output_mult"])
    mup["attn_mult"] = float(optimum["attn_mult"])
    raw["provenance"] = {"tool": "hf-optim mutransfer", "date": datetime.date.today().isoformat(), **provenance}
    return raw


def write_tuned(path: Path, recipe: Mapping[str, Any]) -> None:
    header = (
        "# Written by hf-optim mutransfer: the target recipe with the hyperparameters transferred from the proxy.\n"
    )
    path.write_text(header + yaml.safe_dump(dict(recipe), sort_keys=False, width=120))


def _fmt(loss: float) -> str:
    return "diverged" if not math.isfinite(loss) else f"{loss:.4f}"


def markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown tables (stage by stage, then the direct sweep, the verification and the cost)."""
    s = report["settings"]
    lines = [
        f"# mutransfer: {s['target_recipe']}",
        "",
        f"Proxy width {s['proxy']['width']} x {s['proxy']['layers']} layers -> target width {s['target']['width']} x "
        f"{s['target']['layers']} layers ({s['seeds']} seed(s) per point; score = final validation loss, mean over "
        "seeds).",
        "",
    ]
    for stage in report["stages"]:
        best = stage["best"]
        lines += [f"## stage `{stage['stage']}`", "", "| log2 lr | output_mult | attn_mult | weight_decay | loss |"]
        lines.append("|---|---|---|---|---|")
        for p in stage["points"]:
            mark = "**" if all(p[k] == best[k] for k in best) else ""
            lines.append(
                f"| {p['log2_lr']:g} | {p['output_mult']:g} | {p['attn_mult']:g} | {p['weight_decay']:g} | "
                f"{mark}{_fmt(p['loss'])}{mark} |"
            )
        lines.append("")
    o = report["optimum"]
    lines += [
        f"**Transferred**: lr 2^{o['log2_lr']:g} = {2.0 ** o['log2_lr']:.4g}, output_mult {o['output_mult']:g}, "
        f"attn_mult {o['attn_mult']:g}, weight_decay {o['weight_decay']:g} (proxy loss {_fmt(report['proxy_loss'])}).",
        "",
    ]
    if "direct" in report:
        d = report["direct"]
        lines += ["## direct sweep at the target", "", "| log2 lr | loss |", "|---|---|"]
        lines += [f"| {p['log2_lr']:g} | {_fmt(p['loss'])} |" for p in d["points"]]
        lines += [
            "",
            f"Best direct lr 2^{d['best_log2_lr']:g} (loss {_fmt(d['best_loss'])}); the transferred lr is "
            f"{d['transfer_gap_grid_steps']:g} grid step(s) (x2) from it.",
            "",
        ]
    if "verify" in report:
        v = report["verify"]
        lines += ["## verification at the target", "", "| lr | loss |", "|---|---|"]
        lines += [
            f"| {k} transferred | {_fmt(x)} |" for k, x in sorted(v["loss"].items(), key=lambda kv: float(kv[0][:-1]))
        ]
        verdict = "is" if v["transferred_is_best"] else f"is not ({v['best']} is better)"
        lines += ["", f"The transferred lr {verdict} the best of the three."]
        if "tuned_minus_direct_best" in v:
            lines.append(f"tuned.yaml's loss minus the direct sweep's best: {v['tuned_minus_direct_best']:+.4f}.")
        lines.append("")
    c = report["compute"]
    lines += [
        "## compute (6 N D FLOPs; seconds of training measured by each run)",
        "",
        "| part | runs | FLOPs | seconds |",
        "|---|---|---|---|",
    ]
    for role in ("proxy", "direct", "verify"):
        if c[f"{role}_runs"]:
            lines.append(f"| {role} | {c[f'{role}_runs']:g} | {c[f'{role}_flops']:.3g} | {c[f'{role}_seconds']:g} |")
    if "proxy_over_direct_flops" in c:
        lines += [
            "",
            f"Proxy search / direct sweep: {c['proxy_over_direct_flops']:.1%} of the FLOPs, "
            f"{c['proxy_over_direct_seconds']:.1%} of the seconds.",
        ]
    return "\n".join(lines) + "\n"


def plot(report: Mapping[str, Any], path: Path) -> Path | None:
    """Loss against log2 lr: the proxy's lr stages, the direct sweep and the verification runs."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional output
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    proxy = sorted(
        (p["log2_lr"], p["loss"])
        for stage in report["stages"]
        if stage["stage"] in ("lr", "lr_fine")
        for p in stage["points"]
        if math.isfinite(p["loss"])
    )
    s = report["settings"]
    if proxy:
        ax.plot(*zip(*proxy, strict=True), "o-", label=f"proxy w={s['proxy']['width']}, recipe multipliers")
    final = [p for stage in report["stages"] if stage["stage"] == "lr_final" for p in stage["points"]]
    tuned = sorted({(p["log2_lr"], p["loss"]) for p in final if math.isfinite(p["loss"])}
                   | {(report["optimum"]["log2_lr"], report["proxy_loss"])})  # fmt: skip
    if final:
        ax.plot(*zip(*tuned, strict=True), "o--", label=f"proxy w={s['proxy']['width']}, tuned multipliers")
    if "direct" in report:
        direct = sorted((p["log2_lr"], p["loss"]) for p in report["direct"]["points"] if math.isfinite(p["loss"]))
        ax.plot(*zip(*direct, strict=True), "s-", label=f"target w={s['target']['width']}, direct sweep (tuned mult.)")
    if "verify" in report:
        x0 = report["optimum"]["log2_lr"]
        pts = sorted((x0 + math.log2(float(k[:-1])), x) for k, x in report["verify"]["loss"].items())
        ax.plot(*zip(*pts, strict=True), "^", ms=9, label="target at x0.5 / x1 / x2 transferred (tuned)")
    ax.axvline(report["optimum"]["log2_lr"], color="grey", ls="--", lw=1, label="transferred lr")
    ax.set_xlabel("log2 learning rate")
    ax.set_ylabel("final validation loss")
    ax.set_title(f"mutransfer {s['target_recipe']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out: Path, report: Mapping[str, Any]) -> list[Path]:
    (out / "report.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    (out / "report.md").write_text(markdown(report))
    written = [out / "report.json", out / "report.md"]
    png = plot(report, out / "report.png")
    return written + ([png] if png else [])
