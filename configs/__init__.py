"""Bundled presets (YAML), shipped as package data so `--config NAME` works from any install."""
