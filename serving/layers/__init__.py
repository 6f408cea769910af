"""Building blocks shared by the serving models: paged attention, rotary embedding, norms, activations."""
