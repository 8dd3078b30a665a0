"""Table 4: the device line, the components measured here beside the paper's figures, and the markdown."""

from __future__ import annotations

import json
import logging
import math
import os
import platform
from pathlib import Path

import torch

from ..io import json_default, write_json, write_text
from .overhead import OverheadResult
from .timing import PAPER_TABLE4, Timing

log = logging.getLogger(__name__)


# -----------------------------------------------------------------------------
# the table


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_description(device: str) -> str:
    """The hardware the model ran on: the GPU name(s) from torch, or the CPU's model name and torch's threads."""
    device = str(device)
    if torch.cuda.is_available() and (device.startswith("cuda") or device == "auto"):
        indices = [int(device.split(":")[1])] if device.startswith("cuda:") else list(range(torch.cuda.device_count()))
        names = [torch.cuda.get_device_name(i) for i in indices]
        return f"GPU: {', '.join(names)} (CUDA {torch.version.cuda}); torch CPU threads: {torch.get_num_threads()}"
    return f"CPU: {_cpu_name()}; torch threads: {torch.get_num_threads()} of {os.cpu_count()} logical CPUs"


def table4_components(
    probes: Timing,
    head_map: Timing,
    overhead: OverheadResult,
    layer_maps: Timing | None = None,
    iti: Timing | None = None,
) -> list[dict]:
    """Table 4's rows in order: the paper's three (the inference row is the per-decoded-token increase), then
    this project's extras. Each row: key, component, unit, median, min, max, n (what n counts), values, paper."""
    H = probes.meta.get("heads", "H")
    rows = [
        ("probe_layer", "Probe for one layer (s)", probes, f"{probes.n} repeats", PAPER_TABLE4["probe_layer_s"]),
        (
            "head_map",
            "Compute intervention vector for one head (s)",
            head_map,
            f"{head_map.n} repeats",
            PAPER_TABLE4["head_map_s"],
        ),
        (
            "inference_per_token",
            "Increase in inference time per answer (%), per decoded token (headline)",
            overhead.per_token,
            f"{overhead.per_token.n} pairs",
            PAPER_TABLE4["inference_increase_pct"],
        ),
        (
            "inference_per_answer",
            "Increase in inference time per answer (%), whole answer as decoded",
            overhead.per_answer,
            f"{overhead.per_answer.n} pairs",
            None,
        ),
    ]
    if layer_maps is not None:
        rows.append(
            (
                "layer_maps",
                f"Intervention maps for all {H} heads of the layer (s)",
                layer_maps,
                f"{layer_maps.n} repeats",
                None,
            )
        )
    if iti is not None:
        rows.append(
            ("iti_layer", f"ITI, for comparison: fit for one layer's {H} heads (s)", iti, f"{iti.n} repeats", None)
        )
    if overhead.inside_edit is not None:
        t = overhead.inside_edit
        rows.append(("inside_edit", "Time inside the SLIM edit (% of edited decoding)", t, f"{t.n} pairs", None))
    return [
        {"key": key, "component": label, **timing.as_dict(), "n_counts": n, "paper": paper}
        for key, label, timing, n, paper in rows
    ]


def _number(x: float, unit: str, signed: bool = True) -> str:
    """Seconds to 3 significant digits (2 decimals from 1 s up); percentages to 2 decimals, increases signed."""
    if not math.isfinite(x):
        return str(x)
    if unit == "%":
        return f"{x:+.2f}" if signed else f"{x:.2f}"
    return f"{x:.2f}" if abs(x) >= 1 else f"{x:.3g}"


def table4_markdown(header: dict, components: list[dict], notes: list[str] = ()) -> str:
    """The markdown page: a header list (command, date, model, device, versions), the table, then notes."""
    title = header.get("title", "Table 4: running time")
    lines = [f"# {title}", ""]
    for key, value in header.items():
        if key != "title":
            lines.append(f"- {key}: {value}")
    paper = f"paper: {PAPER_TABLE4['model']}, {PAPER_TABLE4['hardware']} (the paper's figures, not this run)"
    lines += [
        "",
        f"| component | this run (median) | spread (min to max) | n | {paper} |",
        "| --- | --- | --- | --- | --- |",
    ]
    for c in components:
        unit = c["unit"]
        signed = c["key"] != "inside_edit"  # a share of the time, not an increase
        low, mid, high = (_number(c[k], unit, signed) for k in ("min", "median", "max"))
        ref = "-" if c["paper"] is None else f"{c['paper']:g}"
        lines.append(f"| {c['component']} | {mid} | {low} to {high} | {c['n_counts']} | {ref} |")
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def earlier_table4(out: str | os.PathLike, command: str, device: str, config: dict) -> dict | None:
    """The record of the Table 4 at `out` (its JSON beside it) when it was measured by the same command, with the
    same configuration, on the same device with the same torch: what a rerun keeps instead of timing it again
    (a resumed reproduce.sh). None when there is none, when anything differs, or when it is damaged."""
    out = Path(out)
    try:
        record = json.loads(_json_path(out).read_text())
        header, details = record["header"], record["details"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    same = (
        out.is_file()
        and header.get("command") == command
        and header.get("device") == device
        and header.get("torch") == torch.__version__
        and details.get("config") == json.loads(json.dumps(config, default=json_default))
    )
    return record if same else None


def _json_path(out: Path) -> Path:
    return out.with_suffix(".json") if out.suffix else out.with_name(out.name + ".json")


def write_table4(out: str | os.PathLike, header: dict, components: list[dict], notes: list[str] = (), details=None):
    """Write the markdown to `out` and the same content as JSON beside it (`out` with .json), atomically.
    Returns (markdown path, JSON path)."""
    out = Path(out)
    json_path = _json_path(out)
    write_text(out, table4_markdown(header, components, notes))
    paper = {**PAPER_TABLE4, "source": "the paper's Table 4, quoted; not measured by this run"}
    record = {"header": header, "components": components, "notes": list(notes), "details": details or {}}
    write_json(json_path, {**record, "paper_table4": paper})
    return out, json_path
