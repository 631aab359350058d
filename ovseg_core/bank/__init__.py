"""CorrCLIPv2 memory banks (VISR + DMCE), pure part: pooling, index, search, fusion, file formats.

Modules: ``config`` (frozen configs), ``pooling`` (values, keys, queries per region), ``index``
(build, train, extend, serialise the FAISS index), ``search`` (nearest bank regions, the fast
exact path for the authors' index, re-ranking), ``rows`` (row readers over stores kept on disk),
``retrieval`` (support logits, DMCE, fusion), ``authors_format`` (the authors' ``.pt`` stores and
``.faiss`` index). Reference and measured costs: ``docs/banks.md``.

Names are resolved on first use (PEP 562), so ``ovseg_core.bank.config`` imports without FAISS: the
experiment-file checks and the GPU benchmark read the configs on machines that lack it.
"""

import importlib
from typing import Any

_MODULE_OF = {
    "FusionConfig": "config", "IndexConfig": "config", "PoolingConfig": "config", "SearchConfig": "config",
    "BankIndex": "index", "build_index": "index", "index_from_bytes": "index", "index_to_bytes": "index",
    "pool_keys": "pooling", "pool_values": "pooling", "region_queries": "pooling",
    "ValueStore": "retrieval", "retrieve_and_fuse": "retrieval",
    "ArrayRows": "rows", "NpyRows": "rows", "PreadRows": "rows", "RowReader": "rows",
    "search_index": "search",
}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'ovseg_core.bank' has no attribute {name!r}")
    return getattr(importlib.import_module(f"ovseg_core.bank.{_MODULE_OF[name]}"), name)
