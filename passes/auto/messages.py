"""auto's messages and the `details` of its report: what each weight got and why."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from graphpass.budget import Budget
from graphpass.holdout import Split
from graphpass.passes.auto.builds import Round
from graphpass.passes.auto.fronts import EXACT, KEPT, Point, Study, finite, predicted_units
from graphpass.sensitivity import Measurement


def impossible(budget: Budget, studies: list[Study]) -> str:
    least = min((p for s in studies for p in s.points if not p.kept),
                key=lambda p: p.units, default=None)
    detail = ""
    if least is not None:
        name = next(s.weight.name for s in studies if least in s.points)
        cosine = min(least.measured.cosine.values(), default=None)
        figure = f"cosine {cosine:.9f}" if cosine is not None else f"{least.units:.3g} times the budget"
        how = "predicted" if least.predicted else "measured"
        detail = f"; the least lossy setting {how}, {least.label} on {name}, alone gives {figure}"
    return f"auto: no weight can be compressed within the budget ({budget.describe()}){detail}"


def not_converged(budget: Budget, rounds: list[Round]) -> str:
    best = min(rounds, key=lambda r: r.measured)
    return (f"auto: no model met the budget ({budget.describe()}) in {len(rounds)} builds; the closest used "
            f"{best.measured:.2f} times it")


def why_kept(study: Study) -> str:
    """Why a weight was kept, worded the same for every weight kept for that reason, so that the
    summary groups them: each one's figures are in the report's tensors ("why", "tried")."""
    measured = [p.units for p in study.points if not p.kept]
    if not measured:
        label, reason = study.unplanned[0]
        return f"kept as is: no setting applies ({label}: {reason})"
    if min(measured) > 1:
        return "kept as is: even its most accurate setting alone is over the budget"
    return "kept as is: each of its settings costs more of the budget per byte saved than the others' do"


def details(budget, outputs, split: Split, studies: list[Study], best: Round, rounds: list[Round],
             seconds: dict[str, float]) -> dict[str, Any]:
    tensors = [tensor_report(s, i) for s, i in zip(studies, best.chosen)]
    compressed = [t for t in tensors if t["setting"] != KEPT]
    held_out = split.to_dict()
    if best.held_out is not None:
        held_out.update(units=finite(best.held_out.units), outputs=best.held_out.figures)
    return {
        "budget": budget.to_dict(),
        "outputs": outputs,
        "fitting": {name: list(np.shape(value)) for name, value in split.fitting.items()},
        "held_out": held_out,
        "settings_measured": sum(not p.kept and not p.predicted for s in studies for p in s.points),
        "settings_predicted": sum(p.predicted for s in studies for p in s.points),
        "bytes_before": sum(t["bytes_before"] for t in tensors),
        "bytes_after": sum(t["bytes_after"] for t in tensors),
        "predicted": predicted_report(studies, best.chosen, outputs),
        "measured": {"units": finite(best.measured), "file_bytes": best.file_bytes, "outputs": best.figures},
        "rounds": [r.to_dict(sum(1 for s, i in zip(studies, r.chosen) if not s.front[i].kept))
                   for r in rounds],
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "tensors_compressed": len(compressed),
        "tensors": tensors,
    }


def tensor_report(study: Study, index: int) -> dict[str, Any]:
    point = study.front[index]
    cheaper = study.front[index - 1] if index > 0 else None
    report = {
        "name": study.weight.name,
        "shape": list(study.weight.shape),
        "setting": point.label,
        "bytes_before": study.weight.nbytes,
        "bytes_after": point.bytes,
        "error_units": round(point.units, 6),
        "why": why(point, cheaper),
    }
    report["tried"] = [p.to_dict() for p in study.points if not p.kept]
    if not point.kept:
        report["alone"] = {**point.measured.to_dict(), **({"predicted": True} if point.predicted else {})}
        report["plan"] = {k: point.plan.details[k] for k in ("k", "packing", "sqnr_db", "bits_per_weight")
                          if k in point.plan.details}
    return report


def why(point: Point, cheaper: Point | None) -> str:
    predicted = " (predicted from a sample)" if point.predicted else ""
    share = f"alone uses {100 * point.units:.2f}% of the budget{predicted} at {point.bytes} bytes"
    if cheaper is None:
        return f"the cheapest setting measured; {share}"
    return (f"{share}; the next cheaper choice, {cheaper.label}, would save {point.bytes - cheaper.bytes} bytes "
            f"for {100 * (cheaper.units - point.units):.2f}% more of the budget, a worse trade than the others'")


def predicted_report(studies: list[Study], chosen: list[int], outputs: list[str]) -> dict[str, Any]:
    """Per output: the chosen weights' errors together, as Measurement.plus adds them (1 - cosine
    adds over weights, max abs errors add in quadrature)."""
    measured = [s.front[i].measured for s, i in zip(studies, chosen) if s.front[i].measured is not None]
    together = functools.reduce(Measurement.plus, measured, EXACT)
    return {"units": round(predicted_units([s.front for s in studies], chosen), 6),
            "cosine": {name: together.cosine[name] for name in outputs if name in together.cosine},
            "max_abs_error": {name: together.max_abs_error[name] for name in outputs if name in together.cosine}}
