"""Text tables: columns by name or index, string labels, and errors that name the line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dynets.text import TextDataset, encode_table, load_text_table

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_string_labels_and_classes(tmp_path):
    t = load_text_table(
        write(tmp_path / "a.tsv", 'sentence\tlabel\nnice "quoted" film \tpos\nbad one\tneg\nok\tpos\n')
    )
    assert t.texts == ['nice "quoted" film', "bad one", "ok"]  # TSV is unquoted: quotes are text
    assert t.labels == ["pos", "neg", "pos"] and t.classes == ["neg", "pos"]
    assert t.label_ids.tolist() == [1, 0, 1] and t.label_ids.dtype == torch.int64
    dev = load_text_table(write(tmp_path / "dev.tsv", "sentence\tlabel\nfine\tneg\n"), labels=t.classes)
    assert dev.classes == ["neg", "pos"] and dev.label_ids.tolist() == [0]


def test_numeric_labels_sort_as_numbers(tmp_path):
    rows = "".join(f"text {i}\t{v}\n" for i, v in enumerate(["10", "2", "1"]))
    t = load_text_table(write(tmp_path / "n.tsv", "sentence\tlabel\n" + rows))
    assert t.classes == ["1", "2", "10"] and t.label_ids.tolist() == [2, 1, 0]


def test_columns_by_index_and_csv(tmp_path):
    t = load_text_table(
        write(tmp_path / "b.csv", '1,"hello, world"\n0,bye\n'), text_column=1, label_column=0, header=False
    )
    assert t.texts == ["hello, world", "bye"] and t.labels == ["1", "0"]
    t = load_text_table(
        write(tmp_path / "c.csv", "id,label,text\n7,a,x y\n"), text_column=2, label_column="label"
    )
    assert t.texts == ["x y"] and t.labels == ["a"]


def test_malformed_row_names_its_line(tmp_path):
    path = write(tmp_path / "bad.tsv", "sentence\tlabel\ngood\t1\nno label here\ngood\t0\n")
    with pytest.raises(ValueError, match=r"bad\.tsv, line 3: expected 2 fields"):
        load_text_table(path)


def test_unseen_dev_label(tmp_path):
    path = write(tmp_path / "dev.tsv", "sentence\tlabel\nfine\tpos\nodd\tmaybe\n")
    with pytest.raises(
        ValueError, match=r"line 3: label 'maybe' is not among the known labels \['neg', 'pos'\]"
    ):
        load_text_table(path, labels=["neg", "pos"])


def test_empty_text_and_missing_things(tmp_path):
    with pytest.raises(ValueError, match=r"e\.tsv, line 3: empty text"):
        load_text_table(write(tmp_path / "e.tsv", "sentence\tlabel\nfine\t1\n  \t0\n"))
    with pytest.raises(FileNotFoundError, match="missing.tsv"):
        load_text_table(tmp_path / "missing.tsv")
    with pytest.raises(ValueError, match=r"text_column='text'.*\['sentence', 'label'\]"):
        load_text_table(write(tmp_path / "f.tsv", "sentence\tlabel\na\t1\n"), text_column="text")
    with pytest.raises(ValueError, match="delimiter"):
        load_text_table(write(tmp_path / "g.txt", "sentence\tlabel\na\t1\n"))


def test_sst2_dev_loads(require_shared):
    t = load_text_table(require_shared("data/sst2/dev.tsv"), labels=["0", "1"])
    assert len(t) == 872 and t.label_ids.bincount().tolist() == [428, 444]


class _FakeModel:
    """What encode_table needs from a model: its labels and an `encode`."""

    class config:  # noqa: N801
        labels = ["neg", "pos"]

    @staticmethod
    def encode(texts):
        return torch.tensor([[2, len(t), 3] for t in texts])


def test_encode_table_maps_labels_by_name(tmp_path):
    t = load_text_table(write(tmp_path / "h.tsv", "sentence\tlabel\nab\tpos\nabc\tneg\n"))
    data = encode_table(_FakeModel(), t)
    assert isinstance(data, TextDataset) and data.y.tolist() == [1, 0] and data.x.shape == (2, 3)
    t.labels[0] = "meh"
    with pytest.raises(ValueError, match=r"\['meh'\].*\['neg', 'pos'\]"):
        encode_table(_FakeModel(), t)
