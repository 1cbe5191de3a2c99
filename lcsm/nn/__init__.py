"""The model layer: stages (x -> canonical tensors), oscillations, token mixers, routing, channel
mixers, the decoding cache and the language model."""
