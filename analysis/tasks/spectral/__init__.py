"""The spectral analyses' computations (torch at import, so they sit outside the torch-free kind
declarations beside this package): per-layer K/V spectra (`spectra`), the band ablation and plan
comparison (`ablation`), token-contribution profiles (`contrib`)."""
