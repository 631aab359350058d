"""What a stage key reads, for display (``ovseg cache ls``): the parameters, without the fields the stage never reads.

A stage key hashes its typed parameters. For ``mask_clustering`` (``tasks.params.ClusteringParams``) and
``reconstruction`` the method config is a whole ``CorrCLIPConfig`` whose fields the stage does not read
are reset to their defaults (``ovseg_core.methods.clustering_config`` / ``reconstruction_config``), so
that methods differing only there share the output. Shown as stored, a clustering output shared by
``tau: 3`` and ``tau: 2.5`` methods would read ``"tau": 4.0``. :func:`shown_params` drops those
fields; the stored key payload (``stage.json``) is unchanged.

The field lists are ``ovseg_core.config_fields`` (torch-free, so this module stays light for read-only commands).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ovseg_core.config_fields import CLUSTERING_FIELDS, unread_by_reconstruction


def _corrclip(config: Any) -> Mapping[str, Any] | None:
    """The CorrCLIP part of a stored method config (a mapping, or the first of a list for corrclip+scclip)."""
    if isinstance(config, list) and config and isinstance(config[0], Mapping):
        config = config[0]
    return config if isinstance(config, Mapping) and "tau" in config and "dbscan_eps" in config else None


def shown_params(stage: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` of a stage key without the method-config fields the stage does not read.

    Args:
        stage: stage name.
        params: the key's ``params`` as stored (JSON types).
    Returns:
        a new mapping; unchanged for stages whose parameters are all read.
    """
    out = dict(params)
    config = out.get("config")
    cc = _corrclip(config)
    if cc is None or stage not in ("mask_clustering", "reconstruction"):
        return out
    if stage == "mask_clustering":
        kept = {k: v for k, v in cc.items() if k in CLUSTERING_FIELDS}
    else:
        unread = unread_by_reconstruction("vfm" if cc.get("similarity") == "vfm" else "dino_qk")
        kept = {k: v for k, v in cc.items() if k not in unread}
    out["config"] = [kept, *config[1:]] if isinstance(config, list) else kept
    return out
