"""Chaos: fault scenarios, injectors, the invariant checker and the deterministic simulation."""
