"""Where the forward passes run: an executor maps calls over model workers, here or on Ray actors, in order."""
