"""Weight-file tooling: install, list and verify a weights directory (``mammonode weights``),
and write seeded test weights in the original file formats (demo and tests)."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

import torch

from mammonode.pipeline.registry import MODELS, spec
from mammonode.pipeline.weights import (
    TEST_MARKER,
    WeightsError,
    is_test_dir,
    load_model,
    model_file,
    provenance,
    sha256_of,
)


def listing(weights_dir: Path) -> list[dict]:
    rows = []
    test_dir = is_test_dir(weights_dir)
    for name in MODELS:
        entry = spec(name).manifest
        path = model_file(weights_dir, name)
        row = {
            "model": name,
            "file": entry.file,
            "path": str(path),
            "installed": path.exists(),
            "sha256": None,
            "expected_sha256": entry.sha256 or None,
            "verified": False,
            "test_weights": test_dir,
            "origin": entry.origin,
            "license": entry.license,
        }
        if path.exists():
            prov = provenance(weights_dir, name)
            row.update(sha256=prov.sha256, verified=prov.verified, test_weights=prov.test_weights)
        rows.append(row)
    return rows


# Installed weight files are public model parameters, not secrets: readable by the service user
# whoever installed them (a root umask of 077 would otherwise leave them 0600 and every job fails).
FILE_MODE = 0o644
DIR_MODE = 0o755
SERVICE_USER = "mammonode"  # the systemd units' User=


def readable_by(path: Path, user: str) -> bool | None:
    """Whether ``user`` can read ``path`` (and traverse every directory above it) by its
    mode bits; None when no such user exists on this machine."""
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        return None
    if account.pw_uid == 0:
        return True
    groups = {account.pw_gid} | {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}

    def allowed(p: Path, owner: int, group: int, other: int) -> bool:
        st = p.stat()
        if st.st_uid == account.pw_uid:
            return bool(st.st_mode & owner)
        if st.st_gid in groups:
            return bool(st.st_mode & group)
        return bool(st.st_mode & other)

    path = path.absolute()
    if not allowed(path, stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH):
        return False
    return all(allowed(d, stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH) for d in path.parents)


def verify(weights_dir: Path, service_user: str = SERVICE_USER) -> list[dict]:
    """Each model's file: missing, bad (corrupt, wrong shape, contradicts a known checksum,
    unreadable by ``service_user``) or ok."""
    rows = []
    for item in listing(weights_dir):
        name = item["model"]
        if not item["installed"]:
            rows.append({"model": name, "status": "missing", "detail": f"{item['file']} not in {weights_dir}"})
            continue
        if readable_by(Path(item["path"]), service_user) is False:
            mode = stat.S_IMODE(Path(item["path"]).stat().st_mode)
            rows.append(
                {
                    "model": name,
                    "status": "bad",
                    "detail": f"the service user {service_user} cannot read {item['path']} (mode {mode:04o}); "
                    f"chmod {FILE_MODE:o} it (and {DIR_MODE:o} its directories)",
                }
            )
            continue
        if item["expected_sha256"] and item["sha256"] != item["expected_sha256"] and not item["test_weights"]:
            rows.append(
                {
                    "model": name,
                    "status": "bad",
                    "detail": f"sha256 {item['sha256']} differs from the official {item['expected_sha256']}",
                }
            )
            continue
        try:
            load_model(name, weights_dir)
        except WeightsError as exc:
            rows.append({"model": name, "status": "bad", "detail": str(exc)})
            continue
        detail = "checksum matches the official file" if item["verified"] else "loads; no official checksum known"
        if item["test_weights"]:
            detail += "; TEST WEIGHTS"
        rows.append({"model": name, "status": "ok", "detail": detail})
    return rows


def _find_source(source: Path, name: str) -> Path | None:
    candidates = [spec(name).file, *spec(name).original_names]
    for candidate in candidates:
        if (source / candidate).is_file():
            return source / candidate
    return None


def _fetch(url: str, target: Path) -> None:
    with urllib.request.urlopen(url, timeout=60) as response, open(target, "wb") as fh:
        shutil.copyfileobj(response, fh)


def install(source: str, weights_dir: Path, mark_test: bool = False) -> list[dict]:
    """Copy each model's file from a directory (manifest or original names) or download it
    from ``source`` + file name; checksums known to the manifest must match."""
    weights_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(weights_dir, DIR_MODE)
    is_url = urllib.parse.urlparse(source).scheme in ("http", "https")
    source_dir = None if is_url else Path(source)
    if source_dir is not None and not source_dir.is_dir():
        raise ValueError(f"--from {source}: not a directory or http(s) URL")
    rows = []
    for name in MODELS:
        entry = spec(name).manifest
        target = model_file(weights_dir, name)
        with tempfile.NamedTemporaryFile(dir=weights_dir, delete=False, suffix=".part") as tmp:
            temp = Path(tmp.name)
        try:
            if is_url:
                try:
                    _fetch(source.rstrip("/") + "/" + entry.file, temp)
                except OSError as exc:
                    rows.append({"model": name, "status": "missing", "detail": f"download failed: {exc}"})
                    continue
            else:
                found = _find_source(source_dir, name)
                if found is None:
                    rows.append({"model": name, "status": "missing", "detail": f"no {entry.file} in {source_dir}"})
                    continue
                shutil.copyfile(found, temp)
            digest = sha256_of(temp)
            if (
                entry.sha256
                and digest != entry.sha256
                and not mark_test
                and not (source_dir is not None and (source_dir / TEST_MARKER).exists())
            ):
                rows.append(
                    {
                        "model": name,
                        "status": "bad",
                        "detail": f"sha256 {digest} is not the official {entry.sha256}; not installed",
                    }
                )
                continue
            try:
                torch.load(temp, map_location="cpu", weights_only=True)
            except Exception as exc:
                rows.append({"model": name, "status": "bad", "detail": f"not a loadable weights file: {exc}"})
                continue
            os.chmod(temp, FILE_MODE)
            temp.replace(target)
            rows.append({"model": name, "status": "installed", "detail": f"{target} sha256 {digest[:16]}"})
        finally:
            temp.unlink(missing_ok=True)
    if mark_test or (source_dir is not None and (source_dir / TEST_MARKER).exists()):
        (weights_dir / TEST_MARKER).write_text(
            "Seeded random weights for testing only. Predictions made with them mean nothing clinically.\n"
        )
        os.chmod(weights_dir / TEST_MARKER, FILE_MODE)
    return rows


def _calibration_images(channels: int, shape: tuple[int, int], count: int, seed: int) -> torch.Tensor:
    """Standardised stand-ins for mammograms: a breast of random size and brightness with
    smooth texture against a zero background, so that calibration sees the contrast and
    the background share that real images have."""
    gen = torch.Generator().manual_seed(seed)
    h, w = shape
    rows = torch.linspace(-1, 1, h)[:, None]
    cols = torch.linspace(0, 1, w)[None, :]
    images = []
    for _ in range(count):
        radius, brightness, contrast = (torch.rand(3, generator=gen) * torch.tensor([0.5, 3.0, 0.6])).tolist()
        radius += 0.5
        breast = ((rows / radius) ** 2 + ((1 - cols) / radius) ** 2 < 1).float()
        coarse = torch.randn(1, 1, h // 16 + 1, w // 16 + 1, generator=gen)
        texture = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        image = breast * (1 + brightness) * (1 + (0.2 + contrast) * texture).clamp_min(0)
        image = (image - image.mean()) / image.std()
        images.append(image.expand(channels, h, w))
    return torch.stack(images)


def _spread_density_logits(model: torch.nn.Module, seed: int) -> None:
    """Scale and centre the last layer of a density model so that its logits vary by about
    a third of a unit across calibration exams: random deep features differ little from exam to
    exam, so without this every exam gets the same density."""
    import numpy as np

    from mammonode.exam.views import VIEWS
    from mammonode.pipeline.density import histogram_features
    from mammonode.pipeline.models.density_nets import DensityCNN

    # The CNN needs full-size views (its valid convolutions leave nothing of smaller ones);
    # normalised histograms hardly depend on size, so they take quarter-size ones.
    shape = (2600, 2000) if isinstance(model, DensityCNN) else (650, 500)
    exams = [
        _calibration_images(1, shape, len(VIEWS), seed + n)[:, 0]
        for n in range(4 if isinstance(model, DensityCNN) else 8)
    ]
    with torch.no_grad():
        if isinstance(model, DensityCNN):
            features = torch.stack(
                [
                    torch.cat([model.view_features(v, exam[i][None, None]) for i, v in enumerate(VIEWS)], dim=1)[0]
                    for exam in exams
                ]
            )
        else:
            features = torch.stack(
                [
                    torch.from_numpy(
                        np.asarray(histogram_features({v: exam[i].numpy() for i, v in enumerate(VIEWS)}), np.float32)
                    ).flatten()
                    for exam in exams
                ]
            )
        hidden = torch.relu(model.fc1(features))
        logits = model.fc2(hidden)
        # Real exams land off the calibration's centre: a spread of a third of a unit there
        # keeps them from saturating one category while they still differ.
        centre, spread = logits.mean(0), logits.std(0).clamp_min(1e-12) * 3
        model.fc2.weight.div_(spread[:, None])
        model.fc2.bias.copy_((model.fc2.bias - centre) / spread)


def _make_input_sensitive(name: str, model: torch.nn.Module, seed: int) -> None:
    """What the shared test weights do to random weights, so that predictions move with the
    input (pure random weights give outputs stuck near 0.5): BatchNorm running statistics
    from a training-mode pass, output layers scaled (x8 for the cancer models, x300 for the
    density CNN) with zero bias."""
    from mammonode.pipeline.models.density_nets import DensityCNN, DensityHistogramModel

    if isinstance(model, DensityCNN | DensityHistogramModel):
        _spread_density_logits(model, seed)
        return
    resnet = getattr(model, "four_view_resnet", None)
    if resnet is None:
        return  # the patch model and the histogram model stay plain seeded initialisations
    columns = {id(c): c for c in (resnet.cc, resnet.mlo)}.values()
    channels = resnet.cc.first_conv.in_channels
    with torch.no_grad():
        for column in columns:
            norms = [m for m in column.modules() if isinstance(m, torch.nn.BatchNorm2d)]
            for norm in norms:
                norm.reset_running_stats()
                norm.momentum = None  # a cumulative average over the calibration batch
            column.train()
            column(_calibration_images(channels, (668, 484), 4, seed))
            column.eval()
            for norm in norms:
                norm.momentum = 0.1
        for layer_name, layer in model.named_modules():
            if layer_name.startswith("output_layer") and hasattr(layer, "fc_layer"):
                layer.fc_layer.weight.mul_(8)
                layer.fc_layer.bias.zero_()


def generate_test_weights(weights_dir: Path, seed: int = 0, models: tuple[str, ...] = tuple(MODELS)) -> Path:
    """Seeded random weights of each architecture, written in the original file formats
    with a TEST_WEIGHTS marker, made input-sensitive the way the shared test weights are.
    Their predictions mean nothing clinically; every result made with them says so."""
    weights_dir.mkdir(parents=True, exist_ok=True)
    for name in models:
        model = spec(name)
        torch.manual_seed(seed)
        module = model.build()
        _make_input_sensitive(name, module, seed)
        state = {k: v.clone() for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}
        state = model.to_original(state)
        torch.save({model.nested_key: state} if model.nested_key else state, weights_dir / model.file)
    (weights_dir / TEST_MARKER).write_text(
        f"Generated by mammonode (torch.manual_seed({seed}), BatchNorm statistics from a calibration pass, "
        "output layers scaled); seeded random weights for testing only. "
        "Predictions made with them mean nothing clinically.\n"
    )
    return weights_dir
