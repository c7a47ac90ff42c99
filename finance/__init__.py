"""Finance: the price catalog, GPU cost allocation, roll-ups and margin reports."""
