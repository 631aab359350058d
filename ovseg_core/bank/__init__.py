"""CorrCLIPv2 memory banks (VISR + DMCE), pure part: pooling, index, search, fusion, file formats.

Modules: ``config`` (frozen configs), ``pooling`` (values, keys, queries per region), ``index``
(build, train, extend, serialise the FAISS index), ``search`` (nearest bank regions, the fast
exact path for the authors' index, re-ranking), ``rows`` (row readers over stores kept on disk),
``retrieval`` (support logits, DMCE, fusion), ``authors_format`` (the authors' ``.pt`` stores and
``.faiss`` index). Reference and measured costs: ``docs/banks.md``.
"""

from ovseg_core.bank.config import FusionConfig, IndexConfig, PoolingConfig, SearchConfig
from ovseg_core.bank.index import BankIndex, build_index, index_from_bytes, index_to_bytes
from ovseg_core.bank.pooling import pool_keys, pool_values, region_queries
from ovseg_core.bank.retrieval import ValueStore, retrieve_and_fuse
from ovseg_core.bank.rows import ArrayRows, NpyRows, PreadRows, RowReader
from ovseg_core.bank.search import search_index

__all__ = [
    "ArrayRows",
    "BankIndex",
    "FusionConfig",
    "IndexConfig",
    "NpyRows",
    "PoolingConfig",
    "PreadRows",
    "RowReader",
    "SearchConfig",
    "ValueStore",
    "build_index",
    "index_from_bytes",
    "index_to_bytes",
    "pool_keys",
    "pool_values",
    "region_queries",
    "retrieve_and_fuse",
    "search_index",
]
