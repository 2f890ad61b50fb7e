"""Built-in reward scripts (loaded by flowrl.rewards; each registers its factories by name)."""
