"""Support for the tests and benchmarks: a local HTTP mirror of the data (mirror), a started service
(launch) and the strokes-vs-bitmaps agreement check against it (agreement)."""
