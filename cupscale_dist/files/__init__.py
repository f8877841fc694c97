"""Files in and out: images with their metadata, streamed writers, atomic writes and folder locks."""
