"""Feature extraction: CLIP block outputs, DINO q+k features, region maps, text embeddings.

Import from the submodules (``ovseg_core.features.clip``, ``.dino``, ``.regions`` (SAM v1,
superpixels, the dispatch), ``.sam2_regions``, ``.region_files``, ``.text``); this package module
re-exports nothing so that importing one does not load the others' libraries.
"""
