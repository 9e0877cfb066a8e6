"""Evaluation: retrieval, zero-shot classification, embedding geometry."""
