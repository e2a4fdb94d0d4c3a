"""Tasks: next-item, CTR and full ranking, and their metrics."""
