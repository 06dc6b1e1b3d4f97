"""Evaluation: GLUE metrics of fine-tuned runs and WikiText-2 perplexity of language models."""
