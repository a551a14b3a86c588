"""Bayesian optimisation over a discrete candidate pool: surrogate, acquisition, proposal (:mod:`.optimize`)."""
