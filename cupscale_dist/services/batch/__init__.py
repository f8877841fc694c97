"""`cupscale batch`: a folder, a glob or a parquet of images through Ray Data, with a resumable manifest.

``inputs`` lists the inputs, ``naming`` gives each a safe output name, ``manifest`` keeps what is done durably,
``worker`` upscales one image (the Ray Data worker and the tile-parallel driver), ``run`` puts them together.
"""
