"""Bias and fairness evaluation (tuneforge eval --fairness): slices, counterfactual swaps, probe sets."""
