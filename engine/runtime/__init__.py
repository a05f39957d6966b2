"""Tokenizer and chat template, sampling, generate loop, session."""
