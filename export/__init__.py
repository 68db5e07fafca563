"""Export placeholder."""
