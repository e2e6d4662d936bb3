"""What a guest *is*: volatility3 over sva backends, and the facts built from it."""
