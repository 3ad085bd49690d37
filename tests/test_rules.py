"""Routing rules ([[rules]]): matching, validation and ``mammonode rules test``.

Ages follow PS3.5 Table 6.2-1 (AS: three digits and D, W, M or Y) and the calendar (a
person born on 29 February completes a year on 1 March in a common year). UIDs are those
PS3.4 Annex B registers.
"""

from __future__ import annotations

import json
import re

import pytest
from pydicom.dataset import Dataset
from support.node import cli, write_config
from support.paths import REPO

from mammonode.config import ConfigError, load_config
from mammonode.demo.phantom import exam_datasets
from mammonode.ingest.rules import age_from_as, age_from_dates, match

MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
MG_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
BREAST_TOMO = "1.2.840.10008.5.1.4.1.1.13.1.3"


def rules_of(tmp_path, *rules: dict):
    return load_config(write_config(tmp_path / "rules.toml", {}, rules=list(rules)), environ={}).rules


def mg(**attrs) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = MG_FOR_PRESENTATION
    ds.Modality = "MG"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.BodyPartExamined = "BREAST"
    ds.Manufacturer = "HOLOGIC, Inc."
    ds.StationName = "MAMMO2"
    ds.ViewPosition = "CC"
    ds.ImageLaterality = "L"
    for key, value in attrs.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    return ds


@pytest.mark.parametrize(
    "value, years",
    [("052Y", 52), ("000Y", 0), ("018M", 1), ("011M", 0), ("120M", 10), ("104W", 1), ("052W", 0), ("365D", 0)]
    + [("366D", 1), ("999Y", 999)],
)
def test_age_string_in_completed_years(value, years):
    assert age_from_as(value) == years


@pytest.mark.parametrize("value", ["52Y", "052y", "052", "0052Y", "052 Y", "-52Y", "", "052A"])
def test_invalid_age_strings_tell_no_age(value):
    assert age_from_as(value) is None


@pytest.mark.parametrize(
    "born, on, years",
    [
        ("19700615", "20240614", 53),
        ("19700615", "20240615", 54),
        ("19720229", "20230228", 50),
        ("19720229", "20230301", 51),
        ("19720229", "20240229", 52),
        ("20240101", "20240101", 0),
    ],
)
def test_age_from_birth_and_study_date(born, on, years):
    assert age_from_dates(born, on) == years


@pytest.mark.parametrize("born, on", [("20250101", "20240101"), ("", "20240101"), ("19700615", ""), ("1970", "2024")])
def test_no_age_without_valid_dates(born, on):
    assert age_from_dates(born, on) is None


@pytest.mark.parametrize(
    "key, pattern",
    [
        ("modality", "MG"),
        ("sop_class_uid", MG_FOR_PRESENTATION),
        ("presentation_intent_type", "FOR PRESENTATION"),
        ("body_part_examined", "BREAST"),
        ("manufacturer", "HOLOGIC, Inc."),
        ("station_name", "MAMMO2"),
        ("view_position", "CC"),
        ("image_laterality", "L"),
    ],
)
def test_each_attribute_matches_exactly_and_only_its_value(tmp_path, key, pattern):
    rules = rules_of(tmp_path, {"name": "r", "action": "store", key: pattern})
    found = match(rules, mg())
    assert (found.rule.name, found.action, found.index) == ("r", "store", 0)
    assert found.reasons == (f"{key} {pattern!r} matches {pattern!r}",)
    other = {
        "modality": {"Modality": "CT"},
        "sop_class_uid": {"SOPClassUID": MG_FOR_PROCESSING},
        "presentation_intent_type": {"PresentationIntentType": "FOR PROCESSING"},
        "body_part_examined": {"BodyPartExamined": "CHEST"},
        "manufacturer": {"Manufacturer": "GE MEDICAL SYSTEMS"},
        "station_name": {"StationName": "MAMMO1"},
        "view_position": {"ViewPosition": "MLO"},
        "image_laterality": {"ImageLaterality": "R"},
    }[key]
    missed = match(rules, mg(**other))
    assert missed.rule.name == "default" and missed.action == "process" and missed.index == 1
    assert missed.passed_over[0][:2] == (0, "r") and "matches none of" in missed.passed_over[0][2]
    # An absent attribute matches no pattern, not even "*".
    absent_key = next(iter(other))
    assert match(rules_of(tmp_path, {"name": "r", "action": "store", key: "*"}), mg(**{absent_key: None})).index == 1


def test_calling_ae_matches_the_association_and_never_stow(tmp_path):
    rules = rules_of(tmp_path, {"name": "archive", "action": "store", "calling_ae": ["ARCHIVE", "PACS_Q*"]})
    assert match(rules, mg(), "ARCHIVE").rule.name == "archive"
    assert match(rules, mg(), "PACS_QR1").rule.name == "archive"
    assert match(rules, mg(), "MODALITY1").rule.name == "default"
    assert match(rules, mg(), None).rule.name == "default"  # STOW-RS: no calling AE title


def test_lists_and_globs_case_sensitive(tmp_path):
    rules = rules_of(
        tmp_path,
        {"name": "mg-classes", "action": "store", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1.2*"},
        {"name": "not-images", "action": "drop", "modality": ["SR", "PR", "K?"]},
        {"name": "ge", "action": "store", "manufacturer": "GE*"},
    )
    assert match(rules, mg(SOPClassUID=MG_FOR_PROCESSING)).rule.name == "mg-classes"
    assert match(rules, mg(SOPClassUID=BREAST_TOMO, Modality="KO")).rule.name == "not-images"
    assert match(rules, mg(SOPClassUID=CT_IMAGE, Modality="PR")).rule.name == "not-images"
    assert match(rules, mg(SOPClassUID=CT_IMAGE, Modality="CT")).rule.name == "default"
    assert match(rules, mg(SOPClassUID=CT_IMAGE, Manufacturer="GE MEDICAL SYSTEMS")).rule.name == "ge"
    assert match(rules, mg(SOPClassUID=CT_IMAGE, Manufacturer="ge medical systems")).rule.name == "default"
    # A value with [...] is a character class; padding spaces DICOM allows are not significant.
    lateral = rules_of(tmp_path, {"name": "lr", "action": "store", "image_laterality": "[LR]"})
    assert match(lateral, mg(ImageLaterality="R ")).rule.name == "lr"
    assert match(lateral, mg(ImageLaterality="B")).rule.name == "default"


def test_multi_valued_attribute_matches_any_value(tmp_path):
    rules = rules_of(tmp_path, {"name": "mg", "action": "store", "modality": "MG"})
    ds = mg()
    ds.add_new(0x00080060, "CS", ["OT", "MG"])
    assert match(rules, ds).rule.name == "mg"


@pytest.mark.filterwarnings("ignore:Invalid value for VR AS")  # "52" is invalid on purpose
def test_age_range_from_patient_age_or_birth_date(tmp_path):
    rules = rules_of(tmp_path, {"name": "screening", "action": "process", "patient_age": [40, 74]})
    for age, hit in (("040Y", True), ("074Y", True), ("039Y", False), ("075Y", False), ("480M", True)):
        assert (match(rules, mg(PatientAge=age)).rule.name == "screening") is hit, age
    by_dates = match(rules, mg(PatientBirthDate="19700615", StudyDate="20240614"))
    assert by_dates.rule.name == "screening"
    assert by_dates.reasons == ("patient_age 53 (from Patient's Birth Date and Study Date) in [40, 74]",)
    # Patient's Age wins over the dates; an invalid one falls back to them.
    assert match(rules, mg(PatientAge="030Y", PatientBirthDate="19700615", StudyDate="20240614")).index == 1
    assert match(rules, mg(PatientAge="52", PatientBirthDate="19700615", StudyDate="20240614")).index == 0
    # No age information: a rule with an age range does not match.
    unknown = match(rules, mg(PatientBirthDate="19700615"))
    assert unknown.rule.name == "default" and "patient_age unknown" in unknown.passed_over[0][2]


def test_all_conditions_of_a_rule_must_hold_and_first_match_wins(tmp_path):
    rules = rules_of(
        tmp_path,
        {"name": "left-cc", "action": "store", "image_laterality": "L", "view_position": "CC"},
        {"name": "cc", "action": "drop", "view_position": "CC"},
        {"name": "rest", "action": "store"},
    )
    assert [r.name for r in rules] == ["left-cc", "cc", "rest"]  # no conditions: replaces the default
    found = match(rules, mg())
    assert found.rule.name == "left-cc" and len(found.reasons) == 2
    assert match(rules, mg(ImageLaterality="R")).rule.name == "cc"
    last = match(rules, mg(ViewPosition="MLO"))
    assert (last.rule.name, last.action, last.reasons) == ("rest", "store", ("no conditions: matches every instance",))


def test_the_default_rule_processes_everything(tmp_path):
    (tmp_path / "empty.toml").write_text("")
    rules = load_config(tmp_path / "empty.toml", environ={}).rules
    assert [(r.name, r.action, r.matches_everything) for r in rules] == [("default", "process", True)]
    assert match(rules, Dataset()).rule.name == "default"


def test_the_documented_example_in_config_toml_is_valid(tmp_path):
    """The commented [[rules]] example of config.toml, uncommented, loads and routes as its comments say."""
    text = (REPO / "config.toml").read_text()
    example = text[text.index("# [[rules]]") :].split("\n\n")[0]  # up to the blank line after it
    body = "\n".join(re.sub(r"^# ?", "", line) for line in example.splitlines())
    (tmp_path / "example.toml").write_text(body)
    rules = load_config(tmp_path / "example.toml", environ={}).rules
    assert [r.name for r in rules][-1] == "everything-else"
    assert match(rules, mg(Modality="SR")).action == "drop"
    assert match(rules, mg(PresentationIntentType="FOR PROCESSING")).action == "store"
    assert match(rules, mg(PatientAge="052Y"), "PACS_QR").rule.name == "archive-backfill"
    assert match(rules, mg(PatientAge="052Y"), "MODALITY").rule.name == "screening"
    assert match(rules, mg(PatientAge="080Y"), "MODALITY").rule.name == "everything-else"


@pytest.mark.parametrize(
    "rule, words",
    [
        ({"name": "x", "action": "keep"}, ["rules[1] (x).action", "'keep'"]),
        ({"name": "x"}, ["rules[1] (x).action"]),
        ({"name": "x", "action": "store", "colour": "red"}, ["rules[1] (x).colour", "unknown setting"]),
        ({"name": "x", "action": "store", "modality": 3}, ["rules[1] (x).modality", "got 3"]),
        ({"name": "x", "action": "store", "modality": ["MG", 4]}, ["rules[1] (x).modality"]),
        ({"name": "x", "action": "store", "modality": []}, ["rules[1] (x).modality"]),
        ({"name": "x", "action": "store", "patient_age": [74, 40]}, ["rules[1] (x).patient_age", "[74, 40]"]),
        ({"name": "x", "action": "store", "patient_age": [40]}, ["rules[1] (x).patient_age"]),
        ({"name": "x", "action": "store", "patient_age": [40, 1000]}, ["rules[1] (x).patient_age"]),
        ({"name": "x", "action": "store", "patient_age": ["40", "74"]}, ["rules[1] (x).patient_age"]),
        ({"name": "has space", "action": "store"}, ["rules[1].name"]),
        ({"action": "store"}, ["rules[1].name", "required"]),
        ({"name": "default", "action": "store"}, ["rules[1] (default).name"]),
    ],
)
def test_invalid_rule_names_the_rule(tmp_path, rule, words):
    with pytest.raises(ConfigError) as caught:
        rules_of(tmp_path, {"name": "ok", "action": "process", "modality": "MG"}, rule)
    message = str(caught.value)
    for word in words:
        assert word in message, message


def test_duplicate_and_unreachable_rules_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"rules\[1\] \(a\)\.name: also the name of rules\[0\]"):
        rules_of(tmp_path, {"name": "a", "action": "drop", "modality": "CT"}, {"name": "a", "action": "store"})
    with pytest.raises(ConfigError, match=r"rules\[1\] \(b\): never applies, rules\[0\] \(a\) has no conditions"):
        rules_of(tmp_path, {"name": "a", "action": "store"}, {"name": "b", "action": "drop", "modality": "CT"})
    (tmp_path / "bad.toml").write_text('rules = "drop everything"\n')
    with pytest.raises(ConfigError, match=r"^rules: expected an array of tables"):
        load_config(tmp_path / "bad.toml", environ={})


@pytest.mark.parametrize(
    "command, rule, words",
    [
        ("serve", {"name": "lab", "action": "discard"}, ["rules[0] (lab).action", "discard"]),
        ("rules", {"name": "lab", "action": "drop", "modalty": "CT"}, ["rules[0] (lab).modalty", "unknown setting"]),
        ("rules", {"name": "lab", "action": "drop", "modality": 7}, ["rules[0] (lab).modality"]),
        ("rules", {"name": "lab", "action": "drop", "patient_age": [80, 20]}, ["rules[0] (lab).patient_age"]),
    ],
)
def test_cli_refuses_invalid_rules_in_one_line_exit_2(tmp_path, command, rule, words):
    config = write_config(tmp_path / "config.toml", {"storage": {"directory": str(tmp_path / "s")}}, rules=[rule])
    args = ("serve",) if command == "serve" else ("rules", "test", str(config))
    result = cli(*args, config=config, check=False, timeout=60)
    assert result.returncode == 2, (result.stdout, result.stderr)
    text = result.stderr.strip()
    assert len(text.splitlines()) == 1 and "Traceback" not in text, text
    assert "configuration error" in text
    for word in words:
        assert word in text, text
    assert not (tmp_path / "s").exists()  # refused before anything was created


def test_rules_test_prints_rule_action_and_why(tmp_path):
    exam = exam_datasets(shape=(64, 48), patient_id="RULES01")
    exam[0].PatientAge = "052Y"
    exam[1].Modality = "CT"
    exam[2].PatientAge = "030Y"
    files = []
    for i, ds in enumerate(exam[:3]):
        files.append(tmp_path / f"{i}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")
    config = write_config(
        tmp_path / "config.toml",
        {},
        rules=[
            {"name": "no-ct", "action": "drop", "modality": ["CT", "MR"]},
            {"name": "archive", "action": "store", "calling_ae": "ARCH*"},
            {"name": "screening", "action": "process", "patient_age": [40, 74]},
            {"name": "others", "action": "store"},
        ],
    )
    out = json.loads(cli("rules", "test", *map(str, files), "--json", config=config, timeout=60).stdout)
    assert [(r["rule"], r["index"], r["action"]) for r in out] == [
        ("screening", 2, "process"),
        ("no-ct", 0, "drop"),
        ("others", 3, "store"),
    ]
    assert out[0]["reasons"] == ["patient_age 52 (from Patient's Age) in [40, 74]"]
    assert [p["rule"] for p in out[0]["passed_over"]] == ["no-ct", "archive"]
    assert out[1]["reasons"] == ["modality 'CT' matches 'CT'"]
    assert "outside [40, 74]" in out[2]["passed_over"][2]["why_not"]
    human = cli("rules", "test", str(files[0]), str(junk), "--calling-ae", "ARCHIVE", config=config, check=False)
    assert human.returncode == 1  # one file unreadable
    lines = human.stdout.splitlines()
    assert lines[0] == f"{files[0]}: rule 'archive' (rules[1]), action store"
    assert "  matched: calling_ae 'ARCHIVE' matches 'ARCH*'" in lines
    assert any(line.startswith(f"{junk}: error: cannot parse data set") for line in lines)
    missing = cli("rules", "test", str(tmp_path / "nope.dcm"), config=config, check=False)
    assert missing.returncode == 2 and "nope.dcm: no such file" in missing.stderr
