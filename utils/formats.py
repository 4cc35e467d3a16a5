"""Facts about the Quick, Draw! files that several modules check against (no torch: the service's
workers import this)."""

SIDE = 28  # the numpy bitmaps are SIDE x SIDE uint8 drawings
KINDS = ("simplified", "raw")  # the stroke (ndjson) formats
