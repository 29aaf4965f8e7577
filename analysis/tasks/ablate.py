"""The `ablate` job kind: the per-layer frequency-chunk ablation (computed by
`analysis.tasks.spectral.ablation.run_ablation`), and its commands `python -m analysis ablate` and
`python -m analysis plans` (plans derived from an ablation, compared on needle + suite)."""
from __future__ import annotations

import time

from analysis.api.params import AblateParams
from analysis.tasks import JobKind
from analysis.tasks.ppl import prefix_and_continuation


def _layers_exist(params: AblateParams, info) -> None:
    if params.layers is not None:
        bad = [layer for layer in params.layers if not 0 <= layer < info.num_layers]
        if bad:
            raise ValueError(f"params.layers {bad} outside [0, {info.num_layers - 1}] "
                             f"({info.name} has {info.num_layers} layers).")


# ---------------------------------------------------------------------------------- CLI

def parse_layers(text: str | None) -> list[int] | None:
    """"all" or None -> None; "0,5,10" -> [0, 5, 10]; "0:30:3" -> range(0, 30, 3)."""
    if text is None or text.strip() in ("", "all"):
        return None
    if ":" in text:
        parts = [int(p) if p else None for p in text.split(":")]
        return list(range(*[p for p in parts if p is not None])) if len(parts) == 2 else \
            list(range(parts[0] or 0, parts[1], parts[2] or 1))
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError as exc:
        raise ValueError(f"--layers {text!r}: give 'all', a comma list like 0,5,10 or a range "
                         "start:stop:step like 0:30:3") from exc


def _cli(args) -> int:
    import numpy as np

    from analysis import cli
    from analysis.tasks.spectral.ablation import run_ablation

    params = AblateParams(chunks=args.chunks, layers=parse_layers(args.layers), target=args.target,
                          prefix_tokens=args.prefix_tokens,
                          continuation_tokens=args.continuation_tokens, num_texts=args.num_texts,
                          needle_samples=args.needle_samples, sink_tokens=args.sink_tokens,
                          window=args.window, seed=args.seed)
    run, seconds = cli.run_job(args, run_ablation, params, "ablate (layer x chunk)")
    m = run.metrics()
    a = run.get_array("ablation")
    print(f"ablate run {run.name}: {len(m['layers'])} layers x {m['chunks']} chunks, target "
          f"{m['target']}, {params.num_texts} texts, {params.needle_samples} needle samples, "
          f"{seconds:.1f} s")
    print(f"baseline continuation NLL {m['baseline_nll_mean']:.4f}"
          + (f", needle answer NLL {np.mean(m['baseline_needle_nll']):.4f}"
             if params.needle_samples else ""))
    print("largest mean NLL increase per layer (chunk: delta):")
    for i, layer in enumerate(m["layers"]):
        row = a["delta_mean"][i]
        top = np.argsort(row)[::-1][:3]
        print(f"  layer {layer:3d}: " + ", ".join(f"c{c}: {row[c]:+.4f}" for c in top))
    print(f"plans at kept ratios {', '.join(m['plans'])} are in metrics.json; stored in {run.path}")
    return 0


def add_cli(subparsers) -> None:
    from analysis import cli

    p = subparsers.add_parser("ablate", help="per-layer frequency-chunk ablation (NLL increase)")
    cli.add_model_args(p)
    cli.add_output_args(p)
    p.add_argument("--chunks", type=int, default=22)
    p.add_argument("--layers", default="all", help="'all', '0,5,10' or 'start:stop:step'")
    p.add_argument("--target", default="kv", choices=("kv", "keys", "values"))
    p.add_argument("--prefix-tokens", type=int, default=2048)
    p.add_argument("--continuation-tokens", type=int, default=256)
    p.add_argument("--num-texts", type=int, default=3)
    p.add_argument("--needle-samples", type=int, default=2)
    p.add_argument("--sink-tokens", type=int, default=4)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cli)
    add_plans_cli(subparsers)
    add_layer_budget_cli(subparsers)


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise ValueError(f"{flag} {text!r}: give comma-separated numbers like 0.75,0.875") from exc


def _plans_cli(args) -> int:
    from analysis import cli
    from analysis.tasks.spectral.ablation import compare_plans

    handle, store = cli.open_model_and_store(args)
    start = time.perf_counter()
    needle = dict(lengths=[int(x) for x in args.lengths.split(",")],
                  depths=_floats(args.depths, "--depths"), samples=args.samples,
                  needle=args.needle, max_new_tokens=args.max_new_tokens)
    suite = dict(tasks=args.tasks.split(","), context_length=args.context_length,
                 samples=args.suite_samples, max_new_tokens=args.max_new_tokens)
    out = compare_plans(handle, store, _floats(args.ratios, "--ratios"),
                        _floats(args.keep, "--keep"), needle, suite, variant=args.variant,
                        ablation_key=args.ablation, spectra_key=args.spectra,
                        executor=args.executor, ray_address=args.ray_address)
    print(f"plans from {out['ablation_key']} and {out['spectra_key']}; needle run "
          f"{out['needle_key']}, suite run {out['suite_key']}; {time.perf_counter() - start:.0f} s")
    print()
    print(out["markdown"])
    return 0


def add_plans_cli(subparsers) -> None:
    from analysis import cli

    p = subparsers.add_parser("plans", help="ablation vs low-pass vs energy plans on needle + suite")
    cli.add_model_args(p)
    cli.add_output_args(p)
    p.add_argument("--ratios", default="0.75,0.875", help="compression ratios (fraction removed)")
    p.add_argument("--keep", default="0.25,0.5",
                   help="plan keep fractions (fraction of chunks kept); a plan-free row (all "
                        "bins, keep 1) is always added per ratio")
    p.add_argument("--variant", default="iwdft", choices=("iwdft", "resample", "dct-iterative"))
    p.add_argument("--ablation", default=None, help="ablate run key (default: newest complete)")
    p.add_argument("--spectra", default=None, help="spectra run key (default: newest complete)")
    p.add_argument("--needle", default="sentence", choices=("sentence", "passkey", "multi"))
    p.add_argument("--lengths", default="2048")
    p.add_argument("--depths", default="0,25,50,75,100")
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--tasks", default="multikey_niah,variable_tracking,essay_qa")
    p.add_argument("--context-length", type=int, default=2048)
    p.add_argument("--suite-samples", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.set_defaults(func=_plans_cli)


def _layer_budget_cli(args) -> int:
    import json
    import os

    from analysis import cli
    from analysis.tasks.spectral.ablation import layer_budget

    if not 0 <= args.ratio < 1 or not 0 <= args.share < 1:
        raise ValueError(f"--ratio and --share must be in [0, 1), got {args.ratio:g} and "
                         f"{args.share:g}")
    handle, store = cli.open_model_and_store(args)
    out = layer_budget(store, handle.get().info, args.ratio, args.ablation, args.share)
    ratios = [round(r, 6) for r in out["layer_ratios"]]
    print(f"per-layer budget at ratio {args.ratio:g} (share {args.share:g} by sensitivity) from "
          f"{', '.join(out['ablation_keys'])}:")
    for layer, (s, r) in enumerate(zip(out["sensitivity"], ratios)):
        print(f"  layer {layer:3d}: sensitivity {s:+.4f}  ratio {r:.3f}  keeps {1 - r:.1%}")
    if args.write:
        tmp = f"{args.write}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(ratios, f)
        os.replace(tmp, args.write)
        print(f"wrote {args.write}; use it as --methods "
              f"faedkv:compression_ratio={args.ratio:g}:layer_ratios=@{args.write}")
    return 0


def add_layer_budget_cli(subparsers) -> None:
    from analysis import cli

    p = subparsers.add_parser("layer-budget", help="per-layer compression ratios from ablation runs")
    cli.add_model_args(p)
    cli.add_output_args(p)
    p.add_argument("--ratio", type=float, required=True, help="the mean compression ratio")
    p.add_argument("--ablation", action="append", default=None,
                   help="ablate run key (repeat to sum runs, e.g. keys and values; default: newest)")
    p.add_argument("--share", type=float, default=0.5,
                   help="share of the kept rows placed by sensitivity (the rest evenly)")
    p.add_argument("--write", default=None, help="write the ratios as a JSON list here")
    p.set_defaults(func=_layer_budget_cli)


KIND = JobKind(
    name="ablate", params=AblateParams, run="analysis.tasks.spectral.ablation:run_ablation",
    context=prefix_and_continuation, cells=lambda p, num_layers: p.num_cells(num_layers),
    check=_layers_exist, cli=add_cli, interleave=True)
