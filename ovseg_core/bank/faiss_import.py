"""FAISS, or a stand-in that says what is missing when a bank function first uses it.

The pipeline imports the bank modules (the reconstruction's memory-bank hook) also where no bank is
used and FAISS is not installed (the GPU benchmark's machine has only PyTorch, timm, numpy, pyarrow
and scikit-learn); only building, reading or searching an index needs FAISS.
"""

from __future__ import annotations

from typing import Any

try:
    import faiss
except ImportError as e:  # noqa: F841 - kept in the message
    _ERROR = f"{type(e).__name__}: {e}"

    class _Missing:
        def __getattr__(self, name: str) -> Any:
            raise ImportError(f"memory banks need FAISS, which is not installed here ({_ERROR}): "
                              "pip install faiss-cpu (the project's dependency; `make install` has it)")

    faiss = _Missing()  # type: ignore[assignment]

__all__ = ["faiss"]
