"""Which fields of a CorrCLIP-family config each stage reads (torch-free: ``ovseg cache ls`` reads it).

A stage key hashes exactly what its stage reads (``tasks.params``): ``mask_clustering`` only the
clustering fields, ``reconstruction`` everything but the fields that act through its upstream
keys or in map correction. ``ovseg_core.methods`` builds the stage configs from these lists, and
``flows.key_view`` hides the other fields when it shows a key.
"""

from __future__ import annotations

__all__ = ["CLUSTERING_FIELDS", "NOT_READ_BY_RECONSTRUCTION", "unread_by_reconstruction"]

# CorrCLIP fields read by mask clustering (``cluster_masks``); the mask_clustering stage key hashes only these.
CLUSTERING_FIELDS: tuple[str, ...] = ("mask_clustering", "dbscan_eps", "dbscan_min_samples", "m0_quirk", "padding")
# CorrCLIP fields the reconstruction stage does not read (they act through its upstream keys or
# in map correction); every other field enters the reconstruction key.
NOT_READ_BY_RECONSTRUCTION: tuple[str, ...] = ("mask_clustering", "dbscan_eps", "dbscan_min_samples", "m0_quirk",
                                               "map_correction")


def unread_by_reconstruction(correlation: str) -> tuple[str, ...]:
    """Config fields the reconstruction stage does not read for a correlation source.

    ``dino_qk`` (CorrCLIP v1): :data:`NOT_READ_BY_RECONSTRUCTION` (mask clustering is its own
    stage); ``vfm`` (CorrCLIPv2, no mask clustering stage): only ``map_correction``, since its
    reconstruction relabels the regions itself, reading the clustering fields and ``m0_quirk``.
    """
    return NOT_READ_BY_RECONSTRUCTION if correlation == "dino_qk" else ("map_correction",)
