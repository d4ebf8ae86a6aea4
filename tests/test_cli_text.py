"""Smoke tests of the text side of the `dynets` command (train text, eval, predict, bench bert) on a
tiny random BERT with a word-level tokenizer, plus bad input: missing files, unknown columns,
empty tables, unseen labels and model directories of the wrong kind. Nothing here trains for real.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
import torch

from dynets.cli import main
from dynets.core.serialization import load

transformers = pytest.importorskip("transformers")

POS = "good great fun smart funny loved".split()
NEG = "bad awful dull boring silly hated".split()
FILL = "the a this movie film story plot acting cast is was and but it very really quite".split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POS, *NEG, *FILL]


def sentence(rng: random.Random, label: str, n: int) -> str:
    words = [rng.choice(FILL) for _ in range(n - 1)]
    words.insert(rng.randrange(n), rng.choice(POS if label == "pos" else NEG))
    return " ".join(words)


def write_table(path: Path, n: int, seed: int, *, sep: str = "\t", header: str = "sentence\tlabel") -> Path:
    rng = random.Random(seed)
    rows = [header] if header else []
    for i in range(n):
        label = ["neg", "pos"][i % 2]
        s = sentence(rng, label, rng.randrange(2, 14))
        rows.append(f"{s}{sep}{label}" if sep == "\t" else f"{label}{sep}{s}")
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> Path:
    """A tiny random BERT (3 layers, hidden 16) and tokenizer in the Hugging Face layout."""
    d = tmp_path_factory.mktemp("tiny-encoder")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        hidden_size=16,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=32,
        vocab_size=len(VOCAB) + 4,
        max_position_embeddings=40,
    )
    transformers.BertModel(cfg).save_pretrained(d)
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tables")
    return {
        "train": write_table(d / "train.tsv", 48, 1),
        "dev": write_table(d / "dev.tsv", 20, 2),
        "csv": write_table(d / "dev.csv", 12, 3, sep=",", header="label,text"),
    }


def train_argv(enc: Path, tables: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "train", "text", "--model", str(enc), "--train", str(tables["train"]), "--dev", str(tables["dev"]),
        "--out", str(out), "--epochs", "1", "--batch-size", "16", "--lr", "1e-3", "--max-length", "24",
        "--threads", "1", "--no-progress", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tiny_encoder, tables, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("text-run")
    assert main(train_argv(tiny_encoder, tables, out, "--recipe", "distill")) == 0
    return out


def test_train_text_saves_a_dynamic_bert(run_dir):
    model = load(run_dir / "model")
    assert type(model).__name__ == "DynamicBert" and model.config.labels == ["neg", "pos"]
    assert model.config.max_length == 24 and model.tokenizer is not None
    extra = json.loads((run_dir / "model" / "config.json").read_text())["extra"]
    assert extra["recipe"] == "distill" and [h["stage"] for h in extra["history"]] == [1, 2]
    assert not (run_dir / "checkpoints").exists()  # text training writes the model directory only
    assert model.policy.kind in ("confidence", "entropy", "patience", "learned", "never")


def test_train_text_dynabert_and_grid(tiny_encoder, tables, tmp_path, capsys):
    pytest.importorskip("dynets.text.dynabert")
    assert main(train_argv(tiny_encoder, tables, tmp_path, "--dynabert")) == 0
    assert json.loads((tmp_path / "model" / "config.json").read_text())["extra"]["dynabert"] is True
    argv = ["eval", str(tmp_path), "--data", str(tables["dev"]), "--out", str(tmp_path / "e")]
    axes = ["--no-timing", "--widths", "0.5,1.0", "--depths", "0.5,1.0"]
    assert main([*argv, "--json", str(tmp_path / "e.json"), *axes]) == 0
    grid = json.loads((tmp_path / "e.json").read_text())["grid"]
    assert {(g["width"], g["depth"]) for g in grid} == {(0.5, 0.5), (1.0, 0.5), (0.5, 1.0), (1.0, 1.0)}
    assert (tmp_path / "e" / "width_depth.png").stat().st_size > 0
    assert "| width | depth |" in capsys.readouterr().out


def test_eval_text_table_json_and_plots(run_dir, tables, tmp_path, capsys):
    js = tmp_path / "e.json"
    argv = ["eval", str(run_dir), "--data", str(tables["dev"]), "--out", str(tmp_path), "--json", str(js)]
    assert main([*argv, "--policies", "entropy,patience,learned", "--time-limit", "8", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "| entropy |" in out and "sentences/s" in out and "current policy" in out
    r = json.loads(js.read_text())
    assert {row["policy"] for row in r["rows"]} == {"entropy", "patience", "learned"}
    for row in r["rows"]:
        assert 1.0 <= row["mean_layers"] <= 3.0 and row["sps"] > 0 and row["speedup"] > 0
    assert len(r["anytime"]) == 3 and r["grid"] is None
    assert (tmp_path / "pareto.png").exists() and (tmp_path / "speed.png").exists()


def test_eval_csv_columns_by_index(run_dir, tables, tmp_path, capsys):
    argv = ["eval", str(run_dir), "--data", str(tables["csv"]), "--text-column", "1", "--label-column", "0"]
    assert main([*argv, "--out", str(tmp_path), "--no-timing"]) == 0
    assert "12 sentences" in capsys.readouterr().out


def test_predict_file_stdin_and_overrides(run_dir, tmp_path, monkeypatch, capsys):
    src = tmp_path / "in.txt"
    src.write_text("the film was good\n\nawful boring plot\nit was fun\n", encoding="utf-8")
    assert main(["predict", str(run_dir), str(src), "--batch-size", "2", "--threads", "1"]) == 0
    cap = capsys.readouterr()
    lines = cap.out.strip().splitlines()
    assert len(lines) == 3 and "skipped 1 blank line" in cap.err
    for line in lines:
        label, conf, layer, flops = line.split("\t")
        assert label in ("neg", "pos") and 0.5 <= float(conf) <= 1
        assert 1 <= int(layer) <= 3 and float(flops) > 0
    # stdin, JSON lines, the never-exit policy: every sentence runs all 3 layers
    monkeypatch.setattr("sys.stdin", io.StringIO("good\nbad movie\n"))
    assert main(["predict", str(run_dir), "-", "--json", "--policy", "never"]) == 0
    rows = [json.loads(v) for v in capsys.readouterr().out.splitlines()]
    assert [r["line"] for r in rows] == [1, 2] and all(r["exit_layer"] == 3 for r in rows)
    # a threshold of 0 on the confidence policy: everyone leaves at the first exit
    argv = ["predict", str(run_dir), str(src), "--json", "--policy", "confidence", "--threshold", "0"]
    assert main(argv) == 0
    assert {json.loads(v)["exit_layer"] for v in capsys.readouterr().out.splitlines()} == {1}
    assert main(["predict", str(run_dir), str(src), "--budget", "0.6", "--policy", "entropy"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3


def test_predict_image_npz(tmp_path, capsys):
    np = pytest.importorskip("numpy")
    from dynets.core.registry import create_model
    from dynets.core.serialization import save

    torch.manual_seed(0)
    kw = dict(widths=[8, 8, 16], blocks=[1, 1, 1], exits=[0, 1], head={"kind": "linear"})
    model = create_model("ee_resnet", in_channels=1, image_size=8, num_classes=3, **kw).eval()
    save(model, tmp_path / "m")
    np.savez(tmp_path / "x.npz", x=np.random.rand(5, 1, 8, 8).astype("float32"))
    assert main(["predict", str(tmp_path / "m"), str(tmp_path / "x.npz"), "--json"]) == 0
    rows = [json.loads(v) for v in capsys.readouterr().out.splitlines()]
    assert len(rows) == 5 and all(0 <= r["label"] < 3 and r["flops"] > 0 for r in rows)
    with pytest.raises(SystemExit, match=r"expected a text model directory.*got a EarlyExitResNet model"):
        main(["eval", str(tmp_path / "m"), "--data", str(tmp_path / "x.tsv")])


def test_bench_bert_quick_on_a_tiny_encoder(tiny_encoder, tmp_path, monkeypatch, capsys):
    import dynets.bench.bert as bench

    monkeypatch.setenv("DYNETS_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "sst"
    data.mkdir()
    write_table(data / "train.tsv", 200, 4)
    write_table(data / "dev.tsv", 24, 5)
    real_run, seen = bench.run, []

    def smaller(cfg, **kw):  # the CLI's --quick config, trimmed further so the test stays fast
        seen.append(dict(quick=cfg.quick, train_limit=cfg.train_limit, threads=cfg.threads))
        cfg.val_size, cfg.val_min_words, cfg.learned_steps, cfg.rounds = 24, 6, 20, 1
        cfg.b1_samples, cfg.curve_policies, cfg.widths, cfg.depths = 4, ("patience",), (0.5, 1.0), (1.0,)
        return real_run(cfg, **kw)

    monkeypatch.setattr(bench, "run", smaller)
    js = tmp_path / "r" / "bert.json"
    argv = [
        "bench",
        "bert",
        "--quick",
        "--encoder",
        str(tiny_encoder),
        "--data",
        str(data),
        "--json",
        str(js),
    ]
    assert main([*argv, "--train-limit", "32", "--threads", "1", "--no-progress"]) == 0
    assert seen == [{"quick": True, "train_limit": 32, "threads": 1}]
    r = json.loads(js.read_text())
    for k in bench.HEADLINE_KEYS:
        assert isinstance(r[k], float), k
    assert r["data"]["train_sentences"] == 32 and r["data"]["max_length"] == 40  # clipped to the encoder
    assert r["recipe"] in bench.BENCH_RECIPES and set(r["curves"]) == {"patience"}
    assert set(r["recipes"]) == {"two_stage", "distill", "joint", "joint_distill"}
    assert r["policy"]["kind"] and 1.0 <= r["mean_layers"] <= 3.0
    assert (tmp_path / "r" / "bert.md").exists() and (tmp_path / "r" / "bert_curves.png").exists()
    if r["dynabert_grid"] is not None:
        assert [(g["width"], g["depth"]) for g in r["dynabert_grid"]] == [(0.5, 1.0), (1.0, 1.0)]
    # trained models are cached by what decides them, so timing can be re-run without training
    cached = sorted(p.name.split("-")[2] for p in (tmp_path / "cache" / "bench").iterdir())
    assert {"static", "two_stage", "distill", "joint", "joint_distill"} <= set(cached)
    capsys.readouterr()
    # --bert-recipes names recipes; a wrong one is refused before training
    assert main([*argv, "--bert-recipes", "two_stage,bogus"]) != 0
    assert (
        "expected some of ['two_stage', 'distill', 'joint', 'joint_distill'], got ('two_stage', 'bogus')"
        in capsys.readouterr().err
    )
    assert main([*argv, "--bert-joint-epochs", "0"]) != 0
    assert "BertBenchConfig.joint_epochs: expected an int >= 1, got 0" in capsys.readouterr().err


def test_split_validation_keeps_phrases_of_validation_out_of_training():
    from dynets.bench.bert import split_validation

    texts = ["a good film overall", "good film", "a good film overall , really", "bad", "dull plot", "x y"]
    val, train = split_validation(texts, val_size=1, min_words=4, seed=0)
    assert len(val) == 1 and texts[val[0]] in (texts[0], texts[2])
    inside = {i for i, t in enumerate(texts) if f" {t} " in f" {texts[val[0]]} " or texts[val[0]] in t}
    assert not inside & set(train) and set(train) | set(val) | inside == set(range(6))


def test_validation_of_complete_sentences_mirrors_a_sentence_level_dev_set():
    from dynets.bench.bert import BertBenchConfig, complete_sentences, split_validation

    texts = [
        "a good film overall , really",  # sentence 1
        "a good film overall",
        "good film",
        "film",
        "dull plot , flat actors",  # sentence 2
        "dull plot",
        "flat  actors",  # irregular spacing is still a phrase of sentence 2
        "short",  # a one-word sentence
    ]
    assert complete_sentences(texts) == [True, False, False, False, True, False, False, True]
    for seed in range(4):
        val, train = split_validation(texts, val_size=2, min_words=99, seed=seed, sentences=True)
        assert len(val) == 2 and {texts[i] for i in val} <= {texts[0], texts[4], texts[7]}
        words = [" ".join(t.split()) for t in texts]
        for i in train:  # no phrase of a validation sentence is trained on
            assert all(f" {words[i]} " not in f" {words[v]} " for v in val)
        if 4 in val:
            assert not {5, 6} & set(train)
    with pytest.raises(ValueError, match="no training row is a complete sentence"):
        split_validation([], 1, 1, 0, sentences=True)
    with pytest.raises(ValueError, match="val_rows: expected 'sentences' or 'long', got 'dev'"):
        BertBenchConfig(val_rows="dev")


# ---------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "change, match",
    [
        (["--train", "/nowhere/train.tsv"], r"--train /nowhere/train.tsv: .*does not exist"),
        (["--text-column", "review"], r"text_column='review': no such column.*\['sentence', 'label'\]"),
        (["--label-column", "7"], r"expected 2 fields"),
        (["--model", "/nowhere/encoder"], r"--model /nowhere/encoder: .*does not exist"),
        (["--max-length", "999"], r"max_length: expected an int in \[2, 40\]"),
    ],
)
def test_train_text_bad_input(tiny_encoder, tables, tmp_path, change, match):
    argv = train_argv(tiny_encoder, tables, tmp_path / "run")
    for i in range(0, len(change), 2):
        if change[i] in argv:
            argv[argv.index(change[i]) + 1] = change[i + 1]
        else:
            argv += change[i : i + 2]
    with pytest.raises(SystemExit, match=match):
        main(argv)
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_train_text_empty_unseen_label_and_missing_options(tiny_encoder, tables, tmp_path):
    empty = tmp_path / "empty.tsv"
    empty.write_text("sentence\tlabel\n")
    with pytest.raises(SystemExit, match="expected at least one row"):
        main(train_argv(tiny_encoder, {**tables, "train": empty}, tmp_path / "run"))
    odd = write_table(tmp_path / "odd.tsv", 4, 9)
    odd.write_text(odd.read_text() + "a new label here\tmixed\n")
    with pytest.raises(SystemExit, match=r"line 6: label 'mixed' is not among the known labels"):
        main(train_argv(tiny_encoder, {**tables, "dev": odd}, tmp_path / "run"))
    with pytest.raises(SystemExit, match="expected --model, --dev"):
        main(["train", "text", "--train", str(tables["train"])])
    with pytest.raises(SystemExit, match="expected --data and --out"):
        main(["train", "ee_resnet", "--data", "digits"])
    assert not (tmp_path / "run").exists()


def test_not_a_bert_encoder_dir(tables, tmp_path):
    gpt = tmp_path / "gpt2"
    transformers.GPT2Model(
        transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=20, bos_token_id=0, eos_token_id=0)
    ).save_pretrained(gpt)
    with pytest.raises(SystemExit, match=r"--model .*gpt2.*expected a BERT-family encoder"):
        main(train_argv(gpt, tables, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_eval_and_predict_bad_input(run_dir, tables, tmp_path, capsys):
    with pytest.raises(SystemExit, match="--data /nowhere.tsv: .*does not exist"):
        main(["eval", str(run_dir), "--data", "/nowhere.tsv"])
    with pytest.raises(SystemExit, match="--policies: expected some of"):
        main(["eval", str(run_dir), "--data", str(tables["dev"]), "--policies", "magic"])
    with pytest.raises(SystemExit, match="input file '/nowhere.txt' does not exist"):
        main(["predict", str(run_dir), "/nowhere.txt"])
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    with pytest.raises(SystemExit, match="expected at least one sentence"):
        main(["predict", str(run_dir), str(blank)])
    with pytest.raises(SystemExit, match="expected sentences .* got .*x.npz"):
        main(["predict", str(run_dir), str(tmp_path / "x.npz")])
    with pytest.raises(SystemExit, match=r"threshold must lie in \[0.0, 1.0\]"):
        main(["predict", str(run_dir), str(tables["train"]), "--policy", "entropy", "--threshold", "3"])
    assert main(["predict", "/nowhere/model", str(blank)]) == 2
    assert "does not exist" in capsys.readouterr().err
