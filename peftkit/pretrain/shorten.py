"""Drop positions from a padded batch (keeping order) and put them back later.

3ML runs its early layers on the unmasked tokens only. Rows lose different numbers of [MASK]s, so the
shortened rows are left-aligned and padded to the longest one; ``ShortBatch.mask`` marks the real slots.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ShortBatch:
    keep: "torch.Tensor"  # (B, n) bool: positions of the full sequence that stay
    index: "torch.Tensor"  # (B, K) original position of each slot of the short sequence (in order)
    mask: "torch.Tensor"  # (B, K) bool: real slot (True) or padding of the short sequence (False)

    def gather(self, x):
        """Pick the kept positions of a (B, n) or (B, n, d) tensor -> (B, K) / (B, K, d)."""
        import torch

        index = self.index if x.dim() == 2 else self.index.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        return torch.gather(x, 1, index)

    def scatter_into(self, short, full):
        """Put the real slots of ``short`` (B, K, d) back at their positions of ``full`` (B, n, d).

        Both sides are read in (row, position) order, so the i-th kept slot lands on the i-th kept position.
        """
        out = full.clone()
        out[self.keep] = short[self.mask]
        return out


def shorten(keep) -> ShortBatch:
    """Left-align the True positions of ``keep`` (B, n) in their original order; pad to the longest row."""
    import torch

    # a stable sort on "dropped?" moves kept positions to the front and keeps their order
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    length = max(int(keep.sum(dim=1).max()), 1)
    index = order[:, :length]
    return ShortBatch(keep=keep, index=index, mask=torch.gather(keep, 1, index))
