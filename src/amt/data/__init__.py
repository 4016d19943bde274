"""Data layer: image datasets of one domain, episodes, the embedded glyph benchmark."""
