"""Ablations of Sketch&Walk's components and baselines at matched density, plus tensor-level
validation (recorded Q/K/V replayed against dense and the oracle). Builds on `sketchwalk`,
`search` (the sweep machinery runs every variant) and `tracking` (MLflow)."""
