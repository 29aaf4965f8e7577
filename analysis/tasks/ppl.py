"""Continuation perplexity: the NLL of a text's last tokens given its compressed prefix.

    nll = continuation_nll(loaded, press, prefix_ids, continuation_ids)   # any press, or None
    key = run_ppl(loaded, store, PplParams(methods=[...], prefix_tokens=2048))

How the prefix is compressed and the continuation read (T prefix tokens, N continuation):
1. prefill prefix[:-1] (T - 1 tokens) under the press (kvpress hooks, as in generation);
2. feed [prefix[-1]] + continuation[:-1] in one forward pass at position ids T-1 .. T+N-2,
   i.e. continuing from the ORIGINAL prefix length, over the compressed cache;
3. the NLL of continuation token i is read from output i, so all N predictions (the first one
   included) attend to the compressed cache. Compressing prefix[:-1] rather than the whole
   prefix is what makes the first prediction go through the compressed cache too: the prefill
   itself attends to the uncompressed keys (kvpress compresses after each layer's attention).
`cache_position` is left to the cache (the compressed length onward): it indexes the cache
and builds the causal mask, which must count the tokens actually in the cache; the rotary
positions come from `position_ids` (kvpress's pipeline does the same when it asks the
question after a compressed prefill). With press=None this equals one forward pass over
prefix + continuation (tested to 1e-4 in float32). A cache whose layers differ in length
(PyramidKV), or one whose pairs kvpress masks (KVzip), is read one continuation token per
forward pass (see generation.one_token_steps).

Texts: text i of a run is `haystack.text_tokens(tokenizer, prefix + continuation, params.seed
+ i)`: from the start of essay seed + i, continuing into the next essays.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time

from analysis.api.params import MethodSpec, PplParams
from analysis.harness import haystack
from analysis.tasks import JobKind, run_grid, unique_labels, with_full


def _as_ids(ids, device):
    import torch

    t = torch.as_tensor(ids, dtype=torch.long, device=device)
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2 or t.shape[0] != 1:
        raise ValueError(f"token ids must be a list or a (1, n) tensor, got shape {tuple(t.shape)}")
    return t


def prefill(loaded, press, ids):
    """Prefill `ids` (1, T) into a fresh DynamicCache under `press`; (cache, per-layer lengths).
    Raises CompressionError when a registry press left another length than its budget."""
    import torch
    from transformers import DynamicCache

    from analysis.harness.methods import attention_for, check_cache_lengths

    model = loaded.model
    cache = DynamicCache()
    with attention_for(press, model), torch.inference_mode():
        with press(model) if press is not None else contextlib.nullcontext():
            model.model(input_ids=ids, past_key_values=cache)
    lengths = [int(cache.get_seq_length(i)) for i in range(len(cache))]
    check_cache_lengths(press, model, ids.shape[1], lengths)
    return cache, lengths


def continuation_token_nll(loaded, press, prefix_ids, continuation_ids):
    """Per-token NLL (float32 tensor of shape (N,)) of the continuation given the compressed
    prefix; see the module docstring. Returns (nll, cache lengths after the prefill)."""
    import torch

    device = loaded.model.device
    prefix = _as_ids(prefix_ids, device)
    cont = _as_ids(continuation_ids, device)
    t, n = prefix.shape[1], cont.shape[1]
    if t < 2 or n < 1:
        raise ValueError(f"need at least 2 prefix tokens and 1 continuation token, got {t} and {n}")
    cache, lengths = prefill(loaded, press, prefix[:, :-1])
    inputs = torch.cat([prefix[:, -1:], cont[:, :-1]], dim=1)
    return cached_token_nll(loaded, press, cache, t - 1, inputs, cont), lengths


def cached_token_nll(loaded, press, cache, start: int, inputs, targets):
    """Per-token NLL (float32, shape (N,)) of `targets` (1, N) when `inputs` (1, N) are fed at
    positions start .. start + N - 1 over `cache`, a prefill of `start` tokens compressed by
    `press` and read before any other prefill (its masks and slot biases live on the model's
    modules until the next one). The cache grows by the N inputs."""
    import torch

    from analysis.harness.generation import one_token_steps
    from analysis.harness.methods import attention_for

    model = loaded.model
    device = model.device
    inputs, targets = _as_ids(inputs, device), _as_ids(targets, device)
    n = inputs.shape[1]
    with attention_for(press, model), torch.inference_mode():
        if one_token_steps(model, cache):
            # One mask cannot serve layers of different lengths, nor one fake key many queries
            # (see generation.one_token_steps).
            logits = torch.cat([
                model(input_ids=inputs[:, j:j + 1], past_key_values=cache,
                      position_ids=torch.tensor([[start + j]], device=device)).logits
                for j in range(n)], dim=1)
        else:
            positions = torch.arange(start, start + n, device=device).unsqueeze(0)
            logits = model(input_ids=inputs, past_key_values=cache, position_ids=positions).logits
    logp = logits[0].float().log_softmax(-1)
    return -logp.gather(-1, targets[0].unsqueeze(-1)).squeeze(-1)


def continuation_nll(loaded, press, prefix_ids, continuation_ids) -> float:
    """Mean NLL (nats per token) of `continuation_ids` given `prefix_ids` compressed by `press`
    (any kvpress press, or None for the full cache)."""
    nll, _ = continuation_token_nll(loaded, press, prefix_ids, continuation_ids)
    return float(nll.mean())


def ppl_text(tokenizer, params: PplParams, index: int) -> tuple[list[int], list[int]]:
    """(prefix ids, continuation ids) of text `index` of the run."""
    ids = haystack.text_tokens(tokenizer, params.prefix_tokens + params.continuation_tokens,
                               params.seed + index)
    return ids[:params.prefix_tokens], ids[params.prefix_tokens:]


def ppl_cells(params: PplParams) -> list[dict]:
    labels = unique_labels(params.methods)
    return [{"id": f"{label}|text={i}", "method": spec.model_dump(mode="json"), "label": label,
             "text": i}
            for i in range(params.num_texts) for spec, label in zip(params.methods, labels)]


@dataclasses.dataclass
class PplCell:
    handle: object
    params: PplParams

    def __call__(self, cell: dict) -> dict:
        from analysis.harness.methods import build_press, expected_cache_lengths

        loaded = self.handle.get()
        spec = MethodSpec(**cell["method"])
        prefix, cont = ppl_text(loaded.tokenizer, self.params, cell["text"])
        press = build_press(spec, loaded.model)
        start = time.perf_counter()
        nll, lengths = continuation_token_nll(loaded, press, prefix, cont)
        mean = float(nll.mean())
        return {"method": spec.name, "label": cell["label"], "ratio": spec.compression_ratio,
                "text": cell["text"], "text_seed": self.params.seed + cell["text"],
                "nll": mean, "ppl": math.exp(mean), "prefix_tokens": len(prefix),
                "continuation_tokens": len(cont), "cache_lengths": lengths,
                "expected_cache_lengths": expected_cache_lengths(press, loaded.model,
                                                                 len(prefix) - 1),
                "seconds": time.perf_counter() - start}


def run_ppl(model, store, params: PplParams, progress=None, should_stop=None,
            executor: str = "local", ray_address: str | None = None,
            show_progress: bool = True) -> str:
    """Run (or resume) the perplexity grid (methods x texts, full always included)."""
    params = params.model_copy(update={"methods": with_full(params.methods)})
    return run_grid("ppl", model, store, params, ppl_cells(params),
                    lambda handle: PplCell(handle, params),
                    lambda rows, name: ppl_metrics(rows, params, name),
                    progress=progress, should_stop=should_stop, executor=executor,
                    ray_address=ray_address, show_progress=show_progress)


def ppl_metrics(rows: list[dict], params: PplParams, model_name: str = "") -> dict:
    """Per method: mean NLL over texts, its perplexity exp(mean NLL), and the mean NLL increase
    over the full cache on the same texts."""
    full = {r["text"]: r["nll"] for r in rows if r["method"] == "full"}
    by_method = []
    for label in unique_labels(params.methods):
        members = [r for r in rows if r["label"] == label]
        if not members:
            continue
        nlls = [r["nll"] for r in members]
        mean = sum(nlls) / len(nlls)
        deltas = [r["nll"] - full[r["text"]] for r in members if r["text"] in full]
        by_method.append({"label": label, "ratio": members[0]["ratio"], "n": len(members),
                          "nll": mean, "ppl": math.exp(mean),
                          "delta_nll": sum(deltas) / len(deltas) if deltas else None,
                          "seconds": sum(r["seconds"] for r in members) / len(members)})
    nll_full = next((m["nll"] for m in by_method if m["label"] == "full"), None)
    return {"task": "ppl", "model": model_name, "cells": len(rows), "nll_full": nll_full,
            "prefix_tokens": params.prefix_tokens,
            "continuation_tokens": params.continuation_tokens, "by_method": by_method}


def ppl_table(run):
    import pandas as pd

    metrics = run.metrics() if hasattr(run, "metrics") else run
    if not metrics or metrics.get("task") != "ppl":
        raise ValueError("this run has no perplexity metrics (unfinished, or another task)")
    return pd.DataFrame(metrics["by_method"])


def ppl_markdown(run) -> str:
    metrics = run.metrics() if hasattr(run, "metrics") else run
    lines = [f"Continuation perplexity ({metrics.get('model', '')}: NLL of "
             f"{metrics['continuation_tokens']} tokens after a {metrics['prefix_tokens']}-token "
             "compressed prefix, mean over texts)", "",
             "| method | NLL | perplexity | NLL - full | texts |", "|---|---|---|---|---|"]
    for m in ppl_table(metrics).to_dict("records"):
        delta = m["delta_nll"]
        delta = "-" if delta is None or (isinstance(delta, float) and math.isnan(delta)) else f"{delta:+.4f}"
        lines.append(f"| {m['label']} | {m['nll']:.4f} | {m['ppl']:.2f} | {delta} | {m['n']} |")
    return "\n".join(lines)


def add_cli(subparsers) -> None:
    """`python -m analysis ppl ...`"""
    from analysis import cli

    p = cli.add_task_parser(subparsers, "ppl", "continuation perplexity after a compressed prefix",
                            grid=False)
    p.add_argument("--prefix-tokens", type=int, default=2048, help="compressed prefix (default 2048)")
    p.add_argument("--continuation-tokens", type=int, default=256,
                   help="scored continuation (default 256)")
    p.add_argument("--num-texts", type=int, default=3, help="texts (essays) to average (default 3)")
    p.set_defaults(func=_cli_main)


def _cli_main(args) -> int:
    from analysis import cli

    params = cli.build_params(PplParams, args, prefix_tokens=args.prefix_tokens,
                              continuation_tokens=args.continuation_tokens,
                              num_texts=args.num_texts)
    run, _ = cli.run_job(args, run_ppl, params, "ppl")
    return cli.print_run(run, ppl_markdown(run))


def prefix_and_continuation(params, tokenizer=None) -> tuple[int, str]:
    """(prefix + continuation tokens, what they are): the context of a ppl or ablate job."""
    return (params.prefix_tokens + params.continuation_tokens,
            f"prefix_tokens ({params.prefix_tokens}) + continuation_tokens "
            f"({params.continuation_tokens})")


KIND = JobKind(
    name="ppl", params=PplParams, run="analysis.tasks.ppl:run_ppl",
    context=prefix_and_continuation,
    # the prefix's last token is read with the continuation (prefix[:-1] is compressed)
    shortest=lambda p, tokenizer: (p.prefix_tokens - 1,
                                   f"prefix_tokens - 1 ({p.prefix_tokens - 1})"),
    adds_full=True, cli=add_cli, interleave=True)
