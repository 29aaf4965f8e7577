"""The `contrib` job kind: token-contribution profiles per method (computed by
`analysis.tasks.spectral.contrib.run_contrib`), and its command `python -m analysis contrib`."""
from __future__ import annotations

from analysis.api.params import EVICTION, LINEAR, ContribParams, MethodSpec
from analysis.tasks import JobKind


DIMSPLIT_PROFILE = ("{where}: faedkv's variant 'dimsplit' has no contribution profile: which head "
                    "dims stay exact is chosen from the data, so it is no fixed linear map along "
                    "the tokens (every token keeps its own row); leave it out of methods.")


def _profiled_methods(params: ContribParams, info) -> None:
    for i, spec in enumerate(params.methods):
        if spec.name not in LINEAR | EVICTION:
            raise ValueError(f"params.methods.{i}: method {spec.name!r} has no contribution "
                             "profile (it keeps the whole cache); leave it out of methods.")
        if spec.params.get("variant") == "dimsplit":
            raise ValueError(DIMSPLIT_PROFILE.format(where=f"params.methods.{i}"))


# ---------------------------------------------------------------------------------- CLI

def parse_methods(text: str, ratio: float, variants: str = "iwdft") -> list[MethodSpec]:
    """"faedkv,snapkv" -> MethodSpecs at `ratio`: a bare "faedkv" expands to each of `variants`
    ("iwdft,resample"); anything else as the task commands read it ("faedkv:variant=resample",
    "snapkv:window_size=32")."""
    from analysis.cli import parse_methods as parse_task_methods

    specs = []
    for item in [n.strip() for n in text.split(",") if n.strip()]:
        if item == "faedkv":
            specs += [MethodSpec(name="faedkv", compression_ratio=ratio, params={"variant": v})
                      for v in variants.split(",")]
        else:
            specs += parse_task_methods(item, [ratio])
    return specs


def _cli(args) -> int:
    from analysis import cli
    from analysis.tasks.spectral.contrib import run_contrib

    params = ContribParams(methods=parse_methods(args.methods, args.ratio, args.variants),
                           context_length=args.context_length, text_seed=args.text_seed)
    run, seconds = cli.run_job(args, run_contrib, params, "contrib (methods)")
    print(f"contrib run {run.name}: {len(params.methods)} methods, ratio {args.ratio}, "
          f"{params.context_length} tokens, {seconds:.1f} s")
    print(f"  {'method':34s} {'source':18s} {'1-Gini':>7s} {'old/new':>8s} {'min/max':>8s}")
    for label, s in run.metrics()["methods"].items():
        print(f"  {label:34s} {s['source']:18s} {s['one_minus_gini']:7.4f} "
              f"{s['oldest_over_newest']:8.4f} {s['min_over_max']:8.4f}")
    print(f"  (summaries over every position; over the middle only: records' 'middle'); "
          f"stored in {run.path}")
    return 0


def add_cli(subparsers) -> None:
    from analysis import cli

    p = subparsers.add_parser("contrib", help="token-contribution profiles per method")
    cli.add_model_args(p)
    cli.add_output_args(p)
    p.add_argument("--methods", default="faedkv,dct_iterative,streaming_llm,snapkv,h2o",
                   help="comma list; a bare 'faedkv' expands to --variants; "
                        "'faedkv:variant=resample:key_space=pre_rope' as in the task commands")
    p.add_argument("--variants", default="iwdft,resample")
    p.add_argument("--ratio", type=float, default=0.75, help="compression_ratio (fraction removed)")
    p.add_argument("--context-length", type=int, default=2048)
    p.add_argument("--text-seed", type=int, default=0)
    p.set_defaults(func=_cli)


KIND = JobKind(
    name="contrib", params=ContribParams, run="analysis.tasks.spectral.contrib:run_contrib",
    context=lambda p, tokenizer: (p.context_length, f"context_length ({p.context_length})"),
    shortest=lambda p, tokenizer: (p.context_length, f"context_length ({p.context_length})"),
    check=_profiled_methods, cli=add_cli, interleave=True)
