"""Configuration: YAML loading with file:line errors, the model spec, training recipes, ablation grids
and the paths of the shipped files. Validation and naming only; no tensors are made here."""
