"""Plans: the catalog of plans and their limits (as code, in the config), and who is on which."""
