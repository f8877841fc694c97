"""Tiny, seeded models built from configs for tests and benches (no weights are ever downloaded)."""
