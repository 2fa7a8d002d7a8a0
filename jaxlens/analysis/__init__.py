"""Analysis tools on a frozen model and its lens: interventions, ablations, causal bases, layer
surgery, generation from a lens and inversion of the unembedding (tuned-lens's `causal` package,
`model_surgery` and `Unembed.invert`, as pure JAX functions)."""
