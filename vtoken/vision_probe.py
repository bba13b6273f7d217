"""Vision-side token importance: what the vision encoder's own attention says about each token.

VisionZip (Yang et al., 2024) and FasterVLM (Zhang et al., 2024) rank visual tokens by the attention
the vision encoder's [CLS] token pays to each patch, read at the layer whose features the VLM uses.
Towers without a [CLS] token (SigLIP, Qwen's ViT) get the mean attention each patch *receives* from
all patches instead. The session wraps the vision tower's attention function (through
``AttentionInterface``, scoped to the vision config) to read that one layer, then maps patch scores
to the language model's visual tokens the way the family's projector does (see
``FamilySpec.token_map``): dropping [CLS], LLaVA-NeXT's crop packing, Idefics3's pixel shuffle,
Qwen's 2x2 merge and Qwen2.5-VL's window order.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from vtoken.compat import vision_window_index
from vtoken.patch import attention_functions

if TYPE_CHECKING:
    from vtoken.session import Session


class VisionProbe:
    """Captures per-patch importance in one vision block and maps it to visual tokens."""

    def __init__(self, session: Session) -> None:
        self.session, self.model, self.spec = session, session.model, session.parts.spec
        tower = session.parts.vision_tower
        blocks = session.parts.vision_blocks
        self.block = self._block_index(len(blocks))
        self.module: nn.Module = getattr(blocks[self.block], self.spec.vision_attention)
        impl = self.model.config.vision_config._attn_implementation
        base, base_mask = attention_functions(self.module, impl)
        self.chunks: list[Tensor] = []

        def attention(module, query, key, value, attention_mask=None, **kwargs):
            if module is self.module:
                self.chunks.append(self._importance(query, key, attention_mask, kwargs["scaling"]))
            return base(module, query, key, value, attention_mask, **kwargs)

        session.patcher.use_attention(
            self.model, f"vtoken_vision_{id(session)}", attention, base_mask, sub_config="vision_config"
        )
        session.patcher.pre_hook(tower, self._on_encode)

    def _block_index(self, num_blocks: int) -> int:
        """The block whose output the VLM uses (LLaVA's ``vision_feature_layer``), else the last
        full-attention block (Qwen2.5-VL's windowed blocks see only their window)."""
        config = self.model.config
        layer = getattr(config, "vision_feature_layer", None)
        if layer is not None:
            index = max(layer) if isinstance(layer, (list, tuple)) else layer
            return index % (num_blocks + 1) - 1  # hidden_states[i] is block i-1's output
        full = getattr(config.vision_config, "fullatt_block_indexes", None)
        return max(full) if full else num_blocks - 1

    def _on_encode(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.chunks = []
        self.grid_thw = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)

    def _importance(self, query: Tensor, key: Tensor, mask: Tensor | None, scaling: float) -> Tensor:
        """``(B, n)`` importance of each key position in one attention call."""
        logits = torch.matmul(query, key.transpose(2, 3)).float() * scaling  # (B, H, n, n)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
        probs = logits.softmax(-1)
        if self.spec.vision_query == "cls":
            return probs[:, :, 0, :].mean(1)  # (B, n): [CLS] row, head mean
        return probs.mean(2).mean(1)  # (B, n): attention received, mean over queries and heads

    def token_scores(self, image_inputs: dict[str, Any]) -> Tensor:
        """Importance of every visual token of the last encoded batch, in the order the model
        scatters them into the prompt (row-major over the batch): ``(total_visual_tokens,)``."""
        if not self.chunks:
            raise RuntimeError("No vision attention was captured: the prompt had no image.")
        mapper = getattr(self, f"_map_{self.spec.token_map}")
        return mapper(self.chunks, image_inputs)

    # -- patch -> token maps, one per FamilySpec.token_map -------------------------------------
    def _drop_cls(self, scores: Tensor) -> Tensor:
        if self.spec.vision_query == "cls" and self._strategy() == "default":
            return scores[:, 1:]
        return scores

    def _strategy(self) -> str:
        return getattr(self.model.config, "vision_feature_select_strategy", "full")

    def _map_identity(self, chunks: list[Tensor], inputs: dict) -> Tensor:
        return self._drop_cls(torch.cat(chunks)).flatten()

    def _map_anyres(self, chunks: list[Tensor], inputs: dict) -> Tensor:
        crops = self._drop_cls(torch.cat(chunks))  # (n_crops_total, n)
        config, sizes = self.model.config, inputs["image_sizes"]
        crops_of = sys.modules[type(self.model).__module__].image_size_to_num_patches
        side = config.vision_config.image_size
        counts = [crops_of(size, config.image_grid_pinpoints, side) for size in sizes.tolist()]
        per_image = [c[..., None] for c in torch.split(crops, counts)]  # (crops, n, 1) each
        packed, _ = self.model.model.pack_image_features(
            per_image, sizes, self._strategy(), image_newline=crops.new_zeros(1)
        )
        return torch.cat(packed).flatten()

    def _map_pixel_shuffle(self, chunks: list[Tensor], inputs: dict) -> Tensor:
        tiles = torch.cat(chunks)[..., None]  # (n_tiles, n, 1)
        connector = self.session.parts.projector
        grouped = connector.pixel_shuffle(tiles, connector.scale_factor)  # (n_tiles, n/s^2, s^2)
        return grouped.mean(-1).flatten()

    def _map_merge(self, chunks: list[Tensor], inputs: dict) -> Tensor:
        unit = self.model.config.vision_config.spatial_merge_size**2
        return torch.cat([c.flatten() for c in chunks]).view(-1, unit).mean(-1)

    def _map_window_merge(self, chunks: list[Tensor], inputs: dict) -> Tensor:
        tokens = self._map_merge(chunks, inputs)  # in window order
        tower, vision = self.session.parts.vision_tower, self.model.config.vision_config
        window_index = vision_window_index(tower, vision, self.grid_thw)
        return tokens[torch.argsort(window_index)]
