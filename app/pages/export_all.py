"""Export: every figure this session showed, with its files, and all of them as one zip."""
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:    # AppTest runs a page file on its own
    sys.path.insert(0, ROOT)

import streamlit as st  # noqa: E402

from app import export, ui  # noqa: E402


def main() -> None:
    ui.page_setup("Export", "Every figure you opened in this session. Images are PNG (2× scale), "
                  "SVG or PDF; data as CSV; what produced it as JSON. File names carry the model, "
                  "method and ratio.")
    entries = list(st.session_state.get(ui.FIGURES_KEY, {}).values())
    if not entries:
        ui.empty_state("No figure yet: open Spectra, Ablation, Needle or Token contribution "
                       "(or re-run generation in the Frequency lab), then come back.")
        return
    formats = st.multiselect("image formats in the zip", export.IMAGE_FORMATS,
                             default=list(export.IMAGE_FORMATS), key="export.formats")
    entries_now = entries

    def build_zip() -> bytes:
        return export.zip_bytes(entries_now, tuple(formats))

    st.download_button(f"Download all {len(entries)} figures as a zip", data=build_zip,
                       file_name=f"faedkv-figures_{export.slug(ui.model_name())}.zip",
                       mime="application/zip", type="primary", icon=":material/folder_zip:",
                       on_click="ignore", key="export.zip")
    for entry in entries:
        with st.container(border=True):
            st.markdown(f"**{entry.title}**  \n`{entry.stem()}`")
            st.caption(ui.provenance_line(entry.provenance))
            ui.export_buttons(entry)


main()
