"""CLIP BPE tokenisation with the padding VPD's text encoder expects.

Uses open_clip's ``SimpleTokenizer`` because it ships its BPE vocabulary (works offline) and
produces the same ids as OpenAI's / Hugging Face's CLIP tokenizer. Sequences are padded with the
end-of-text id, as ``CLIPTokenizer`` of openai/clip-vit-large-patch14 does.
"""
from __future__ import annotations

import torch

__all__ = ["CLIPTokenizer", "SOT_ID", "EOT_ID"]

SOT_ID = 49406  # <|startoftext|>
EOT_ID = 49407  # <|endoftext|>, also the padding id


class CLIPTokenizer:
    """Text -> fixed-length ``(input_ids, attention_mask)`` for the CLIP text encoder.

    ``[SOT, bpe..., EOT]``, truncated to ``token_length`` with EOT kept as the last token, then
    padded with ``pad_id`` (the model config's ``pad_token_id``; ``EOT_ID`` for CLIP ViT-L/14).
    The attention mask is 1 over SOT..EOT and 0 over padding.
    """

    SOT_ID = SOT_ID
    EOT_ID = EOT_ID

    def __init__(self, token_length: int = 77, pad_id: int = EOT_ID):
        if token_length < 2:
            raise ValueError(f"token_length={token_length} is too short; expected >= 2 "
                             "(room for the start and end tokens)")
        self.token_length = token_length
        self.PAD_ID = pad_id
        # Imported here: open_clip pulls in its whole model zoo (seconds), only tokenising needs it.
        from open_clip.tokenizer import SimpleTokenizer
        self._bpe = SimpleTokenizer()
        # Guard against a vocabulary that disagrees with the ids the CLIP weights were trained on.
        if (self._bpe.encoder.get("<start_of_text>"), self._bpe.encoder.get("<end_of_text>")) != (
                SOT_ID, EOT_ID):
            raise RuntimeError("open_clip's BPE vocabulary has unexpected start/end token ids")

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` without SOT/EOT; ValueError when nothing is left to encode."""
        if not isinstance(text, str):
            raise ValueError(f"expected text as str, got {type(text).__name__}")
        ids = self._bpe.encode(text) if text.strip() else []
        if not ids:
            raise ValueError(f"cannot tokenise empty or whitespace-only text {text!r}")
        return ids

    def num_tokens(self, text: str) -> int:
        """Untruncated length of ``text`` including SOT and EOT."""
        return len(self.encode(text)) + 2

    def ids_from_bpe(self, bpe_ids: list[int]) -> list[int]:
        """``[SOT, bpe..., EOT]`` truncated to ``token_length`` (unpadded)."""
        return [SOT_ID] + list(bpe_ids[: self.token_length - 2]) + [EOT_ID]

    def pad(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad already truncated ids to ``token_length``; returns ``(input_ids, attention_mask)``."""
        input_ids = torch.full((self.token_length,), self.PAD_ID, dtype=torch.long)
        attention_mask = torch.zeros(self.token_length, dtype=torch.long)
        input_ids[: len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[: len(ids)] = 1
        return input_ids, attention_mask

    def __call__(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids LongTensor[L], attention_mask LongTensor[L])`` with L = token_length."""
        return self.pad(self.ids_from_bpe(self.encode(text)))
