"""ragsae: retrieval-augmented generation over sparse autoencoder codes of an LLM's activations."""

__version__ = "0.1.0"
