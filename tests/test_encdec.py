"""The encoder-decoder lineage (issue 16, training and export): span corruption, the RNN seq2seq and Transformer
models, the encoder and decoder-with-past graphs (parity, greedy tokens equal with and without the cache, alone
and batched with sources of other lengths, in PyTorch and ONNX Runtime), and MarianMT as the Transformer's oracle."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from plm.models import tokenization
from plm.models.seq2seq import Seq2Seq, Seq2SeqConfig, reverse_real
from plm.models.span_corruption import SpecialTokens, collate, corrupt, noise_mask, span_batches
from plm.models.transformer import Transformer, TransformerConfig, sinusoidal_table

SPECIALS = SpecialTokens(pad=0, bos=1, eos=2, first_sentinel=3, sentinels=8)
VOCAB = 200


def _sentences(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [list(map(int, rng.integers(11, VOCAB, size=rng.integers(2, 24)))) for _ in range(n)]


def _uncorrupt(source: list[int], target: list[int], specials: SpecialTokens) -> list[int]:
    """Put each span back in place of its sentinel."""
    spans: dict[int, list[int]] = {}
    current = None
    for t in target[:-1]:
        if specials.first_sentinel <= t < specials.first_sentinel + specials.sentinels:
            current = t
            spans[t] = []
        else:
            assert current is not None, "the target starts with a sentinel"
            spans[current].append(t)
    return [x for t in source[:-1] for x in spans.get(t, [t])]


# -- the objective ----------------------------------------------------------------------------------------------

def test_noise_mask_density_and_spans() -> None:
    rng = np.random.default_rng(0)
    for length in (2, 3, 10, 20, 57):
        mask = noise_mask(length, rng)
        assert 1 <= mask.sum() <= length - 1
        assert mask.sum() == min(max(round(length * 0.15), 1), length - 1)
        assert not mask[0], "kept tokens come first: a span never starts the sentence"
    with pytest.raises(ValueError, match="at least 2 tokens"):
        noise_mask(1, rng)


def test_corruption_round_trips_and_is_seeded() -> None:
    for sentence in _sentences(200):
        source, target = corrupt(sentence, np.random.default_rng(len(sentence)), SPECIALS)
        assert source[-1] == target[-1] == SPECIALS.eos
        assert target[0] == SPECIALS.first_sentinel
        sentinels = [t for t in source if t >= SPECIALS.first_sentinel and t < SPECIALS.first_sentinel + 8]
        assert sentinels == list(range(SPECIALS.first_sentinel, SPECIALS.first_sentinel + len(sentinels)))
        assert _uncorrupt(source, target, SPECIALS) == sentence
    one = span_batches({"train": _sentences(50), "valid": _sentences(9, 1)}, 4, np.random.default_rng(3), SPECIALS, 16)
    two = span_batches({"train": _sentences(50), "valid": _sentences(9, 1)}, 4, np.random.default_rng(3), SPECIALS, 16)
    for split in ("train", "valid", "train"):
        assert all(torch.equal(a, b) for a, b in zip(one(split), two(split), strict=True))


def test_tokenizer_sentinels_leave_other_tokenizers_alone() -> None:
    texts = ["The cat sat on the mat.", "A dog ran by the door."] * 10
    tok = tokenization.train_encdec_tokenizer(texts, vocab_size=320, sentinels=4)
    assert [tok.token_to_id(t) for t in ("<pad>", "<s>", "</s>", "<extra_id_0>", "<extra_id_3>")] == [0, 1, 2, 3, 6]
    enc = tok.encode("The<extra_id_0> sat", add_special_tokens=False)
    assert enc.tokens == ["The", "<extra_id_0>", "Ġsat"]  # what corrupting "The cat sat" puts in the encoder
    gpt = tokenization.train_bpe_tokenizer(texts, vocab_size=300)
    assert gpt.token_to_id(tokenization.ENDOFTEXT) == 0 and gpt.token_to_id("<extra_id_0>") is None


# -- the models -------------------------------------------------------------------------------------------------

def _transformer() -> Transformer:
    torch.manual_seed(0)
    return Transformer(TransformerConfig(vocab_size=VOCAB, max_position=40, n_encoder_layer=2, n_decoder_layer=2,
                                         n_head=2, d_model=32, d_ff=64, sentinels=8)).eval()


def _rnn() -> Seq2Seq:
    torch.manual_seed(0)
    return Seq2Seq(Seq2SeqConfig(vocab_size=VOCAB, max_position=40, n_layer=2, d_model=32, sentinels=8)).eval()


def test_sinusoid_is_the_formula_of_the_notes() -> None:
    table = sinusoidal_table(50, 16)
    for pos in (0, 1, 7, 49):
        for i in range(8):
            angle = pos / 10000 ** (2 * i / 16)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


@pytest.mark.parametrize("make", [_transformer, _rnn], ids=["transformer", "rnn"])
def test_cache_padding_and_batching_change_no_token(make) -> None:  # type: ignore[no-untyped-def]
    model = make()
    examples = [corrupt(s, np.random.default_rng(i), SPECIALS) for i, s in enumerate(_sentences(6, 2))]
    source, mask, decoder_input, _ = collate(examples, SPECIALS)
    with torch.no_grad():
        logits, _ = model(source, mask, decoder_input)
        padded = torch.nn.functional.pad
        more, _ = model(padded(source, (0, 5)), padded(mask, (0, 5)), decoder_input)
    assert torch.allclose(logits, more, atol=1e-5), "extra right padding of the sources changed the logits"
    batched = model.generate(source, mask, 30)
    assert torch.equal(batched, model.generate(source, mask, 30, use_cache=False))
    for row in range(len(examples)):
        n = int(mask[row].sum())
        alone = model.generate(source[row: row + 1, :n], mask[row: row + 1, :n], 30)[0]
        assert torch.equal(alone, batched[row, : alone.numel()])
        assert bool((batched[row, alone.numel():] == SPECIALS.pad).all())


def test_reverse_real_keeps_pads_in_place() -> None:
    x = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])[..., None]
    assert reverse_real(x, torch.tensor([3, 2]))[..., 0].tolist() == [[3, 2, 1, 0], [5, 4, 0, 0]]


# -- the built model: graphs, ONNX greedy, oracle ---------------------------------------------------------------

@pytest.fixture(scope="module")
def encdec_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny profile's encdec model, built on its own (the shared tiny repository leaves the family out)."""
    from plm.export.build import build_repository

    from tests.conftest import CACHE

    repo = tmp_path_factory.mktemp("encdec-repository")
    build_repository(profile="tiny", repository=repo, cache_dir=CACHE, families=["encdec"])
    return repo / "encdec"


def _load(folder: Path) -> Transformer:
    from plm.service.contract import manifest as contract

    m = contract.load(folder / contract.MANIFEST_FILE)
    model = Transformer(TransformerConfig(**m.config)).eval()
    weights = np.load(folder / "weights.npz")
    model.load_state_dict({k: torch.from_numpy(weights[k]) for k in weights.files})
    return model


def test_manifest_is_typed_and_parity_holds(encdec_folder: Path) -> None:
    from plm.export.build_encdec import PROFILES
    from plm.service.contract import manifest as contract

    m = contract.load(encdec_folder / contract.MANIFEST_FILE)
    spec = contract.require(m.encdec, "encdec", encdec_folder)
    assert spec.architecture == "transformer" and spec.decoder_start_id == 1 and spec.eos_id == 2
    assert spec.first_sentinel_id == 3 and spec.sentinels == 16
    assert set(m.graphs) == {"encoder", "decoder"}
    assert m.graphs["decoder"].cache_dims() == m.graphs["encoder"].cache_dims() == (2, 2, 16)
    assert m.parity["max_abs_diff"] <= 1e-4
    assert m.evaluation["greedy_onnx_equals_torch"] is True
    assert m.training["steps"] == PROFILES["tiny"].max_steps, "a fixed number of steps, not the clock"
    names = [i["name"] for i in m.graphs["decoder"].extra["inputs"]]
    assert names[:4] == ["input_ids", "attention_mask", "position_ids", "encoder_attention_mask"]
    assert names[4:6] == ["past_key_values.0.key", "past_key_values.0.value"] and names[-1] == "cross.1.value"


def test_onnx_greedy_equals_pytorch_with_and_without_cache(encdec_folder: Path) -> None:
    from plm.export.encdec_export import OnnxGreedy
    from plm.service.contract import manifest as contract

    model = _load(encdec_folder)
    spec = contract.require(contract.load(encdec_folder / contract.MANIFEST_FILE).encdec, "encdec", encdec_folder)
    tok = tokenization.load(encdec_folder / "tokenizer.json")
    texts = ["The king<extra_id_0> the crown.", "Now is the winter of our<extra_id_0>, and<extra_id_1> sun.",
             "Good<extra_id_0>", "To be, or not<extra_id_0> be: that is the question<extra_id_1> nobler"]
    rows = [[*tok.encode(t, add_special_tokens=False).ids, spec.eos_id] for t in texts]
    assert len({len(r) for r in rows}) == len(rows), "sources of different lengths"
    source, mask, _, _ = collate([(r, [spec.eos_id]) for r in rows], model.specials)
    runner = OnnxGreedy(encdec_folder, 2, 2, 16, spec.decoder_start_id, spec.eos_id, spec.pad_id)
    want = model.generate(source, mask, 24, use_cache=False).numpy()
    for use_cache in (True, False):
        assert np.array_equal(runner.generate(source.numpy(), mask.numpy(), 24, use_cache=use_cache), want)
    for i, r in enumerate(rows):  # each source alone: the same tokens as in the batch
        alone = runner.generate(source[i: i + 1, : len(r)].numpy(), mask[i: i + 1, : len(r)].numpy(), 24)[0]
        assert np.array_equal(alone, want[i, : alone.size]) and (want[i, alone.size:] == spec.pad_id).all()


def _marian(model: Transformer):  # type: ignore[no-untyped-def]
    """MarianMTModel with our weights: the same computation (post-LN, sinusoids, sqrt(d) embedding scale, shared
    embeddings tied to the output). One difference of layout: Marian's sinusoid table puts the sines in the first
    half of the channels and the cosines in the second, ours interleaves them as the paper and the notes; the
    table is a (frozen) weight, so ours is loaded in its place (a channel permutation of Marian's own)."""
    from transformers import MarianConfig, MarianMTModel

    c = model.config
    hf_config = MarianConfig(
        vocab_size=c.vocab_size, decoder_vocab_size=c.vocab_size, d_model=c.d_model, encoder_layers=c.n_encoder_layer,
        decoder_layers=c.n_decoder_layer, encoder_attention_heads=c.n_head, decoder_attention_heads=c.n_head,
        encoder_ffn_dim=c.d_ff, decoder_ffn_dim=c.d_ff, activation_function="relu",
        max_position_embeddings=c.max_position, scale_embedding=True, pad_token_id=c.pad_id, eos_token_id=c.eos_id,
        decoder_start_token_id=c.bos_id,
        forced_eos_token_id=None, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        share_encoder_decoder_embeddings=True, tie_word_embeddings=True)
    hf = MarianMTModel(hf_config).eval()
    state = {"model.shared.weight": model.shared.weight, "lm_head.weight": model.shared.weight,
             "final_logits_bias": torch.zeros(1, c.vocab_size)}
    for side in ("encoder", "decoder"):
        state[f"model.{side}.embed_tokens.weight"] = model.shared.weight
        state[f"model.{side}.embed_positions.weight"] = model.positions
    for name, p in model.named_parameters():
        if name.startswith(("encoder_layers.", "decoder_layers.")):
            side, rest = name.split("_layers.", 1)
            state[f"model.{side}.layers.{rest.replace('ffn.', '')}"] = p
    missing, unexpected = hf.load_state_dict({k: v.detach() for k, v in state.items()}, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return hf


def test_marian_is_an_exact_oracle(encdec_folder: Path) -> None:
    from transformers.models.marian.modeling_marian import MarianSinusoidalPositionalEmbedding

    model = _load(encdec_folder)
    c = model.config
    marian_table = MarianSinusoidalPositionalEmbedding(c.max_position, c.d_model).create_weight()
    halves = torch.cat((torch.arange(0, c.d_model, 2), torch.arange(1, c.d_model, 2)))
    assert torch.allclose(marian_table, model.positions[:, halves], atol=1e-6), "the same sinusoids, reordered"
    hf = _marian(model)
    examples = [corrupt(s, np.random.default_rng(i), model.specials)
                for i, s in enumerate([[int(x) for x in r] for r in np.random.default_rng(5).integers(
                    20, c.vocab_size, size=(5, 20))])]
    examples = [([*s[: 6 + 3 * i], c.eos_id], t) for i, (s, t) in enumerate(examples)]  # sources of 5 lengths
    source, mask, decoder_input, targets = collate(examples, model.specials)
    with torch.no_grad():
        ours, _ = model(source, mask, decoder_input)
        theirs = hf(input_ids=source, attention_mask=mask, decoder_input_ids=decoder_input).logits
    real = targets != -100
    assert (ours - theirs)[real].abs().max().item() <= 1e-5
    want = model.generate(source, mask, 20)
    got = hf.generate(input_ids=source, attention_mask=mask, max_new_tokens=20, do_sample=False, num_beams=1)
    got = got[:, 1:]  # Marian's output starts with the decoder start token
    for row in range(len(examples)):
        w, g = want[row].tolist(), got[row].tolist()
        end = w.index(c.eos_id) + 1 if c.eos_id in w else len(w)
        assert g[:end] == w[:end]
