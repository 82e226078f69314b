"""What the raster and series tokenizers share: a linear projection plus learned vectors."""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

__all__: list[str] = []


class _ProjectedTokenizer(nn.Module):
    """Base of the tokenizers: ``proj`` (Linear), optional ``spatial_pos_embed`` and
    ``modality_embed`` parameters, and their initialisation."""

    proj: nn.Linear
    spatial_pos_embed: Optional[nn.Parameter]
    modality_embed: Optional[nn.Parameter]

    def reset_parameters(self) -> None:
        """Xavier-uniform ``proj`` (zero bias); truncated normal (std 0.02) learned vectors."""
        nn.init.xavier_uniform_(self.proj.weight)
        if self.proj.bias is not None:
            nn.init.zeros_(self.proj.bias)
        if self.spatial_pos_embed is not None:
            nn.init.trunc_normal_(self.spatial_pos_embed, std=0.02)
        if self.modality_embed is not None:
            nn.init.trunc_normal_(self.modality_embed, std=0.02)
