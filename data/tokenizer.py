"""CLIP BPE tokenisation with the padding the model's text encoder expects.

Uses open_clip's ``SimpleTokenizer`` because it ships its BPE vocabulary (works offline) and
produces the same ids as OpenAI's / Hugging Face's CLIP tokenizer. The start and end ids are the
vocabulary's own; the padding id is the model's (its config's ``pad_token_id``: the end-of-text id
for SD v1.5's CLIP ViT-L/14, as its ``CLIPTokenizer`` pads).
"""
from __future__ import annotations

import torch

__all__ = ["CLIPTokenizer"]


class CLIPTokenizer:
    """Text -> fixed-length ``(input_ids, attention_mask)`` for the CLIP text encoder.

    ``[start, bpe..., end]``, truncated to ``token_length`` with the end id kept as the last token,
    then padded with ``pad_id`` (None: the end-of-text id). The attention mask is 1 over
    start..end and 0 over padding.
    """

    def __init__(self, token_length: int = 77, pad_id: int | None = None):
        if token_length < 2:
            raise ValueError(f"token_length={token_length} is too short; expected >= 2 "
                             "(room for the start and end tokens)")
        self.token_length = token_length
        # Imported here: open_clip pulls in its whole model zoo (seconds), only tokenising needs it.
        from open_clip.tokenizer import SimpleTokenizer
        self._bpe = SimpleTokenizer()
        self.sot_id = self._bpe.encoder["<start_of_text>"]
        self.eot_id = self._bpe.encoder["<end_of_text>"]
        self.pad_id = self.eot_id if pad_id is None else pad_id

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` without start/end; ValueError when nothing is left to encode."""
        if not isinstance(text, str):
            raise ValueError(f"expected text as str, got {type(text).__name__}")
        ids = self._bpe.encode(text) if text.strip() else []
        if not ids:
            raise ValueError(f"cannot tokenise empty or whitespace-only text {text!r}")
        return ids

    def num_tokens(self, text: str) -> int:
        """Untruncated length of ``text`` including start and end."""
        return len(self.encode(text)) + 2

    def ids_from_bpe(self, bpe_ids: list[int]) -> list[int]:
        """``[start, bpe..., end]`` truncated to ``token_length`` (unpadded)."""
        return [self.sot_id] + list(bpe_ids[: self.token_length - 2]) + [self.eot_id]

    def pad(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad already truncated ids to ``token_length``; returns ``(input_ids, attention_mask)``."""
        input_ids = torch.full((self.token_length,), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros(self.token_length, dtype=torch.long)
        input_ids[: len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[: len(ids)] = 1
        return input_ids, attention_mask

    def __call__(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids LongTensor[L], attention_mask LongTensor[L])`` with L = token_length."""
        return self.pad(self.ids_from_bpe(self.encode(text)))
