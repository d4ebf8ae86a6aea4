"""Shared test fixtures: access to the read-only ``../shared`` data (see ``dynets.data.data_root``).

Tests that need shared data take the ``require_shared`` fixture and call it with a path relative to the
data root. Locally a missing file skips the test; in CI (the ``CI`` environment variable set) it fails,
so a broken data set-up can never pass silently as a run of skips.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from dynets.data import data_root


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch at one thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``):
    for tests that run the model beside a server thread, onnxruntime or a tokenizer pool."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


BERT_WORDS = (
    "the a an this that movie film story plot acting cast is was are were good bad great awful fun dull "
    "not very quite really funny boring smart silly and but it i loved hated every minute of"
).split()
BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *BERT_WORDS]


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A tiny random BERT (4 layers, hidden 32) with a word-level tokenizer over BERT_VOCAB, in the
    Hugging Face layout (needs the `text` extra)."""
    import torch

    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=64,
    )
    transformers.BertModel(cfg).save_pretrained(d)
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(BERT_VOCAB)}).save_pretrained(d)
    return d


def require_shared(relpath: str = "") -> Path:
    """``data_root() / relpath`` if it exists; otherwise skip the test (which fails it in CI: see the
    hooks at the end of this file)."""
    try:
        path = data_root() / relpath
    except FileNotFoundError as e:  # no data root at all: its message names DYNETS_DATA and the paths tried
        msg = f"shared data {relpath!r} unavailable: {e}"
    else:
        if path.exists():
            return path
        msg = f"shared data not found: {path}; set DYNETS_DATA to the folder that holds data/"
    pytest.skip(msg)


@pytest.fixture(name="require_shared", scope="session")
def _require_shared_fixture() -> Callable[[str], Path]:
    """The ``require_shared(relpath) -> Path`` function, as a fixture for test files."""
    return require_shared


@pytest.fixture(scope="session")
def shared_root() -> Path:
    """The shared data root (skips locally, fails in CI, when there is none)."""
    return require_shared("")


# In CI nothing may skip: a missing optional extra (transformers, fastapi, ...) or missing shared
# data must show as a failure there, so a skip at collection or at run time is turned into one.
@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if _in_ci() and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"CI forbids skipped tests; {collector.nodeid} was skipped: {report.longrepr}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if _in_ci() and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"CI forbids skipped tests; {item.nodeid} was skipped: {report.longrepr}"
