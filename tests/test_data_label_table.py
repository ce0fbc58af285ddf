"""The one label-table helper of the file sources (radssl.data.label_table): reading, checks, joins."""

from __future__ import annotations

from pathlib import Path

import pytest

from radssl.data.dicom import DicomSourceConfig
from radssl.data.label_table import (
    LabelEntry,
    entry_label,
    label_record,
    read_label_table,
    table_classes,
)
from radssl.data.nifti import NiftiSourceConfig
from radssl.data.records import Record
from radssl.data.synthetic import SyntheticSpec
from radssl.data.synthetic3d import SyntheticVolumeSpec
from radssl.errors import DataError


def _csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "labels.csv"
    path.write_text(text)
    return path


def test_keys_may_repeat_with_the_same_label_but_not_with_another(tmp_path: Path) -> None:
    path = _csv(tmp_path, "patient_id,label,split\nP1,nodule,train\n,normal,test\nP2, normal ,test\nP1,nodule,train\n")
    table = read_label_table(path, "patient_id", "label", "split")
    assert table == {"P1": LabelEntry("nodule", "train", f"{path}: line 2", 2),
                     "P2": LabelEntry("normal", "test", f"{path}: line 4", 4)}  # empty key passed over, cells stripped
    assert table_classes(None, table) == ["nodule", "normal"] and table_classes(["a"], table) == ["a"]
    path.write_text("patient_id,label\nP1,nodule\nP2,normal\nP1,normal\n")
    with pytest.raises(DataError, match=r"labels\.csv: line 4: 'P1' appears again with a different label "
                                        r"\(first on line 2\)"):
        read_label_table(path, "patient_id", "label")


def test_one_row_per_case_tables_refuse_any_repeat(tmp_path: Path) -> None:
    path = _csv(tmp_path, "case_id,label\ncase1,a\ncase1,a\n")
    with pytest.raises(DataError, match=r"labels\.csv: line 3: case 'case1' repeats line 2 — list each case once"):
        read_label_table(path, "case_id", "label", repeats="never")


def test_missing_columns_and_files_are_named_before_any_row_is_read(tmp_path: Path) -> None:
    path = _csv(tmp_path, "case_id,finding\ncase1,a\n")
    with pytest.raises(DataError, match=r"labels\.csv: columns \['label'\] not found; the CSV has \['case_id', "
                                        r"'finding'\] — fix label_key"):
        read_label_table(path, "case_id", "label", columns_fix="fix label_key/label_column")
    with pytest.raises(DataError, match=r"nothere\.csv: label CSV not found — check `label_csv`"):
        read_label_table(tmp_path / "nothere.csv", "case_id", "label")


def test_a_label_outside_the_classes_names_the_file_line_and_column() -> None:
    entry = LabelEntry("cyst", "", "labels.csv: line 7", 7)
    assert entry_label(LabelEntry("b", "", "x", 2), ["a", "b"], "label") == (1, "b")
    assert entry_label(LabelEntry("", "", "x", 2), ["a", "b"], "label") == (None, "")
    assert entry_label(None, ["a"], "label") == (None, "")
    with pytest.raises(DataError, match=r"labels\.csv: line 7: label 'cyst' in column 'finding' is not one of the "
                                        r"declared classes \['a', 'b'\]"):
        entry_label(entry, ["a", "b"], "finding")


def test_label_record_sets_class_names_only_with_a_class_list() -> None:
    labelled, plain = Record(pixels=None, path="a"), Record(pixels=None, path="b")  # type: ignore[arg-type]
    label_record(labelled, 1, ["a", "b"], "b")
    label_record(plain, None, None, "")
    assert labelled.label == 1 and labelled.extra == {"class_names": ("a", "b"), "class_name": "b"}
    assert plain.label is None and plain.extra == {}


@pytest.mark.parametrize("config_class", [DicomSourceConfig, NiftiSourceConfig])
def test_label_and_report_csvs_are_read_inside_root_for_dicom_and_nifti(tmp_path: Path, config_class: type) -> None:
    config = config_class(root=tmp_path, label_csv="labels.csv", report_csv="sub/reports.csv")
    assert config.label_csv == tmp_path / "labels.csv" and config.report_csv == tmp_path / "sub" / "reports.csv"
    absolute = config_class(root=tmp_path, label_csv=Path("/elsewhere/labels.csv"))
    assert absolute.label_csv == Path("/elsewhere/labels.csv") and absolute.report_csv is None
    with pytest.raises(ValueError, match="extra"):
        config_class(root=tmp_path, label_csvs="labels.csv")


@pytest.mark.parametrize(("spec", "message"), [
    (lambda: SyntheticSpec(n_patients=0), "SyntheticSpec: n_patients=0 is invalid — use at least 1 patient"),
    (lambda: SyntheticSpec(site=-1, finding_contrast=-1.0), "SyntheticSpec: site=-1 is invalid"),
    (lambda: SyntheticVolumeSpec(site=-1, finding_contrast=-1.0), "SyntheticVolumeSpec: finding_contrast=-1.0 is"),
    (lambda: SyntheticVolumeSpec(positive_rate=1.5), "SyntheticVolumeSpec: positive_rate=1.5 is invalid"),
])
def test_synthetic_specs_share_their_checks_in_their_own_order(spec, message: str) -> None:  # noqa: ANN001
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        spec()
