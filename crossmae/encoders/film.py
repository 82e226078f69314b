"""FiLM conditioning in the ``γ·LN(x + f(x)) + β`` form, and the pooling of its attributes.

Two parts for encoders conditioned on static attributes (e.g. catchment descriptors):

* `FiLMProjection`: one ``act(Linear(a -> 2c))`` (Tanh by default) turning a per-sample
  attribute vector into a scale ``γ`` and a shift ``β``; `PostNormBlock` applies them after
  each of its norms (``x = γ·LN(x + f(x)) + β``). This sits beside `FiLM` (the
  ``x·(1 + scale) + shift`` form applied after each pre-norm block of `TransformerEncoder`).
* `visible_patch_mean`: the attribute vector itself, the mean over the sample's visible
  patches of each patch's mean over its real sites, without loops over samples.

Legend: ``b`` batch, ``s`` sites, ``g`` sites per patch (``group_size``), ``P`` patches
(``ceil(s / g)``, site ``i`` in patch ``i // g``), ``a`` attributes, ``c`` width.
Mask polarity: ``site_padding_mask`` True = padding site; ``patch_visible_mask`` True =
the patch is visible (the encoder sees at least one of its tokens).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .._checks import check_float_tensor, check_int, check_tensor

__all__ = ["FiLMProjection", "visible_patch_mean"]


class FiLMProjection(nn.Module):
    """Scale and shift for FiLM from a conditioning vector: ``γ, β = act(proj(cond))``.

    ``proj`` is ``Linear(cond_dim -> 2·dim)``; the first ``dim`` outputs are ``γ``, the last
    ``dim`` are ``β``. With the default Tanh both lie in ``(-1, 1)`` (the downstream water
    model's ``Tanh(Linear(11 -> 2d))``). Default PyTorch initialisation (not the identity:
    ``γ·LN(x) + β`` with ``γ = β = 0`` would erase the tokens).

    Args:
        cond_dim: conditioning width ``a``.
        dim: modulated width ``c``.
        act_layer: activation constructor (called with no arguments), e.g. ``nn.Tanh``
            (default) or ``nn.Identity``.

    Parameters: ``proj.weight [2c, a]``, ``proj.bias [2c]``.
    """

    def __init__(
        self, cond_dim: int, dim: int, *, act_layer: Callable[[], nn.Module] = nn.Tanh
    ) -> None:
        super().__init__()
        self.cond_dim = check_int("cond_dim", cond_dim, minimum=1)
        self.dim = check_int("dim", dim, minimum=1)
        self.proj = nn.Linear(cond_dim, 2 * dim)
        self.act = act_layer()

    def forward(self, cond: Tensor) -> tuple[Tensor, Tensor]:
        """Scale and shift for every sample.

        Args:
            cond: float ``[b, a]`` conditioning vectors (any float dtype: cast to the
                parameters' dtype, e.g. float32 attributes for a bf16 module).

        Returns:
            ``(gamma, beta)``, each ``[b, c]`` in the parameters' dtype (the autocast dtype
            under autocast).
        """
        c = check_float_tensor("cond", cond, ndim=2)
        if c.shape[-1] != self.cond_dim:
            raise ValueError(
                f"cond must have shape [b, {self.cond_dim}] (cond_dim={self.cond_dim}), "
                f"got {tuple(c.shape)}"
            )
        out = self.act(self.proj(c.to(self.proj.weight.dtype)))
        gamma, beta = out.chunk(2, dim=-1)
        return gamma, beta


def visible_patch_mean(
    attributes: Tensor,
    group_size: int,
    patch_visible_mask: Tensor,
    *,
    site_padding_mask: Optional[Tensor] = None,
) -> Tensor:
    """Per-sample attribute vector: mean over visible patches of each patch's site mean.

    Sites are grouped as `SeriesTokenizer` groups them (site ``i`` in patch ``i // g``, the
    last patch filled up with padding sites). Each patch's vector is the mean of the
    attributes of its **real** sites (padding and fill-up sites excluded); the sample's
    vector is the mean of those patch vectors over the patches that are visible and have at
    least one real site. A sample with no such patch gets 0. Values at padding sites (NaN
    included) never reach the result or its gradient. Vectorized: no loop over samples.

    To get ``patch_visible_mask`` from a time-major series split (token ``n = t·P + p``, a
    static token possibly appended at ``n = T·P``)::

        patch_visible = split.visible_mask[:, : T * P].view(b, T, P).any(dim=1)

    Args:
        attributes: float ``[b, s, a]`` raw static attributes per site.
        group_size: sites per patch ``g`` (``>= 1``).
        patch_visible_mask: bool ``[b, P]`` with ``P = ceil(s / g)``, **True = visible**.
        site_padding_mask: optional bool ``[b, s]`` or ``[s]``, **True = padding site**.

    Returns:
        Float ``[b, a]`` in ``attributes``' dtype (reduced in at least float32).

    Raises:
        TypeError: non-float ``attributes``, non-bool masks, non-int ``group_size``.
        ValueError: shapes that do not match.
    """
    x = check_float_tensor("attributes", attributes, ndim=3)
    g = check_int("group_size", group_size, minimum=1)
    b, s, _ = x.shape
    p = math.ceil(s / g)
    vis = check_tensor("patch_visible_mask", patch_visible_mask)
    if vis.dtype != torch.bool:
        raise TypeError(
            f"patch_visible_mask must have dtype torch.bool (True = visible), got {vis.dtype}"
        )
    if tuple(vis.shape) != (b, p):
        raise ValueError(
            f"patch_visible_mask must have shape [b, P] = {(b, p)} (s={s} sites in patches of "
            f"group_size={g}), got {tuple(vis.shape)}"
        )
    real = torch.ones(b, s, dtype=torch.bool, device=x.device)
    if site_padding_mask is not None:
        spm = check_tensor("site_padding_mask", site_padding_mask)
        if spm.dtype != torch.bool:
            raise TypeError(
                f"site_padding_mask must have dtype torch.bool (True = padding), got {spm.dtype}"
            )
        if tuple(spm.shape) not in ((b, s), (s,)):
            raise ValueError(
                f"site_padding_mask must have shape [b, s] = {(b, s)} or [s] = {(s,)}, "
                f"got {tuple(spm.shape)}"
            )
        real = real & ~spm
    dt = torch.promote_types(x.dtype, torch.float32)
    fill = p * g - s
    vals = torch.where(real[..., None], x.to(dt), 0)  # NaN at padding sites never multiplies
    vals = F.pad(vals, (0, 0, 0, fill))
    real_p = F.pad(real, (0, fill), value=False)
    site_sum = rearrange(vals, "b (p g) a -> b p g a", g=g).sum(dim=2)  # [b, P, a]
    site_cnt = rearrange(real_p, "b (p g) -> b p g", g=g).sum(dim=2)  # [b, P]
    patch_mean = site_sum / site_cnt.clamp(min=1)[..., None].to(dt)
    use = vis & (site_cnt > 0)  # [b, P]
    total = torch.where(use[..., None], patch_mean, 0).sum(dim=1)  # [b, a]
    n_use = use.sum(dim=1, keepdim=True).clamp(min=1).to(dt)
    return (total / n_use).to(x.dtype)
