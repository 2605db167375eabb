"""`tune sweep`: a matrix of studies from a spec, compared with the spec's last run (nightly regressions)."""
