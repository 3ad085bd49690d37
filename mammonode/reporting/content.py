"""What the result objects say, derived once from a PipelineResult: model names, per-breast
scores, the density category and which model gave it, and how each algorithm is identified."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from mammonode.exam.views import VIEWS
from mammonode.pipeline.registry import CANCER_MODELS, DENSITY_MODELS, IMAGEWISE_MODELS, spec
from mammonode.pipeline.run import PipelineResult
from mammonode.reporting.render import TEST_NOTICE

ENSEMBLE = "ensemble"  # the per-breast mean over the cancer models; not a registry model
ENSEMBLE_TITLE = "mammonode NYU ensemble"
UNCALIBRATED = (
    "The probabilities in this report are model outputs (scores between 0 and 100 %), "
    "not calibrated probabilities of cancer or of a density class."
)
UNVERIFIED_NOTICE = "UNVERIFIED WEIGHTS \u2014 NOT FOR CLINICAL USE"

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
        if missing_views(result):
            return ["Density: not run (the density models need all four views)"]
        return ["Density: no density model ran"]
    lines = [
        f"BI-RADS density: {call.category} ({CATEGORY_TEXT[call.category]})",
        f"  from the {spec(call.model).short_title} model",
    ]
    for name, data in result.density.items():
        probs = " ".join(f"{c}={p:.2f}" for c, p in zip("abcd", data["probabilities"]))
        lines.append(f"  {spec('density_' + name).short_title}: {probs}")
    return lines


@dataclass(frozen=True)
class Algorithm:
    """How one algorithm is named in the SRs (TID 4019) and in Contributing Equipment: the
    version names the weights, so a change of weights is a change of version."""

    model: str  # registry name, or ENSEMBLE
    name: str
    version: str
    parameters: tuple[str, ...]


def _flag(value: bool) -> str:
    return "true" if value else "false"


def _weights_status(result: PipelineResult, model: str) -> str:
    prov = result.models[model]
    return "test" if prov.test_weights else ("verified" if prov.verified else "unverified")


def algorithm(result: PipelineResult, model: str) -> Algorithm:
    """A model that ran: version = software version + its weights' sha256 prefix."""
    prov = result.models[model]
    params = [f"weights_sha256={prov.sha256}", f"weights={_weights_status(result, model)}"]
    if model in CANCER_MODELS or model in IMAGEWISE_MODELS:
        p = result.parameters
        params += [
            f"seed={p.get('seed')}",
            f"epochs={p.get('epochs')}",
            f"augmentation={_flag(bool(p.get('augmentation')))}",
            f"precision={p.get('precision')}",
        ]
        if model in ("image_heatmaps", "image_heatmaps_imagewise") and "patch" in result.models:
            params.append(f"patch_weights_sha256={result.models['patch'].sha256}")
    return Algorithm(
        model, f"mammonode {spec(model).title}", f"{result.software_version}+{prov.sha256[:12]}", tuple(params)
    )


def ensemble_members(result: PipelineResult) -> list[str]:
    return [m for m in CANCER_MODELS if m in result.cancer]


def ensemble_algorithm(result: PipelineResult) -> Algorithm | None:
    """The derived per-breast score: its version hashes its members' weights."""
    members = ensemble_members(result)
    if not members:
        return None
    digest = hashlib.sha256(";".join(f"{m}:{result.models[m].sha256}" for m in members).encode()).hexdigest()
    params = (f"members={'+'.join(members)}", "derivation=mean of the members' malignant probabilities") + tuple(
        f"{m}_weights_sha256={result.models[m].sha256}" for m in members
    )
    return Algorithm(ENSEMBLE, ENSEMBLE_TITLE, f"{result.software_version}+{digest[:12]}", params)


def not_run_algorithm(result: PipelineResult, model: str) -> Algorithm:
    """A selected model that did not run (no weights): named, with no weights to version."""
    return Algorithm(model, f"mammonode {spec(model).title}", result.software_version, ())


def all_algorithms(result: PipelineResult, imagewise: bool = False) -> list[Algorithm]:
    """Every algorithm behind an SR's content: the patch model (heatmaps for image+heatmaps),
    the exam-level cancer and density models that ran, with ``imagewise`` the image-wise
    models that ran (their per-image scores are in the TID 1500 SR only), then the ensemble."""
    reported = ("patch", *CANCER_MODELS, *DENSITY_MODELS) + (IMAGEWISE_MODELS if imagewise else ())
    out = [algorithm(result, m) for m in reported if m in result.models]
    ensemble = ensemble_algorithm(result)
    return out + ([ensemble] if ensemble else [])


def percent(probability: float) -> float:
    """A 0-1 model output as DICOM's CAD templates give 111047: percent, two decimals."""
    return round(float(probability) * 100.0, 2)


def weights_notice(result: PipelineResult) -> str | None:
    if result.test_weights:
        return TEST_NOTICE
    return UNVERIFIED_NOTICE if result.unverified_weights else None


def skipped_lines(result: PipelineResult) -> list[str]:
    return [f"Not run: {spec(name).title} ({reason})." for name, reason in result.skipped.items()]


# --- partial results: a study lacking views, run with the image-wise models only -------------


def missing_views(result: PipelineResult) -> list[str]:
    """The standard views the result lacks (empty for a complete exam)."""
    return [v for v in VIEWS if v not in result.views]


def partial_lines(result: PipelineResult) -> list[str]:
    """What a partial result says (SR comments): which views were missing, and that the
    view-wise (exam) models did not run. Empty for a complete exam."""
    missing = missing_views(result)
    if not missing:
        return []
    present = [v for v in VIEWS if v in result.views]
    ran = [spec(m).title for m in IMAGEWISE_MODELS if m in result.models]
    by = f" ({'; '.join(ran)})" if ran else ""
    return [
        f"Partial result: the study lacks the views {', '.join(missing)}. Only the image-wise "
        f"models{by} ran, on the views present: {', '.join(present)}.",
        "The view-wise (exam) cancer models and the density models did not run: they need all four "
        "views. There is no per-breast score and no breast density in this report.",
    ]


def partial_notices(result: PipelineResult) -> list[str]:
    """The same, short and ASCII, for burned-in pictures."""
    missing = missing_views(result)
    if not missing:
        return []
    return [f"PARTIAL RESULT - missing views: {', '.join(missing)}", "view-wise (exam) model and density NOT run"]


def imagewise_lines(result: PipelineResult, view: str) -> list[str]:
    """One line per image-wise model that scored ``view``, for the summary."""
    scores = result.images.get(view, {})
    lines = []
    for model in IMAGEWISE_MODELS:
        if model in scores:
            title = spec(model).short_title.removesuffix(", per image")
            p = scores[model]
            lines.append(
                f"{title} (image-wise): malignant {100 * p['malignant']:.0f} %, benign {100 * p['benign']:.0f} %"
            )
    return lines
