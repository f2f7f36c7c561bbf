"""Model editing baselines (MEMIT): facts written into the weights in closed form, no training."""
