"""What users run: one upscale written to a file, a dataset (Ray Data), a Ray Job, the HTTP service."""
