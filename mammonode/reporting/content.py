"""What the result objects say, derived once from a PipelineResult: model names, per-breast
scores, the density category and which model gave it."""

from __future__ import annotations

from dataclasses import dataclass

from mammonode.pipeline.registry import CANCER_MODELS, spec
from mammonode.pipeline.run import PipelineResult

CATEGORY_TEXT = {
    "a": "almost entirely fat",
    "b": "scattered fibroglandular densities",
    "c": "heterogeneously dense",
    "d": "extremely dense",
}
BREASTS = (("right", "R"), ("left", "L"))


@dataclass(frozen=True)
class DensityCall:
    model: str  # density_cnn or density_histogram
    category: str
    probabilities: list[float]


def model_identity(result: PipelineResult) -> str:
    """One line naming every model that ran, with its weights' checksum and status."""
    parts = [f"mammonode {result.software_version}"]
    for name, prov in result.models.items():
        flag = "TEST WEIGHTS" if prov.test_weights else ("verified" if prov.verified else "unverified")
        parts.append(f"{spec(name).title} sha256:{prov.sha256[:16]} {flag}")
    return "; ".join(parts)


def malignancy_score(result: PipelineResult, side: str) -> float | None:
    """The derived score: the mean malignant probability over the cancer models that ran
    (the ensemble the NYU authors report averages the image-only and image+heatmaps models)."""
    values = [result.cancer[m][f"{side}_malignant"] for m in CANCER_MODELS if m in result.cancer]
    return sum(values) / len(values) if values else None


def density_call(result: PipelineResult) -> DensityCall | None:
    """The category reported as the study's density: from the CNN when its weights are
    verified, else the histogram model when its weights are verified, else the CNN, else the
    histogram model (whichever ran)."""
    ran = {name: result.models[f"density_{name}"] for name in result.density if f"density_{name}" in result.models}
    order = [("cnn", True), ("histogram", True), ("cnn", False), ("histogram", False)]
    for name, need_verified in order:
        if name in ran and (ran[name].verified or not need_verified):
            data = result.density[name]
            return DensityCall(model=f"density_{name}", category=data["category"], probabilities=data["probabilities"])
    return None


def score_table(result: PipelineResult) -> list[tuple[str, str, str]]:
    rows = []
    for model in CANCER_MODELS:
        if model not in result.cancer:
            continue
        preds = result.cancer[model]
        title = spec(model).short_title
        rows.append((f"P(malignant) {title}", f"{preds['right_malignant']:.3f}", f"{preds['left_malignant']:.3f}"))
        rows.append((f"P(benign) {title}", f"{preds['right_benign']:.3f}", f"{preds['left_benign']:.3f}"))
    right, left = malignancy_score(result, "right"), malignancy_score(result, "left")
    if right is not None and left is not None:
        rows.append(("Malignancy score (mean)", f"{right:.3f}", f"{left:.3f}"))
    return rows


def density_lines(result: PipelineResult) -> list[str]:
    call = density_call(result)
    if call is None:
        return ["Density: no density model ran"]
    lines = [
        f"BI-RADS density: {call.category} ({CATEGORY_TEXT[call.category]})",
        f"  from the {spec(call.model).short_title} model",
    ]
    for name, data in result.density.items():
        probs = " ".join(f"{c}={p:.2f}" for c, p in zip("abcd", data["probabilities"]))
        lines.append(f"  {spec('density_' + name).short_title}: {probs}")
    return lines
