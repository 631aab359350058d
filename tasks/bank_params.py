"""Typed parameters of the memory-bank stages and of a method's use of a bank (torch-free).

A bank (``banks:`` in the experiment file, ``flows.bank_graph``) is a dataset of unlabeled
images whose per-image stages are ``bank_values`` (one node per CLIP) and ``bank_keys``, and
whose whole-bank stage ``bank_index`` builds the FAISS index over every region key. A method
with ``params.bank`` reads the index through its ``reconstruction`` node (``BankUse``).
Facts: ``docs/banks.md``; configs: ``ovseg_core.bank.config`` (imported by the graph only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the stage table imports this module without torch or faiss
    from ovseg_core.bank.config import FusionConfig, IndexConfig, SearchConfig

    from tasks.params import WindowParams

BANK_ITEM = "bank"  # the one item of a whole-bank stage (bank_index)
EMPTY_REGION = ("nan", "zero")


@dataclass(frozen=True)
class BankValuesParams:
    """``bank_values``: each region's CorrCLIP feature of one CLIP (the authors' bank settings)."""

    method: str  # "corrclip": the DINO q+k correlation of the authors' builder (not the VFM)
    config: Any  # CorrCLIPConfig with the fields the window features read (``Method.reconstruction_config``)
    backbone: str  # the CLIP
    window: "WindowParams"  # short side 448, crop 336, stride 112, padded to 56 (the authors' builder)
    dtype: str  # compute dtype
    empty_region: str  # PoolingConfig.empty_region: "nan" (reference) or "zero"


@dataclass(frozen=True)
class ImportedValuesParams:
    """``bank_values`` of an imported bank: rows of the authors' ``{bank}_{encoder}.pt`` store (``ovseg bank import``).

    One row file (``storage.row_files``: the store's rows, read by positioned reads) and its item ``rows`` (the
    rows' CRC-32), not images: the registry holds one entry, region id = row.
    """

    source: str  # "authors_pt"
    file: str  # the store file's name
    digest: str  # sha256 of (name, size, mtime): what the experiment can compute without reading the file
    backbone: str  # the CLIP whose values these are (the using method's, or DMCE's auxiliary CLIP)
    layout: str  # "row_file": how the rows are stored (``storage.row_files``; 1,024-row items before)


@dataclass(frozen=True)
class BankKeysParams:
    """``bank_keys``: each region's mean of the per-pixel unit VFM vectors (not re-normalised)."""

    empty_region: str  # PoolingConfig.empty_region


@dataclass(frozen=True)
class BankIndexParams:
    """``bank_index``: the FAISS index over every key of the bank's images, and the region registry."""

    bank: str  # the bank's name (registry location, ``ovseg bank ls``)
    index: "IndexConfig"  # structure, training, growth (the authors': IVF-PQ, nlist 8 sqrt N, m 32, 8 bits)
    images: str  # digest of the bank's image set (relative path, size, mtime): a grown bank is a new index

    def array_names(self) -> tuple[str, ...]:
        """The index item's arrays; with ``IndexConfig.refine_m`` also the in-RAM re-ranking codes (``ovseg_core.bank.refine``)."""
        refine = ("refine_codebook", "refine_codes", "refine_lists") if self.index.refine_m else ()
        return ("index", "region_ids", "registry", "images", *refine)


@dataclass(frozen=True)
class BankUse:
    """How a method's ``reconstruction`` retrieves from a bank and fuses (``ReconstructionParams.bank``)."""

    bank: str  # the bank's name
    search: "SearchConfig"  # k (20), nprobe, re-ranking; the search path is not part of the key
    fusion: "FusionConfig"  # alpha (0.5), DMCE weight (0.5)
