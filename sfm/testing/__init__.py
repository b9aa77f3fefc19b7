"""Helpers shared by the tests and the benchmarks: the PyTorch reference models built from
sfm configs (`moshi_reference`, needs the `interop` extra) and small synthetic token records
(`records`). Not used by the library itself."""
