"""Offline long-context evaluation: tasks (RULER, passkey, NIAH grid, perplexity), a resumable SQLite results
store, a sweep runner and an HTML report. See docs/eval.md."""
