"""The stages of `edgepack build`, one module each; `edgepack.pipeline` runs them in order."""
