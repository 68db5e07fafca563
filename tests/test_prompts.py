"""Long prompts, attention weights and clip skip: A1111's parser and chunking, and images against diffusers.

The parser table's expected lists are worked out by hand from A1111's algorithm (modules/prompt_parser.py;
its own doctests are the first rows), weights written as the products it computes, in its order.
The image tests give diffusers' StableDiffusionPipeline the embeddings A1111's method defines, built
in torch from transformers' tokenizer and text encoder (`prompt_embeds=`), and compare its image with
sdonnx's for the plain prompt string (max |Δpixel| <= 2/255, as tests/test_pipeline_parity.py).
"""

from __future__ import annotations

from types import SimpleNamespace

import itertools
import random
import shutil
import types
from pathlib import Path

import numpy as np
import onnx
import pytest

from sdonnx.errors import InputError
from sdonnx.runtime import Pipeline
from sdonnx.runtime.manifest import Manifest, TensorSpec
from sdonnx.runtime import text
from sdonnx.runtime.prompts import MAX_CHUNKS, apply_weights, parse_prompt_attention, tokenize_prompt
from sdonnx.runtime.tokenizer import ClipTokenizer
from tiny_models import KINDS, _write_tokenizer

W = 1 / 1.1  # one pair of square brackets
BREAK = ("BREAK", -1.0)

PARSER_CASES = [
    # A1111's doctests
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [("a ", 1.0), ("house", 1.3 * 1.1 * 1.1), (" ", 1.1), ("on", 1.1 * W), (" a ", 1.1), ("hill", 0.5 * 1.1),
         (", sun, ", 1.1), ("sky", 1.1 * 1.1 * 1.1 * 1.1), (".", 1.1)],
    ),
    # nothing at all is one empty piece
    ("", [("", 1.0)]),
    ("[[a]]", [("a", W * W)]),
    ("((a) b", [("a", 1.1 * 1.1), (" b", 1.1)]),  # the open bracket closes at the end
    ("(a:1.5", [("a:1.5", 1.1)]),  # no ")": the colon and number are text, the bracket still open
    ("a:1.5)", [("a:1.5)", 1.0)]),  # ":1.5)" with no "(" open is text
    ("]a[", [("]a", 1.0)]),  # a closer with no opener is text; the last "[" covers nothing
    ("x)y]z", [("x)y]z", 1.0)]),
    ("[a:1.5]", [("a:1.5", W)]),  # weights belong to round brackets only
    ("(a[b)c]", [("a", 1.1), ("b", 1.1 * W), ("c", W)]),  # crossed brackets: each closes its own kind
    ("(a: 1.5 )", [("a", 1.5)]),
    ("(a:-1)", [("a", -1.0)]),
    ("(a:0)", [("a", 0.0)]),
    ("((a:2))", [("a", 2.0 * 1.1)]),
    (r"(\(a\):1.2)", [("(a)", 1.2)]),
    (r"\\(a)", [("\\", 1.0), ("a", 1.1)]),  # an escaped backslash, then a real bracket
    ("a\\b", [("ab", 1.0)]),  # a lone backslash is dropped
    ("(a)(b:1.1)", [("ab", 1.1)]),  # equal weights merge
    ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
    ("a BREAK", [("a", 1.0), BREAK, ("", 1.0)]),
    ("BREAKfast", [("BREAKfast", 1.0)]),
    ("a break b", [("a break b", 1.0)]),
    # deliberate difference: A1111 gives ("BREAK", -1.1) here, then feeds the literal word
    ("(a BREAK b)", [("a", 1.1), BREAK, ("b", 1.1)]),
]


SD1_TEXT = SimpleNamespace(text_hidden_states="final", pooled_text_encoder=None)  # the facts encoding reads


def encode_prompt(session, tokenizer, prompt, batch, **settings):
    """One SD 1.x text encoder's embeddings [batch, k * 77, D] (text.encode_prompt without pooling)."""
    return text.encode_prompt([text.TextEncoder("text_encoder", session, tokenizer)], SD1_TEXT, prompt, batch,
                              **settings)[0]


@pytest.mark.parametrize(("text", "expected"), PARSER_CASES, ids=[repr(t) for t, _ in PARSER_CASES])
def test_parser_matches_a1111(text, expected):
    assert parse_prompt_attention(text) == expected


@pytest.mark.parametrize("text", ["(a:1.2.3)", "(a:.)", "x (y: 1..2 ) z"])
def test_malformed_weight_is_an_input_error(text):
    with pytest.raises(InputError, match="negative_prompt: .*number after ':'"):
        parse_prompt_attention(text, field="negative_prompt")


def test_any_mix_of_brackets_parses():
    rng = random.Random(0)
    alphabet = "()[]\\: a1.5BREAK"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        try:
            pieces = parse_prompt_attention(text)
        except InputError:
            continue  # a malformed (text:weight) number
        assert pieces and all(isinstance(t, str) and isinstance(w, float) for t, w in pieces), text


# --- chunks ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["<|endoftext|>", "!"], ids=["endoftext-pad", "exclamation-pad"])
def tokenizer(request, tmp_path_factory) -> ClipTokenizer:
    folder = tmp_path_factory.mktemp("tokenizer")
    _write_tokenizer(folder, pad_token=request.param)
    return ClipTokenizer.from_folder(folder, 77)


def test_short_plain_prompt_is_the_truncating_tokenizers_row(tokenizer):
    prompt = "a red cube on a table, photo"
    chunks = tokenize_prompt(tokenizer, prompt)
    np.testing.assert_array_equal(chunks.ids, tokenizer([prompt]))
    assert (chunks.weights == 1).all()


def test_75_tokens_fill_one_chunk_and_the_76th_starts_another(tokenizer):
    cat = tokenizer.token_ids("cat")
    assert len(cat) == 1
    assert len(tokenize_prompt(tokenizer, "cat " * 75)) == 1
    chunks = tokenize_prompt(tokenizer, "cat " * 75 + "dog")
    assert chunks.ids.shape == (2, 77)
    assert chunks.ids[0].tolist() == [tokenizer.bos_id, *cat * 75, tokenizer.eos_id]
    assert chunks.ids[1].tolist() == tokenizer.frame(tokenizer.token_ids("dog"))


def test_weights_follow_their_tokens_across_chunks(tokenizer):
    chunks = tokenize_prompt(tokenizer, "cat " * 74 + "(big dog:1.5) [tail]")
    big_dog, tail = tokenizer.token_ids("big dog"), tokenizer.token_ids("tail")
    assert chunks.weights[0].tolist() == [1.0] * 75 + [1.5, 1.0]  # bos, 74 cats, big, eos
    assert len(big_dog) == 2 and chunks.ids[1, 1:3].tolist() == [big_dog[1], *tail]
    np.testing.assert_allclose(chunks.weights[1, :4], [1.0, 1.5, W, 1.0], rtol=1e-7)
    assert (chunks.weights[1, 4:] == 1).all()  # eos and padding


def test_break_starts_a_chunk_and_an_empty_prompt_is_one_empty_chunk(tokenizer):
    empty = tokenizer.frame([])
    assert tokenize_prompt(tokenizer, "").ids.tolist() == [empty]
    assert tokenize_prompt(tokenizer, "cat BREAK dog").ids.tolist() == [
        tokenizer.frame(tokenizer.token_ids("cat")), tokenizer.frame(tokenizer.token_ids("dog"))
    ]
    assert tokenize_prompt(tokenizer, "cat BREAK").ids.tolist() == [tokenizer.frame(tokenizer.token_ids("cat"))]
    assert tokenize_prompt(tokenizer, "BREAK cat").ids.tolist()[0] == empty


def test_padding_appends_empty_chunks(tokenizer):
    chunks = tokenize_prompt(tokenizer, "(cat)").padded(3, tokenizer)
    assert chunks.ids[1:].tolist() == [tokenizer.frame([])] * 2
    assert (chunks.weights[1:] == 1).all() and chunks.weights[0, 1] == pytest.approx(1.1)
    assert len(chunks.padded(2, tokenizer)) == 3


def test_prompts_above_the_chunk_limit_are_refused(tokenizer):
    size = tokenizer.max_length - 2
    assert len(tokenize_prompt(tokenizer, "cat " * (MAX_CHUNKS * size))) == MAX_CHUNKS
    with pytest.raises(InputError, match=rf"prompt: .*at most {MAX_CHUNKS} chunks of {size} tokens"):
        tokenize_prompt(tokenizer, "cat " * (MAX_CHUNKS * size + 1))
    with pytest.raises(InputError, match="at most"):
        tokenize_prompt(tokenizer, " BREAK ".join(["cat"] * (MAX_CHUNKS + 1)))
    with pytest.raises(InputError, match="negative_prompt"):
        tokenize_prompt(tokenizer, "a photo of a cat " * 100_000, field="negative_prompt")  # 500k tokens


def test_weights_scale_tokens_and_keep_each_chunks_mean():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, 5, 3)).astype(np.float32) + 0.5
    weights = np.ones((2, 5), dtype=np.float32)
    assert apply_weights(z, weights) is z
    weights[0, 2], weights[1, 1] = 1.5, 0.5
    out = apply_weights(z, weights)
    np.testing.assert_allclose(out.mean(axis=(1, 2)), z.mean(axis=(1, 2)), rtol=1e-5)
    scale = out / (z * weights[:, :, None])  # one factor per chunk
    np.testing.assert_allclose(scale, scale[:, :1, :1] * np.ones_like(z), rtol=1e-5)
    assert not np.allclose(scale[:, 0, 0], 1.0)


class FixedBatchEncoder:
    """A text encoder graph with batch fixed at 2 whose output encodes each token id."""

    output_names = ["last_hidden_state"]
    path = "fake/text_encoder/model.onnx"

    def __init__(self):
        self.batches = []

    def input(self, name):
        return TensorSpec("input_ids", "int32", (2, "sequence_length"))

    def run(self, input_ids):
        assert input_ids.shape[0] == 2 and input_ids.dtype == np.int32
        self.batches.append(input_ids)
        return {"last_hidden_state": np.repeat(input_ids[:, :, None].astype(np.float32), 4, axis=2)}


def test_fixed_batch_graph_runs_chunks_in_its_batch(tokenizer):
    encoder = FixedBatchEncoder()
    prompt = "cat BREAK dog BREAK bird"
    out = encode_prompt(encoder, tokenizer, prompt, 3)
    ids = tokenize_prompt(tokenizer, prompt).ids
    assert len(encoder.batches) == 2 and out.shape == (3, 3 * 77, 4) and out.dtype == np.float32
    np.testing.assert_array_equal(out[2, :, 0], ids.reshape(-1).astype(np.float32))
    assert not out.flags.writeable


# --- export: clip-skip outputs ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_text_encoder_export_adds_clip_skip_outputs(tiny_exports, kind):
    outputs = Manifest.read(tiny_exports[kind]).graphs["text_encoder"].outputs
    graph = onnx.load(str(tiny_exports[kind] / "text_encoder" / "model.onnx"), load_external_data=False).graph
    # The tiny text encoders have 2 layers: hidden_states[-3] is the token embeddings.
    assert [o.name for o in outputs] == [o.name for o in graph.output] == [
        "last_hidden_state", "pooler_output", "clip_skip_2", "clip_skip_3"
    ]
    assert outputs[2].shape == outputs[0].shape == ("batch_size", "sequence_length", outputs[0].shape[2])


# --- images against diffusers ----------------------------------------------------------------------

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers_oracle import oracle_scheduler  # noqa: E402 (needs torch and diffusers)
from test_pipeline_parity import TOLERANCE, pipelines, references  # noqa: E402,F401 (shared fixtures)

pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")
STEPS, GUIDANCE = 6, 7.5
NEGATIVE = "blurry, ugly"
# "a (red:1.5) cube on a table, ... [shiny]" as A1111 parses it (103 tokens: two chunks).
WEIGHTED_PIECES = [("a ", 1.0), ("red", 1.5), (" cube on a table," * 20 + " ", 1.0), ("shiny", W)]
WEIGHTED_PROMPT = "a (red:1.5)" + " cube on a table," * 20 + " [shiny]"
LONG_PROMPT = "a red cube on a table," * 20  # 120 tokens


def a1111_embeddings(reference, pieces: list[tuple[str, float]], *, chunks: int):
    """[1, 77 * chunks, D]: A1111's chunked, weighted conditioning, computed with transformers in torch."""
    tokenizer, encoder = reference.tokenizer, reference.text_encoder
    tokens = [(t, w) for text, w in pieces for t in tokenizer(text, add_special_tokens=False).input_ids]
    rows = [tokens[i : i + 75] for i in range(0, len(tokens), 75)]
    rows += [[]] * (chunks - len(rows))
    zs = []
    for row in rows:
        ids = [tokenizer.bos_token_id, *(t for t, _ in row), tokenizer.eos_token_id]
        ids += [tokenizer.pad_token_id] * (77 - len(ids))
        weights = torch.tensor([1.0, *(w for _, w in row)] + [1.0] * (76 - len(row)))
        with torch.no_grad():
            z = encoder(torch.tensor([ids]))[0]
        weighted = z * weights[None, :, None]
        # A1111 rescales unweighted chunks too, by mean/mean: 1 for a real model, 0/0 for an untrained norm.
        zs.append(weighted * (z.mean() / weighted.mean()) if (weights != 1).any() else z)
    return torch.cat(zs, dim=1)


def diffusers_image(reference, monkeypatch, m, **embeddings) -> tuple[np.ndarray, np.ndarray]:
    """(starting latents, diffusers' euler image [H, W, 3] in [0, 1]) for the given embeddings."""
    latents = np.random.default_rng(3).standard_normal((1, m.latent_channels, m.sample_size, m.sample_size))
    latents = latents.astype(np.float32)
    scheduler, _ = oracle_scheduler(monkeypatch, "euler", reference.scheduler.config)
    oracle = diffusers.StableDiffusionPipeline.from_pipe(reference, scheduler=scheduler)
    oracle.set_progress_bar_config(disable=True)
    image = oracle(
        num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=torch.from_numpy(latents), output_type="np",
        **embeddings,
    ).images[0]
    return latents, image


def ours(pipeline: Pipeline, prompt: str, latents: np.ndarray, **settings) -> np.ndarray:
    (image,) = pipeline(prompt, NEGATIVE, steps=STEPS, guidance=GUIDANCE, sampler="euler", latents=latents, **settings)
    return np.asarray(image, dtype=np.float64) / 255


@pytest.mark.parametrize("kind", KINDS)
def test_long_prompt_matches_a1111_conditioning(kind, references, pipelines, monkeypatch, record_property):
    reference, pipeline = references[kind], pipelines[kind]
    cond = encode_prompt(pipeline.model.sessions["text_encoder"], pipeline.tokenizer, LONG_PROMPT, 1)
    assert cond.shape[1] == 154  # two chunks: the U-Net runs a 154-token context
    latents, expected = diffusers_image(
        reference, monkeypatch, pipeline.manifest,
        prompt_embeds=a1111_embeddings(reference, [(LONG_PROMPT, 1.0)], chunks=2),
        negative_prompt_embeds=a1111_embeddings(reference, [(NEGATIVE, 1.0)], chunks=2),
    )
    delta = np.abs(ours(pipeline, LONG_PROMPT, latents) - expected)
    record_property("max_delta_255", round(float(delta.max()) * 255, 3))
    assert delta.max() <= TOLERANCE, f"max {delta.max() * 255:.2f}/255"


@pytest.fixture(scope="module")
def normed(tiny_sources, tmp_path_factory) -> tuple[object, Pipeline]:
    """(diffusers pipeline, sdonnx pipeline) of sd1 with a trained-looking final_layer_norm.

    Freshly initialized, the norm has weight 1 and bias 0, so every embedding row has mean 0 and the
    mean that weighting restores is rounding noise; real CLIP models have a learned bias.
    """
    from sdonnx.export import ExportConfig, export_model

    source = Path(shutil.copytree(tiny_sources["sd1"], tmp_path_factory.mktemp("normed") / "source"))
    reference = diffusers.StableDiffusionPipeline.from_pretrained(source, safety_checker=None)
    norm = reference.text_encoder.final_layer_norm
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(norm.weight.shape, generator=generator))
        norm.bias.copy_(0.2 + 0.3 * torch.randn(norm.bias.shape, generator=generator))
    reference.text_encoder.save_pretrained(source / "text_encoder", safe_serialization=True)
    export_model(ExportConfig(str(source), source.parent / "export", quiet=True))
    return reference, Pipeline.load(source.parent / "export", provider="cpu", progress=False)


def test_weighted_prompt_matches_a1111_conditioning(normed, monkeypatch, record_property):
    reference, pipeline = normed
    encoder = pipeline.model.sessions["text_encoder"]
    cond = encode_prompt(encoder, pipeline.tokenizer, WEIGHTED_PROMPT, 1)
    expected_cond = a1111_embeddings(reference, WEIGHTED_PIECES, chunks=2)
    np.testing.assert_allclose(cond[0], expected_cond[0].numpy(), atol=1e-4, rtol=0)
    unweighted = a1111_embeddings(reference, [(t, 1.0) for t, _ in WEIGHTED_PIECES], chunks=2)
    assert np.abs(cond[0] - unweighted[0].numpy()).max() > 0.1  # the weights are felt
    latents, expected = diffusers_image(
        reference, monkeypatch, pipeline.manifest, prompt_embeds=expected_cond,
        negative_prompt_embeds=a1111_embeddings(reference, [(NEGATIVE, 1.0)], chunks=2),
    )
    delta = np.abs(ours(pipeline, WEIGHTED_PROMPT, latents) - expected)
    record_property("max_delta_255", round(float(delta.max()) * 255, 3))
    assert delta.max() <= TOLERANCE, f"max {delta.max() * 255:.2f}/255"


@pytest.mark.parametrize(("kind", "clip_skip"), list(itertools.product(KINDS, (2, 3))))
def test_clip_skip_matches_diffusers(kind, clip_skip, references, pipelines, monkeypatch, record_property):
    """A1111's clip skip n is diffusers' clip_skip=n-1, which diffusers applies to the prompt only:
    both halves are encoded with diffusers' own encode_prompt here, as A1111 skips both.

    diffusers 0.42 reads text_encoder.text_model.final_layer_norm, which transformers 5 no longer
    nests: a `text_model` attribute pointing at the same layer norm stands in for it.
    """
    reference, pipeline = references[kind], pipelines[kind]
    prompt = "a red cube on a table"
    encoder = reference.text_encoder
    if not hasattr(encoder, "text_model"):
        monkeypatch.setattr(encoder, "text_model", types.SimpleNamespace(final_layer_norm=encoder.final_layer_norm),
                            raising=False)

    def embeds(text):
        return reference.encode_prompt(text, "cpu", 1, False, clip_skip=clip_skip - 1)[0]

    latents, expected = diffusers_image(
        reference, monkeypatch, pipeline.manifest, prompt_embeds=embeds(prompt), negative_prompt_embeds=embeds(NEGATIVE)
    )
    delta = np.abs(ours(pipeline, prompt, latents, clip_skip=clip_skip) - expected)
    record_property("max_delta_255", round(float(delta.max()) * 255, 3))
    assert delta.max() <= TOLERANCE, f"max {delta.max() * 255:.2f}/255"
    unskipped = np.abs(ours(pipeline, prompt, latents) - expected)
    assert unskipped.max() > 5 * TOLERANCE  # the test can tell the layers apart


def test_weights_of_one_change_nothing(pipelines):
    pipeline = pipelines["sd1"]
    encoder = pipeline.model.sessions["text_encoder"]
    plain = encode_prompt(encoder, pipeline.tokenizer, "a red cube", 1)
    np.testing.assert_array_equal(plain, encoder.run(input_ids=pipeline.tokenizer(["a red cube"]))["last_hidden_state"])
    np.testing.assert_array_equal(encode_prompt(encoder, pipeline.tokenizer, "a (red:1.0) cube", 1), plain)
    images = [pipeline(p, steps=2, seed=1)[0] for p in ("a red cube", "a (red:1.0) cube", "(a (red) cube:0.90909)")]
    assert np.array_equal(np.asarray(images[0]), np.asarray(images[1]))
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[2]))


def test_negative_prompt_is_padded_to_the_prompts_chunks(pipelines):
    pipeline = pipelines["sd1"]
    encoder = pipeline.model.sessions["text_encoder"]
    short = encode_prompt(encoder, pipeline.tokenizer, NEGATIVE, 2, pad_to=WEIGHTED_PROMPT)
    empty = encode_prompt(encoder, pipeline.tokenizer, "", 1)
    assert short.shape == (2, 154, 32)
    alone = encode_prompt(encoder, pipeline.tokenizer, NEGATIVE, 1)
    np.testing.assert_array_equal(short[:, :77], np.repeat(alone, 2, axis=0))
    np.testing.assert_array_equal(short[1, 77:], empty[0])


def test_thousands_of_tokens_are_refused_by_field(pipelines):
    pipeline = pipelines["sd1"]
    with pytest.raises(InputError, match="^prompt: "):
        pipeline("cat " * 3000, steps=1)
    with pytest.raises(InputError, match="^negative_prompt: "):
        pipeline("cat", "dog " * 3000, steps=1)


def test_clip_skip_without_its_output_says_to_reexport(pipelines, optimum_fixture):
    with pytest.raises(InputError, match=r"clip_skip: got 5, expected 1 or one this text encoder .*sdonnx export"):
        pipelines["sd1"]("cat", steps=1, clip_skip=5)
    optimum = Pipeline.load(optimum_fixture, provider="cpu", progress=False)
    with pytest.raises(InputError, match=r"clip_skip: got 2, .*\(none; re-export the model with `sdonnx export`"):
        optimum("cat", steps=1, clip_skip=2)
