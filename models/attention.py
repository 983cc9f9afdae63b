"""Cross-attention map collection for the diffusion UNet.

VPD concatenates the text-to-image cross-attention maps of the UNet to its multi-scale features.
We obtain them with a diffusers attention processor installed through `unet.set_attn_processor`
(never by patching `Attention.forward`):

* every attention layer computes attention with `F.scaled_dot_product_attention`, so the 64x64
  self-attention of SD never materialises its 4096x4096 matrix;
* the cross-attention layers of the down and up blocks that run at a recorded stride (latent/2 and
  latent/4 in VPD; the mid block is never recorded) compute softmax(QK^T * scale) explicitly, use
  it, and hand the head-averaged map to an `AttentionMapStore`.

Which layers take the explicit path is fixed when the processors are installed, not decided at
run time: gradient checkpointing recomputes a layer during backward and needs the recomputation to
save exactly the same tensors as the original forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

__all__ = [
    "AttentionMapStore",
    "MapRecordingAttnProcessor",
    "install_attention_map_processors",
    "attention_layer_strides",
]


def _downsampled_size(size: int, stride: int) -> int:
    """Spatial size after log2(stride) UNet downsamplers (3x3 conv, stride 2, padding 1 = ceil(size / 2))."""
    while stride > 1:
        size = (size + 1) // 2
        stride //= 2
    return size


class AttentionMapStore:
    """Accumulates head-averaged cross-attention maps of one UNet call, grouped by stride.

    Usage (one UNet call)::

        with store.recording(latents.shape[-2:]):
            unet(...)
            maps = store.collect()  # {stride: (B, L_tokens, h, w)}, every recorded layer averaged

    Outside `recording` nothing is kept, so a backward-pass recomputation (gradient checkpointing)
    or a direct call of the UNet leaves no state behind.

    Args:
        strides: strides relative to the latent at which maps are recorded (VPD: 2 and 4).
        keep_grad: let the maps carry gradient. VPD's maps carried none (they were produced inside
            LDM's no-grad checkpoint), so the default detaches them.
    """

    def __init__(self, strides: Sequence[int], keep_grad: bool = False):
        if not strides or any(s < 1 or s & (s - 1) for s in strides):
            raise ValueError(f"strides must be powers of two >= 1, got {tuple(strides)}")
        self.strides = tuple(sorted(set(int(s) for s in strides)))
        self.keep_grad = keep_grad
        self._sizes: dict[int, tuple[int, int]] | None = None
        self._sums: dict[int, torch.Tensor] = {}
        self._counts: dict[int, int] = {}

    @property
    def is_recording(self) -> bool:
        return self._sizes is not None

    @contextlib.contextmanager
    def recording(self, latent_size: Sequence[int]) -> Iterator[AttentionMapStore]:
        """Record the maps of the UNet call(s) made inside the block; cleared on exit."""
        if self.is_recording:
            raise RuntimeError("AttentionMapStore is already recording (nested UNet calls are not supported)")
        height, width = (int(s) for s in latent_size)
        self._sizes = {s: (_downsampled_size(height, s), _downsampled_size(width, s)) for s in self.strides}
        try:
            yield self
        finally:
            self._sizes = None
            self._sums.clear()
            self._counts.clear()

    def size_at(self, stride: int) -> tuple[int, int]:
        """(h, w) of the maps at `stride` for the latent being recorded."""
        if self._sizes is None:
            raise RuntimeError("size_at() is only defined while recording")
        return self._sizes[stride]

    def add(self, stride: int, probs: torch.Tensor) -> None:
        """Add one layer's attention probabilities (B, heads, h*w, L) recorded at `stride`."""
        if self._sizes is None:
            return
        if not self.keep_grad:
            probs = probs.detach()
        layer_map = probs.mean(dim=1)  # average over heads -> (B, h*w, L)
        if stride in self._sums:
            self._sums[stride] = self._sums[stride] + layer_map
            self._counts[stride] += 1
        else:
            self._sums[stride] = layer_map
            self._counts[stride] = 1

    def collect(self) -> dict[int, torch.Tensor]:
        """Maps recorded so far, averaged over layers: {stride: (B, L_tokens, h, w)}."""
        if self._sizes is None:
            raise RuntimeError("collect() must be called inside `recording()`")
        missing = [s for s in self.strides if s not in self._sums]
        if missing:
            raise RuntimeError(
                f"no cross-attention map was recorded at stride(s) {missing}; "
                "were the processors installed with install_attention_map_processors()?"
            )
        maps = {}
        for stride in self.strides:
            mean = self._sums[stride] / self._counts[stride]  # (B, h*w, L)
            h, w = self._sizes[stride]
            maps[stride] = mean.transpose(1, 2).reshape(mean.shape[0], mean.shape[2], h, w)
        return maps


class MapRecordingAttnProcessor:
    """Drop-in replacement for diffusers' `AttnProcessor2_0` that can record attention maps.

    Args:
        store: where recorded maps go.
        record_stride: None for a plain layer (scaled_dot_product_attention); otherwise the stride
            (relative to the latent) this cross-attention layer runs at: it then computes the
            attention probabilities explicitly and records them while the store is recording.
    """

    def __init__(self, store: AttentionMapStore, record_stride: int | None = None):
        if record_stride is not None and record_stride not in store.strides:
            raise ValueError(f"record_stride {record_stride} is not one of the store's strides {store.strides}")
        self.store = store
        self.record_stride = record_stride

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # 1. Input normalisation and layout, as diffusers' default processor does.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channels, height * width).transpose(1, 2)
        batch_size = hidden_states.shape[0]
        if attention_mask is not None:
            key_length = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape[1]
            attention_mask = attn.prepare_attention_mask(attention_mask, key_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            context = hidden_states  # self-attention
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)
        else:
            context = encoder_hidden_states

        # 2. Projections to (B, heads, tokens, head_dim).
        query = attn.to_q(hidden_states)
        key = attn.to_k(context)
        value = attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # 3. Attention: explicit probabilities only where a map is wanted.
        if self.record_stride is None:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=attn.scale)
        else:
            out = self._attend_and_record(query, key, value, attention_mask, attn.scale)

        # 4. Output projection, residual and rescaling, as diffusers' default processor does.
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch_size, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _attend_and_record(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scale: float,
    ) -> torch.Tensor:
        # Scores and softmax in float32 even under autocast: the maps are features too. Cheap, as
        # only cross-attention (L text tokens) at 1/2 and 1/4 of the latent takes this path.
        device_type = query.device.type
        # The meta device, used to count FLOPs without weights, has no autocast to switch off. (A
        # string test, not torch.amp.is_autocast_available: torch.compile cannot trace that call
        # and would split the UNet's graph at every cross-attention layer.)
        no_autocast = (contextlib.nullcontext() if device_type == "meta"
                       else torch.autocast(device_type=device_type, enabled=False))
        with no_autocast:
            scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
            if attention_mask is not None:
                if attention_mask.dtype == torch.bool:
                    scores = scores.masked_fill(~attention_mask, float("-inf"))
                else:
                    scores = scores + attention_mask.float()
            probs = scores.softmax(dim=-1)  # (B, heads, h*w, L)
        if self.store.is_recording:
            h, w = self.store.size_at(self.record_stride)
            if probs.shape[2] != h * w:
                raise RuntimeError(
                    f"cross-attention at stride {self.record_stride} has {probs.shape[2]} queries, "
                    f"expected {h}x{w} for the recorded latent size"
                )
            self.store.add(self.record_stride, probs)
        return torch.matmul(probs.to(value.dtype), value)


def attention_layer_strides(unet: UNet2DConditionModel) -> dict[str, int]:
    """Stride (relative to the latent) at which each down/up-block attention layer runs.

    Keys are attention module names, e.g. 'up_blocks.1.attentions.0.transformer_blocks.0.attn2'.
    Derived by walking the blocks and their down/upsamplers, so any UNet2DConditionModel layout works.
    """
    strides: dict[str, int] = {}
    stride = 1
    for index, block in enumerate(unet.down_blocks):
        for name, module in block.named_modules():
            if isinstance(module, Attention):
                strides[f"down_blocks.{index}.{name}"] = stride
        if getattr(block, "downsamplers", None) is not None:
            stride *= 2
    for index, block in enumerate(unet.up_blocks):
        for name, module in block.named_modules():
            if isinstance(module, Attention):
                strides[f"up_blocks.{index}.{name}"] = stride
        if getattr(block, "upsamplers", None) is not None:
            stride //= 2
    return strides


def install_attention_map_processors(unet: UNet2DConditionModel, store: AttentionMapStore) -> list[str]:
    """Install our processor on every attention layer of `unet`; returns the recording layers' names.

    A layer records when it is a cross-attention layer of a down or up block (never the mid block)
    running at one of `store.strides`.
    """
    layer_strides = attention_layer_strides(unet)
    plain = MapRecordingAttnProcessor(store)
    recorders = {s: MapRecordingAttnProcessor(store, record_stride=s) for s in store.strides}
    processors, recording = {}, []
    for processor_name in unet.attn_processors:
        layer_name = processor_name.removesuffix(".processor")
        layer = unet.get_submodule(layer_name)
        stride = layer_strides.get(layer_name)
        if layer.is_cross_attention and stride in recorders:
            processors[processor_name] = recorders[stride]
            recording.append(layer_name)
        else:
            processors[processor_name] = plain
    unet.set_attn_processor(processors)
    found = {layer_strides[name] for name in recording}
    if found != set(store.strides):
        raise ValueError(
            f"the UNet has cross-attention in its down/up blocks at strides {sorted(found)}, "
            f"but maps were requested at strides {list(store.strides)}"
        )
    return recording
