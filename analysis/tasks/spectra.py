"""The `spectra` job kind: per-layer K/V energy spectra of one text (computed by
`analysis.tasks.spectral.spectra.run_spectra`), and its command `python -m analysis spectra`."""
from __future__ import annotations

from analysis.api.params import SpectraParams
from analysis.tasks import JobKind


def _cli(args) -> int:
    import numpy as np

    from analysis import cli
    from analysis.tasks.spectral.spectra import run_spectra

    params = SpectraParams(num_tokens=args.num_tokens, text_seed=args.text_seed,
                           grid_points=args.grid_points, chunks=args.chunks)
    run, seconds = cli.run_job(args, run_spectra, params, "spectra (layers)", "layer")
    m = run.metrics()
    print(f"spectra run {run.name} ({m['num_layers']} layers x {m['kv_heads']} KV heads, "
          f"{m['text']['num_tokens']} tokens from {m['text']['first_essay']!r}) in "
          f"{seconds:.1f} s (forward + spectra: {m['seconds']} s)")
    print("layer-mean spectral centroid (normalised frequency, IWDFT):")
    for name, value in m["mean_centroid"].items():
        low = np.mean(m["fraction_below"][name]["0.05"])
        print(f"  {name:18s} centroid {value:.4f}   energy below f=0.05: {low:.1%}")
    print(f"stored in {run.path}")
    return 0


def add_cli(subparsers) -> None:
    from analysis import cli

    p = subparsers.add_parser("spectra", help="per-layer K/V energy spectra (IWDFT and DFT)")
    cli.add_model_args(p)
    cli.add_output_args(p)
    p.add_argument("--num-tokens", type=int, default=2048)
    p.add_argument("--text-seed", type=int, default=0, help="first essay (file-name order)")
    p.add_argument("--grid-points", type=int, default=257)
    p.add_argument("--chunks", type=int, default=22)
    p.set_defaults(func=_cli)


# Not interleaved: spectra reports progress per layer from inside its capturing forward pass.
KIND = JobKind(
    name="spectra", params=SpectraParams, run="analysis.tasks.spectral.spectra:run_spectra",
    context=lambda p, tokenizer: (p.num_tokens, f"num_tokens ({p.num_tokens})"),
    cli=add_cli)
