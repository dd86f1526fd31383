"""hfgen: recipe-driven training of generative models on the Hugging Face stack."""

__version__ = "0.1.0"
