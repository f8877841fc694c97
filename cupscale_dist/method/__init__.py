"""The method of C-Upscale (method.md), as small pure functions: arrays and knobs in, arrays out.

One module per step or concept: ``resize`` (1), ``vae`` (2, 10), ``wavelets`` and ``prior`` (3, 9c),
``schedulers`` (4), ``views`` (5), ``masks`` (7), ``attention`` (8), ``step`` (9a-9c). Nothing here loads a model,
starts an actor or touches a file.
"""
