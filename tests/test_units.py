"""Small pieces checked against the DICOM standard's own values."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from mammonode.config import ConfigError, load_config
from mammonode.exam.assignment import assign_view
from mammonode.ingest.store import valid_uid


def _mg(
    laterality="L",
    position="CC",
    code=("SCT", "399162004"),
    modifier=None,
    sop="1.2.840.10008.5.1.4.1.1.1.2",
    orientation=("A", "R"),
    intent="FOR PRESENTATION",
):
    ds = Dataset()
    ds.SOPClassUID = sop
    ds.Modality = "MG"
    ds.PresentationIntentType = intent
    if laterality is not None:
        ds.ImageLaterality = laterality
    if position is not None:
        ds.ViewPosition = position
    if code is not None:
        item = Dataset()
        item.CodingSchemeDesignator, item.CodeValue = code
        item.CodeMeaning = "view"
        item.ViewModifierCodeSequence = Sequence([modifier] if modifier is not None else [])
        ds.ViewCodeSequence = Sequence([item])
    if orientation is not None:
        ds.PatientOrientation = list(orientation)
    return ds


def test_view_assignment_from_codes_and_fallbacks():
    assert assign_view(_mg()).view == "L-CC"
    # MLO by SNOMED CT 399368009 and by the retired SRT R-10226 (PS3.16 CID 4014).
    assert assign_view(_mg("R", "MLO", ("SCT", "399368009"), orientation=("P", "FL"))).view == "R-MLO"
    assert assign_view(_mg("R", None, ("SRT", "R-10226"))).view == "R-MLO"
    assert assign_view(_mg("L", None, ("SRT", "R-10242"))).view == "L-CC"
    assert assign_view(_mg("L", "MLO", None)).view == "L-MLO"  # View Position fallback
    no_lat = _mg(laterality=None)
    no_lat.Laterality = "R"  # series Laterality fallback
    assert assign_view(no_lat).view == "R-CC"


def test_views_that_are_never_pipeline_inputs():
    spot = Dataset()
    spot.CodingSchemeDesignator, spot.CodeValue, spot.CodeMeaning = "SCT", "399163009", "Spot compression"
    assert assign_view(_mg(modifier=spot)).view == "other"
    assert "Spot" in assign_view(_mg(modifier=spot)).reason
    assert assign_view(_mg(code=("SCT", "399260004"))).view == "other"  # another view (e.g. ML)
    contradictory = assign_view(_mg(position="MLO"))
    assert contradictory.view == "other" and "View Position" in contradictory.reason
    assert assign_view(_mg(laterality=None)).view == "other"
    processing = assign_view(_mg(sop="1.2.840.10008.5.1.4.1.1.1.2.1", intent="FOR PROCESSING"))
    assert processing.view == "L-CC" and not processing.usable
    tomo = assign_view(_mg(sop="1.2.840.10008.5.1.4.1.1.13.1.3"))
    assert not tomo.usable
    ct = _mg()
    ct.Modality, ct.SOPClassUID = "CT", "1.2.840.10008.5.1.4.1.1.2"
    assert assign_view(ct).view == "other"


def test_facing_direction_from_patient_orientation():
    assert assign_view(_mg()).mirrored is False
    assert assign_view(_mg(orientation=("P", "R"))).mirrored is True
    assert assign_view(_mg(orientation=None)).mirrored is None


@pytest.mark.parametrize(
    "uid,ok",
    [
        ("1.2.840.10008.5.1.4.1.1.1.2", True),
        ("2.25.123456789", True),
        ("1" * 64, True),
        ("1" * 65, False),
        ("../../x", False),
        ("1.2.abc", False),
        ("1..2", False),
        ("", False),
        ("1.2/3", False),
        (".1.2", False),
    ],
)
def test_uid_grammar(uid, ok):
    assert valid_uid(uid) is ok


def test_config_defaults_overrides_and_errors(tmp_path):
    cfg = load_config(None, environ={})
    assert (cfg.node.ae_title, cfg.node.port, cfg.node.max_associations) == ("MAMMONODE", 11112, 16)
    assert cfg.study.quiet_period_s == 30 and cfg.study.incomplete_timeout_s == 900
    assert cfg.database_url.startswith("sqlite:///") and cfg.database_url.endswith("mammonode.sqlite")
    env = load_config(None, environ={"MAMMONODE_NODE_PORT": "104", "MAMMONODE_NODE_ALLOWED_CALLING_AETS": "A,B"})
    assert env.node.port == 104 and env.node.allowed_calling_aets == ["A", "B"]
    bad = tmp_path / "bad.toml"
    bad.write_text('[node]\nae_title = "THIS_TITLE_IS_TOO_LONG"\n')
    with pytest.raises(ConfigError, match="node.ae_title"):
        load_config(bad, environ={})
    bad.write_text('[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "h"\n')
    with pytest.raises(ConfigError, match=r"destinations\[0\]\.port"):
        load_config(bad, environ={})


def test_repository_config_file_is_the_defaults():
    from pathlib import Path

    from mammonode.config import Config

    shipped = load_config(Path(__file__).resolve().parents[1] / "config.toml", environ={})
    defaults = Config()
    for section in ("node", "dicomweb", "storage", "database", "study", "pipeline", "worker", "delivery", "logging"):
        assert getattr(shipped, section) == getattr(defaults, section), section


def test_batch_sizes_left_at_zero_are_chosen_for_the_device(tmp_path):
    """32 patches (8 at a time through the high-resolution layers) and 1 epoch per batch on
    a CPU, 8 patches when the patch model is compiled, 256 patches and every epoch at once
    on a GPU; a configured size is kept."""
    from pathlib import Path

    import torch

    from mammonode.pipeline.run import PipelineOptions

    options = PipelineOptions(weights_dir=Path("w"), epochs=10)
    cpu, gpu = options.for_device(torch.device("cpu")), options.for_device(torch.device("cuda", 1))
    assert (cpu.heatmap_batch, cpu.classifier_batch) == (32, 1)
    assert (gpu.heatmap_batch, gpu.classifier_batch) == (256, 10)
    compiled = PipelineOptions(weights_dir=Path("w"), compile=True)
    assert compiled.for_device(torch.device("cpu")).heatmap_batch == 8
    assert compiled.for_device(torch.device("cuda")).heatmap_batch == 256
    chosen = PipelineOptions(weights_dir=Path("w"), heatmap_batch=64, classifier_batch=5)
    assert (
        chosen.for_device(torch.device("cuda")).heatmap_batch,
        chosen.for_device(torch.device("cpu")).classifier_batch,
    ) == (64, 5)
    bad = tmp_path / "bad.toml"
    bad.write_text("[pipeline]\nclassifier_batch = -1\n")
    with pytest.raises(ConfigError, match=r"pipeline\.classifier_batch"):
        load_config(bad, environ={})
