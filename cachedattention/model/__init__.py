"""Llama-family model code, weights loading and the embedded default model."""
