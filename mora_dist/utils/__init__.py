"""Small helpers with no dependency on the rest of mora_dist (any layer may use them)."""
