"""Importers: other projects' checkpoints on disk -> model directories of this
project (`model.json` + components) that `load_model` loads like any other."""
