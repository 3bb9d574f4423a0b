"""Clean-up of predicted binary masks: removal of small connected components."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# scipy.ndimage.generate_binary_structure(3, rank) connects voxels sharing a face (rank 1),
# also an edge (rank 2) or also a corner (rank 3).
_RANK = {6: 1, 18: 2, 26: 3}


def remove_small_components(
    mask: np.ndarray, min_voxels: int = 12**3, connectivity: int = 26
) -> np.ndarray:
    """Drop connected components with fewer than ``min_voxels`` voxels.

    The official OSS-Net release drops clusters smaller than 12^3 voxels from the
    prediction before meshing it (labelled with ``scipy.ndimage.label``'s default
    structure, i.e. 6-connectivity; pass ``connectivity=6`` to reproduce that exactly).

    Args:
        mask: mask ``(X, Y, Z)``, bool or numbers (nonzero counts as inside).
        min_voxels: smallest component size kept, in voxels; a component of exactly
            this size is kept.
        connectivity: 6 (face), 18 (face or edge) or 26 (face, edge or corner neighbours).

    Returns:
        New bool array ``(X, Y, Z)``: ``mask`` without its small components.

    Raises:
        ValueError: ``mask`` is not 3D or ``connectivity`` is not 6, 18 or 26.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f"mask must be 3D (X, Y, Z), got shape {mask.shape}")
    if connectivity not in _RANK:
        raise ValueError(f"connectivity must be 6, 18 or 26, got {connectivity}")
    structure = ndimage.generate_binary_structure(3, _RANK[connectivity])
    labels, count = ndimage.label(mask, structure=structure)
    if count == 0:
        return mask.copy()
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[labels]
