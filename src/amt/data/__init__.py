"""Data layer: image datasets of one domain, episodes, the embedded glyph benchmark.

Modules: :mod:`~amt.data.base` (the dataset type and errors), :mod:`~amt.data.readers` (one reader per
on-disk format, class-split files), :mod:`~amt.data.transforms`, :mod:`~amt.data.domains` (open, validate
and check a configured domain), :mod:`~amt.data.metadataset` (Meta-Dataset TFRecords), :mod:`~amt.data.episodes`,
:mod:`~amt.data.glyphs` and :mod:`~amt.data.glyph_render` (the embedded benchmark).
"""
