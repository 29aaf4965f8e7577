"""The evaluation harness: loading models (`models`), the method registry (`methods`), compressed
generation (`generation`), the essay haystack (`haystack`), K/V capture (`capture`) and the
per-layer attention diagnostics (`diagnostics`). Imports only analysis.api (and faedkv)."""
