"""Page state in the URL (st.query_params), so a view can be shared and reopened.

Each page binds its widgets through `bind(...)`: the widget's starting value comes from the URL
when the link carries one, else from what this session last chose on that page, else the
default; `sync(...)` writes the current values back into the URL after the widgets ran.
Values are encoded as short strings: ints, floats, comma lists, and plan masks as one hex word
per layer (`encode_mask`).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import streamlit as st

_MEMORY = "_page_state"     # session_state[_MEMORY][page][name] = encoded value


def encode(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (list, tuple)):
        return ",".join(encode(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def decode_list(text: str, item: Callable[[str], Any]) -> list:
    return [item(part) for part in text.split(",") if part != ""]


def decode_bool(text: str) -> bool:
    if text not in ("0", "1", "true", "false"):
        raise ValueError(f"not a boolean: {text!r}")
    return text in ("1", "true")


def encode_mask(mask: np.ndarray) -> str:
    """(layers, chunks) bool -> "hex.hex...": bit c of layer l's word is chunk c."""
    mask = np.asarray(mask, dtype=bool)
    words = [format(int(sum(1 << c for c in np.flatnonzero(row))), "x") for row in mask]
    return f"{mask.shape[1]}:" + ".".join(words)


def decode_mask(text: str, layers: int, chunks: int) -> np.ndarray:
    """Inverse of encode_mask; ValueError when the text does not describe a (layers, chunks) mask."""
    head, _, body = text.partition(":")
    words = body.split(".")
    if int(head) != chunks or len(words) != layers:
        raise ValueError(f"plan in the link is {len(words)} layers x {head} chunks, "
                         f"expected {layers} x {chunks}")
    mask = np.zeros((layers, chunks), dtype=bool)
    for l, word in enumerate(words):
        bits = int(word, 16)
        if bits >> chunks:
            raise ValueError(f"layer {l} of the plan in the link names a chunk >= {chunks}")
        mask[l] = [(bits >> c) & 1 for c in range(chunks)]
    return mask


def _memory(page: str) -> dict:
    return st.session_state.setdefault(_MEMORY, {}).setdefault(page, {})


def initial(page: str, name: str, default: Any, parse: Callable[[str], Any] = str,
            valid: Callable[[Any], bool] = lambda v: True) -> Any:
    """The value a page starts with: URL, else this session's last value, else default.
    A value that does not parse or is not valid (e.g. a layer the model lacks) falls back."""
    for source in (st.query_params.get(name), _memory(page).get(name)):
        if source is None:
            continue
        try:
            value = parse(source)
        except (ValueError, TypeError):
            continue
        if valid(value):
            return value
    return default


def bind(page: str, name: str, default: Any, parse: Callable[[str], Any] = str,
         valid: Callable[[Any], bool] = lambda v: True) -> str:
    """Seed session_state[key] for a widget (once per visit) and return the widget key."""
    key = f"{page}.{name}"
    if key not in st.session_state:
        st.session_state[key] = initial(page, name, default, parse, valid)
    return key


def sync(page: str, values: dict[str, Any]) -> None:
    """Write the page's current values into the URL (and this session's memory); None drops."""
    memory = _memory(page)
    for name, value in values.items():
        if value is None or value == [] or value == "":
            memory.pop(name, None)
            if name in st.query_params:
                del st.query_params[name]
            continue
        text = value if isinstance(value, str) else encode(value)
        memory[name] = text
        if st.query_params.get(name) != text:
            st.query_params[name] = text


def options_valid(options: Sequence) -> Callable[[Any], bool]:
    """For multiselect/selectbox values: every chosen item is one of the options."""
    allowed = set(options)

    def check(value):
        items = value if isinstance(value, (list, tuple)) else [value]
        return all(item in allowed for item in items)
    return check
