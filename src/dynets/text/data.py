"""Text classification tables (TSV / CSV) and their encoding into token-id datasets.

`load_text_table` reads a delimited file with a text column and a label column (by header name or
0-based index) and fails on the first bad row with its 1-based line number, so a broken data file
is found at load time rather than as a cryptic error in the middle of training. Labels stay
strings; `classes` fixes their order (the training set's, when `labels=` is given for a dev set).
`encode_table(model, table)` tokenises the texts into a `TextDataset` with `.x` (N, L) token ids
and `.y` (N,) class indices, the shape of data the train loop takes.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dynets.core.tensors import check_batch_size

__all__ = ["TextDataset", "TextTable", "encode_table", "length_batches", "load_text_table"]


@dataclass
class TextTable:
    """texts[i] with label name labels[i]; label_ids[i] = classes.index(labels[i])."""

    texts: list[str]
    labels: list[str]
    label_ids: torch.Tensor  # (N,) int64
    classes: list[str]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class TextDataset:
    """Encoded texts: x (N, L) int64 token ids right-padded with the pad id, y (N,) int64."""

    x: torch.Tensor
    y: torch.Tensor
    classes: list[str]

    def __len__(self) -> int:
        return self.x.shape[0]


def _sorted_classes(names: set[str]) -> list[str]:
    """Integer-looking labels in numeric order ("2" before "10"), anything else alphabetically."""
    try:
        return sorted(names, key=int)
    except ValueError:
        return sorted(names)


def _column(spec: str | int, header: list[str] | None, what: str, path: Path) -> int:
    if isinstance(spec, bool) or not isinstance(spec, (str, int)):
        raise TypeError(f"{what}: expected a column name or 0-based index, got {spec!r}")
    if isinstance(spec, int):
        if spec < 0:
            raise ValueError(f"{what}: expected a 0-based index >= 0, got {spec}")
        return spec
    if header is None:
        raise ValueError(
            f"{what}={spec!r} names a column, but {path} is read without a header (header=False)"
        )
    if spec not in header:
        raise ValueError(f"{what}={spec!r}: no such column in {path}; its header has {header}")
    return header.index(spec)


def load_text_table(
    path: str | os.PathLike,
    *,
    text_column: str | int = "sentence",
    label_column: str | int = "label",
    delimiter: str | None = None,
    labels: Sequence[str] | None = None,
    header: bool = True,
) -> TextTable:
    """Read a text classification table.

    delimiter: None picks a tab for .tsv and a comma for .csv. labels: the known label set (the
    training set's classes, in order); a row with another label is an error. header: whether the
    first line names the columns (columns given by name need it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text table {str(path)!r} does not exist")
    if delimiter is None:
        suffix = path.suffix.lower()
        if suffix not in (".tsv", ".csv"):
            raise ValueError(f"{path}: cannot infer the delimiter from suffix {suffix!r}; pass delimiter=")
        delimiter = "\t" if suffix == ".tsv" else ","
    known = None if labels is None else [str(v) for v in labels]
    texts: list[str] = []
    names: list[str] = []
    with path.open(newline="", encoding="utf-8") as f:
        # TSV files such as GLUE's are not quoted: a quote character is part of the text there.
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        head = next(reader, None) if header else None
        if header and head is None:
            raise ValueError(f"{path} is empty: expected a header line")
        ti = _column(text_column, head, "text_column", path)
        li = _column(label_column, head, "label_column", path)
        n_fields = len(head) if head is not None else None
        for row in reader:
            line = reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank line
            if n_fields is None:
                n_fields = len(row)  # without a header, the first row fixes the width
            if len(row) != n_fields or max(ti, li) >= len(row):
                raise ValueError(
                    f"{path}, line {line}: expected {n_fields} fields (with columns {ti} and {li}), "
                    f"got {len(row)}: {row!r:.200}"
                )
            text, label = row[ti].strip(), row[li].strip()
            if not text:
                raise ValueError(f"{path}, line {line}: empty text")
            if not label:
                raise ValueError(f"{path}, line {line}: empty label")
            if known is not None and label not in known:
                raise ValueError(
                    f"{path}, line {line}: label {label!r} is not among the known labels {known}"
                )
            texts.append(text)
            names.append(label)
    if not texts:
        raise ValueError(f"{path}: expected at least one row of data, got none")
    classes = known if known is not None else _sorted_classes(set(names))
    index = {c: i for i, c in enumerate(classes)}
    ids = torch.tensor([index[n] for n in names], dtype=torch.long)
    return TextTable(texts=texts, labels=names, label_ids=ids, classes=classes)


def encode_table(model: Any, table: TextTable) -> TextDataset:
    """Tokenise `table` with `model.encode` and map its label names onto the model's labels."""
    classes = list(model.config.labels)
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(table.labels) - set(index))
    if unknown:
        raise ValueError(f"table labels {unknown} are not among the model's labels {classes}")
    y = torch.tensor([index[n] for n in table.labels], dtype=torch.long)
    return TextDataset(x=model.encode(table.texts), y=y, classes=classes)


def length_batches(
    x: torch.Tensor, batch_size: int, *, pad_token_id: int = 0, sort: bool = True
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Cut token ids x (N, L) into batches: [(indices (b,), ids (b, L_b))], each trimmed to its own
    longest sentence. sort=True groups sentences of similar length (longest first), so a batch
    pads little; `indices` map each row back to its position in x.
    """
    check_batch_size(batch_size)
    if x.dim() != 2:
        raise ValueError(f"x: expected token ids of shape (N, L), got {tuple(x.shape)}")
    pos = torch.arange(1, x.shape[1] + 1)
    lengths = ((x != pad_token_id) * pos).amax(dim=1).clamp(min=1) if x.shape[1] else x.new_ones(x.shape[0])
    order = torch.argsort(lengths, descending=True, stable=True) if sort else torch.arange(x.shape[0])
    out = []
    for idx in order.split(batch_size):
        out.append((idx, x.index_select(0, idx)[:, : int(lengths[idx].max())]))
    return out
