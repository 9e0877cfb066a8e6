"""Frozen work: locked towers (towers), the frozen teacher (teacher), per-item rows computed once
(rows), and their preparation in one order for the training loop (prepare)."""
