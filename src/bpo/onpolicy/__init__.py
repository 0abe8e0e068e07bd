"""On-policy, best-of-N and reward-weighted losses, and the didactic bandit (arXiv 2404.14367)."""
