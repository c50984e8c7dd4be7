"""The run report: one dict (written as JSON by `--report`) and its text rendering."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from graphpass import __version__
from graphpass.edit import Model
from graphpass.manager import PassStats
from graphpass.runtimes.cost import render_cost
from graphpass.verify import VerifyResult, render_table


def model_summary(model: Model, file_bytes: int | None, path: Path | None) -> dict[str, Any]:
    weights = model.weights()
    return {
        "path": str(path) if path else None,
        "file_bytes": file_bytes,
        "weight_bytes": model.weight_bytes(),
        "weights": len(weights),
        "nodes": model.node_count(),
        "opset": model.opset,
        "overridable_weights": sorted(w.name for w in weights if w.overridable),
    }


def build_report(
    before: dict[str, Any],
    after: dict[str, Any],
    stats: list[PassStats],
    pass_seconds: float,
    checked: VerifyResult | None,
    lossless: bool,
) -> dict[str, Any]:
    notes = []
    if after["overridable_weights"]:  # still inputs in the output: the passes left them alone
        notes.append(
            f"{len(after['overridable_weights'])} initializers are also graph inputs; a caller may "
            "override them, so no pass rewrites them (--freeze-initializers makes them constants)"
        )
    return {
        "graphpass_version": __version__,
        "input": before,
        "output": after,
        "lossless": lossless,
        "passes": [s.to_dict() for s in stats],
        "pass_seconds": pass_seconds,
        "verify": checked.to_dict() if checked is not None else None,
        "notes": notes,
    }


def human_bytes(count: int | None) -> str:
    if count is None:
        return "-"
    if abs(count) < 1000:
        return f"{count} B"
    value, unit = float(count), "B"
    for unit in ("KB", "MB", "GB"):
        value /= 1000
        if abs(value) < 1000:
            break
    return f"{value:.2f} {unit}"


def _ratio(after: int | None, before: int | None) -> str:
    if not before or after is None:
        return "-"
    return f"{after / before:.1%}"


def render_passes(report: dict[str, Any]) -> str:
    """Per-pass and total rows: weight bytes, nodes, tensors changed/skipped, time."""
    header = f"{'pass':<28} {'weights':>12} {'ratio':>7} {'nodes':>13} {'changed':>8} {'skipped':>8} {'time':>8}"
    rows = [header, "-" * len(header)]
    for s in report["passes"]:
        rows.append(
            f"{s['spec']:<28} {human_bytes(s['weight_bytes_after']):>12} "
            f"{_ratio(s['weight_bytes_after'], s['weight_bytes_before']):>7} "
            f"{s['nodes_before']:>6}->{s['nodes_after']:<6} {s['tensors_changed']:>8} "
            f"{s['tensors_skipped']:>8} {s['seconds']:>7.2f}s"
        )
    before, after = report["input"], report["output"]
    rows.append("-" * len(header))
    rows.append(
        f"{'file size':<28} {human_bytes(before['file_bytes'])} -> {human_bytes(after['file_bytes'])} "
        f"({_ratio(after['file_bytes'], before['file_bytes'])} of the input)"
    )
    if before.get("zip_bytes") is not None and after.get("zip_bytes") is not None:
        rows.append(
            f"{'zip -9 (download) size':<28} {human_bytes(before['zip_bytes'])} -> {human_bytes(after['zip_bytes'])} "
            f"({_ratio(after['zip_bytes'], before['zip_bytes'])}{_zip_method(before, after)})"
        )
    rows.append(
        f"{'weight bytes':<28} {human_bytes(before['weight_bytes'])} -> {human_bytes(after['weight_bytes'])} "
        f"({_ratio(after['weight_bytes'], before['weight_bytes'])})"
    )
    if report.get("peak_rss_bytes") is not None:
        rows.append(f"{'peak RSS of this run':<28} {human_bytes(report['peak_rss_bytes'])} "
                    "(graphpass with its onnxruntime sessions)")
    return "\n".join(rows)


def _zip_method(before: dict[str, Any], after: dict[str, Any]) -> str:
    """Nothing when both figures are exact; else which were estimated, and from how much."""
    sampled = {side: summary.get("zip_sample_bytes") for side, summary in (("input", before), ("output", after))}
    estimated = {side: f"{count / 1e6:.1f} MB" for side, count in sampled.items() if count is not None}
    if not estimated:
        return ""
    if len(estimated) == 2 and len(set(estimated.values())) == 1:
        return f"; estimated from a {estimated['input']} sample of each"
    return "; " + ", ".join(f"{side} estimated from a {size} sample" for side, size in estimated.items())


def render_skips(report: dict[str, Any], examples: int = 3) -> str:
    """What each pass left alone, grouped by reason (the JSON report lists every tensor)."""
    lines = []
    for s in report["passes"]:
        by_reason: dict[str, list[str]] = {}
        for item in s["skipped"]:
            by_reason.setdefault(_reason_kind(item["reason"]), []).append(item["weight"])
        for reason, names in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
            shown = ", ".join(names[:examples]) + (", ..." if len(names) > examples else "")
            lines.append(f"  {s['name']}: left {len(names)} as they are: {reason} ({shown})")
    for note in report["notes"] + [n for s in report["passes"] for n in s["notes"]]:
        lines.append(f"  note: {note}")
    return "\n".join(lines)


def _reason_kind(reason: str) -> str:
    """A reason without the figures that make each tensor's unique ("12 values, below...")."""
    return re.sub(r"^\d+ values?, ", "", re.sub(r" \((?:int|uint|bool|string)\w*\)", "", reason))


def render_report(report: dict[str, Any], checked: VerifyResult | None) -> str:
    parts = [render_passes(report)]
    skips = render_skips(report)
    if skips:
        parts.append(skips)
    if checked is not None:
        parts.append(render_table(checked))
    else:
        parts.append("verification skipped (--no-verify)")
    if report.get("cost") is not None:
        parts.append(render_cost(report["cost"]))
    return "\n\n".join(parts)
