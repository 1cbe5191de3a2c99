"""Input, expand and shrink stages and what they share (feature maps, projections, short convolutions)."""
