"""fastgen: a research framework for LLM serving schedulers on one ragged forward pass."""
