"""Model initialisation: resolve a model spec, load tokenizer and weights."""
