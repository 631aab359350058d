"""Tests for ovseg_core.features.text: templates, vocabularies, prompt-ensembled embeddings."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from ovseg_core.features.text import IMAGENET_TEMPLATES, text_embeddings
from ovseg_core.vocabulary import Vocabulary, parse_class_lines, parse_vocabulary_string


@pytest.fixture(scope="module")
def clip_model() -> CLIP:
    torch.manual_seed(0)
    return CLIP(
        embed_dim=32,
        vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=16, image_size=32),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
    ).eval()


@pytest.fixture(scope="module")
def tokenizer() -> open_clip.tokenizer.SimpleTokenizer:
    return open_clip.get_tokenizer("ViT-B-16")


def test_templates_are_the_80_openai_imagenet_templates() -> None:
    assert len(IMAGENET_TEMPLATES) == 80 == len(set(IMAGENET_TEMPLATES))
    assert IMAGENET_TEMPLATES == tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)
    assert IMAGENET_TEMPLATES[0] == "a bad photo of a {}."
    assert IMAGENET_TEMPLATES[-1] == "a tattoo of the {}."


def test_parse_class_lines_synonyms_and_mapping() -> None:
    vocab = parse_class_lines(["sky, wall, tree\n", "person, people", "cat", "", "  "])
    assert vocab.classes == (("sky", "wall", "tree"), ("person", "people"), ("cat",))
    assert vocab.num_classes == 3
    assert vocab.class_names == ("sky", "person", "cat")
    assert vocab.queries == ("sky", "wall", "tree", "person", "people", "cat")
    q2c = vocab.query_to_class
    assert q2c.dtype == np.int64 and q2c.tolist() == [0, 0, 0, 1, 1, 2]


def test_parse_class_lines_splits_on_the_literal_separator_only() -> None:
    # the references split on ", " exactly and strip nothing but the newline
    vocab = parse_class_lines(["sky, wall,tree", "person , people", "wood "])
    assert vocab.classes == (("sky", "wall,tree"), ("person ", "people"), ("wood ",))
    assert vocab.class_names == ("sky", "person", "wood")


def test_split_rule_on_the_semicolon_background_line() -> None:
    line = "sky; wall; tree; wood"
    # SC-CLIP's reader (", "): a "; "-separated line is ONE query
    assert parse_class_lines([line, "cat"], ", ").queries == (line, "cat")
    # CorrCLIP's reader ("; "): every stuff word is its own query of class 0
    vocab = parse_class_lines([line, "cat"], "; ")
    assert vocab.queries == ("sky", "wall", "tree", "wood", "cat")
    assert vocab.query_to_class.tolist() == [0, 0, 0, 0, 1]
    assert vocab.class_names == ("sky", "cat")


def test_parse_vocabulary_string() -> None:
    vocab = parse_vocabulary_string("cat; dog, puppy; grass;")
    assert vocab.classes == (("cat",), ("dog", "puppy"), ("grass",))
    assert vocab.query_to_class.tolist() == [0, 1, 1, 2]


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        (["cat", "", "dog"], "line 2 is blank"),
        (["cat, , dog"], "line 1: empty class name"),
        (["cat, "], "empty class name"),
        ([], "no classes"),
        (["", " "], "no classes"),
        ("cat\ndog", "not one string"),
    ],
)
def test_parse_class_lines_rejects(lines: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_class_lines(lines)


@pytest.mark.parametrize(("text", "match"), [("", "no classes"), ("cat;;dog", "class 2 .* is empty"), ("a, ;b", "empty")])
def test_parse_vocabulary_string_rejects(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_vocabulary_string(text)


def test_vocabulary_validation() -> None:
    with pytest.raises(ValueError, match="non-empty tuple of synonym tuples"):
        Vocabulary(classes=())
    with pytest.raises(ValueError, match=r"classes\[1\] must be a non-empty tuple"):
        Vocabulary(classes=(("a",), ()))
    with pytest.raises(ValueError, match="bad name ' '"):
        Vocabulary(classes=(("a", " "),))
    with pytest.raises(ValueError, match="on one line"):
        Vocabulary(classes=(("a\nb",),))
    assert Vocabulary(classes=(("wood ",),)).queries == ("wood ",)  # reference files keep outer spaces
    with pytest.raises(ValueError, match="separator"):
        parse_class_lines(["cat"], "")


@pytest.mark.slow
def test_embeddings_shape_norm_and_synonyms(clip_model: CLIP, tokenizer) -> None:
    vocab = parse_vocabulary_string("cat; dog, puppy; grass")
    emb = text_embeddings(clip_model, tokenizer, vocab, batch_size=50)
    assert emb.shape == (4, 32) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(4))
    # each synonym is its own query: "dog" and "puppy" differ
    assert not torch.allclose(emb[1], emb[2])
    # batching does not change the result
    torch.testing.assert_close(text_embeddings(clip_model, tokenizer, vocab, batch_size=7), emb)


def test_embeddings_equal_explicit_loop(clip_model: CLIP, tokenizer) -> None:
    vocab = Vocabulary(classes=(("aeroplane",), ("television monitor", "screen")))
    templates = IMAGENET_TEMPLATES[:5]
    got = text_embeddings(clip_model, tokenizer, vocab, templates=templates)
    rows = []
    with torch.no_grad():
        for name in vocab.queries:
            per_template = []
            for template in templates:
                feature = clip_model.encode_text(tokenizer([template.format(name)]))[0]
                per_template.append(feature / feature.norm())
            mean = torch.stack(per_template).mean(dim=0)
            rows.append(mean / mean.norm())
    torch.testing.assert_close(got, torch.stack(rows), rtol=1e-5, atol=1e-6)
    # the full 80-template ensemble differs from the 5-template one (templates are used)
    assert not torch.allclose(text_embeddings(clip_model, tokenizer, vocab), got)


def test_embeddings_bad_arguments(clip_model: CLIP, tokenizer) -> None:
    vocab = parse_vocabulary_string("cat")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        text_embeddings(clip_model, tokenizer, vocab, batch_size=0)
    with pytest.raises(ValueError, match="exactly one"):
        text_embeddings(clip_model, tokenizer, vocab, templates=("a photo.",))
    with pytest.raises(ValueError, match="non-empty sequence"):
        text_embeddings(clip_model, tokenizer, vocab, templates=())


def test_truncated_encoding_equals_encode_text(clip_model: CLIP, tokenizer) -> None:
    from ovseg_core.features.text import encode_text_truncated

    tokens = tokenizer(["a photo of a cat.", "a bad photo of a very long named television monitor on a table."])
    with torch.no_grad():
        full = clip_model.encode_text(tokens)
        short = encode_text_truncated(clip_model, tokens)
        single = encode_text_truncated(clip_model, tokens[:1])  # a shorter batch is cut shorter
    assert int(tokens.argmax(-1).max()) + 1 < tokens.shape[1]
    torch.testing.assert_close(short, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(single, full[:1], atol=1e-5, rtol=1e-5)
