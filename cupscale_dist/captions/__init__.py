"""The regional semantic prior (method.md step 6): one prompt per view, from a file or a vision-language model."""
