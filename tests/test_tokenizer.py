"""CLIP tokenisation: known ids, EOT padding, truncation that keeps EOT, attention mask."""
import pytest
import torch

from data.tokenizer import CLIPTokenizer

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat", CLIP ViT-L/14
SOT_ID, EOT_ID = 49406, 49407


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer(token_length=12)


def test_known_ids_and_padding(tokenizer):
    input_ids, attention_mask = tokenizer("a photo of a cat")
    assert input_ids.dtype == torch.long and attention_mask.dtype == torch.long
    assert input_ids.shape == attention_mask.shape == (12,)
    assert input_ids.tolist() == CAT_IDS + [EOT_ID] * 5
    assert attention_mask.tolist() == [1] * 7 + [0] * 5
    assert (tokenizer.sot_id, tokenizer.eot_id) == (SOT_ID, EOT_ID)  # the vocabulary's own


def test_normalises_case_and_whitespace(tokenizer):
    assert tokenizer("  A  Photo of a CAT ")[0].tolist() == tokenizer("a photo of a cat")[0].tolist()


def test_num_tokens_counts_sot_and_eot(tokenizer):
    assert tokenizer.num_tokens("a photo of a cat") == 7
    long_text = " ".join(["cat"] * 30)
    assert tokenizer.num_tokens(long_text) == 32  # not capped by token_length


def test_truncation_keeps_eot_last(tokenizer):
    text = "the man in the red shirt standing on the far left next to a small dog"
    full = tokenizer.encode(text)
    assert len(full) + 2 > 12
    input_ids, attention_mask = tokenizer(text)
    assert input_ids.tolist() == [SOT_ID] + full[:10] + [EOT_ID]
    assert attention_mask.tolist() == [1] * 12


def test_exact_fit_is_not_truncated():
    tokenizer = CLIPTokenizer(token_length=7)
    input_ids, attention_mask = tokenizer("a photo of a cat")
    assert input_ids.tolist() == CAT_IDS
    assert attention_mask.tolist() == [1] * 7


def test_default_length_is_77():
    input_ids, attention_mask = CLIPTokenizer()("a photo of a cat")
    assert input_ids.shape == (77,) and int(attention_mask.sum()) == 7
    assert (input_ids[7:] == EOT_ID).all()


@pytest.mark.parametrize("text", ["", "   ", "\t\n"])
def test_empty_text_raises(tokenizer, text):
    with pytest.raises(ValueError, match="empty or whitespace-only"):
        tokenizer(text)
    with pytest.raises(ValueError):
        tokenizer.num_tokens(text)


def test_too_short_token_length():
    with pytest.raises(ValueError, match="token_length=1"):
        CLIPTokenizer(token_length=1)


def test_pads_with_the_models_id():
    input_ids, attention_mask = CLIPTokenizer(token_length=10, pad_id=0)("a photo of a cat")
    assert input_ids.tolist() == CAT_IDS + [0] * 3 and attention_mask.tolist() == [1] * 7 + [0] * 3
