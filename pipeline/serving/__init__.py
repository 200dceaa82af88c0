"""Serving: the Triton package's generation code, the serving environment, the server launcher, `kiln serve`."""
