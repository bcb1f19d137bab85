"""Ray drivers around the Ray-free stages in `maskdistill` (one module per stage)."""
