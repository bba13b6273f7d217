"""Evaluation harnesses: VQA accuracy, loyalty and cost of plugins on JSONL datasets."""
