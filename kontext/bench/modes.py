"""The bench's memory and compile modes, one row's timing, the whole run and its table (kontext.bench.core holds the
models on random weights, the inputs, the timers and the peers).

- resident: every weight on the device for the whole run.
- stream: the blocks' weights in pinned CPU memory, each block copied to the device just before it runs, the next
  one prefetched on a side stream: kontext.offload's `prepare` and `StreamingBlocks`, as the pipeline's
  dit_offload="stream" runs them. On the CPU the same runner copies CPU to CPU: a stand-in that checks the runner
  and its numbers (the velocity equals the resident one's), not the cost of PCIe.
- compiled: resident, with the blocks compiled once per block class (kontext.compile.compile_blocks); its warm-up
  (first call minus the steady-state step) is what compiling costs. With `Setup.cuda_graphs` (CUDA only) the blocks
  also record CUDA graphs (torch.compile mode "reduce-overhead").

`Setup.memory_limit_gb` caps PyTorch's CUDA allocator (torch.cuda.set_per_process_memory_fraction) for the whole
run: a 16 GB or 8 GB card emulated on a big one. A row or peer that runs out of memory is reported as "OOM at X GB",
never a crash. The cap leaves out what the allocator does not see (the CUDA context, about half a GB, and kernel
modules), so a real card of that size has a little less room.
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from ..compile import compile_blocks
from ..denoiser import Denoiser
from ..dit import PLAIN, BlockRunner, FluxDiT
from ..errors import InputError
from ..offload import BLOCK_LISTS, StreamingBlocks, prepare
from ..pipeline import sample_latent
from . import core

log = logging.getLogger(__name__)
MODES = ("resident", "stream", "compiled")  # the order rows run in: resident first, the others are checked on it
CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------- options

def default_modes(device: torch.device) -> list[str]:
    # On the CPU inductor's C++ compile costs 20-45 s per path (2 cores) for a tiny step of milliseconds: opt-in.
    return list(MODES) if device.type == "cuda" else ["resident", "stream"]


def check_modes(text: str | None, device: torch.device) -> list[str]:
    if text is None:
        return default_modes(device)
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise InputError(f"--modes {text!r}: unknown {', '.join(unknown) or '(none given)'}; "
                         f"expected some of {', '.join(MODES)}")
    return [m for m in MODES if m in modes]


def check_memory_limit(gb: float | None, device: torch.device) -> None:
    if gb is None:
        return
    if not (gb > 0 and math.isfinite(gb)):  # NaN fails the first test
        raise InputError(f"--memory-limit-gb {gb:g}: must be a positive number of GB")
    if device.type != "cuda":
        raise InputError(f"--memory-limit-gb {gb:g} emulates a smaller GPU by capping PyTorch's CUDA allocator; "
                         f"this run is on {device}: drop the option or use --device cuda")
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    if gb > total:
        raise InputError(f"--memory-limit-gb {gb:g}: more than the {total:.1f} GB of this {device} card")


def check_cuda_graphs(on: bool, modes: list[str], device: torch.device) -> None:
    if not on:
        return
    if device.type != "cuda":
        raise InputError(f"--cuda-graphs: CUDA graphs need a CUDA device; this run is on {device}: drop the option")
    if "compiled" not in modes:
        raise InputError("--cuda-graphs applies to the compiled mode only: add compiled to --modes")


@contextlib.contextmanager
def memory_limit(s: core.Setup) -> Iterator[None]:
    """The allocator capped at `s.memory_limit_gb` GiB (GB here and in the table are 2**30 bytes, as a card's
    memory is counted), lifted again on the way out."""
    if s.memory_limit_gb is None:
        yield
        return
    total = torch.cuda.get_device_properties(s.device).total_memory
    torch.cuda.set_per_process_memory_fraction(s.memory_limit_gb * 2**30 / total, s.device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, s.device)


# ---------------------------------------------------------------------------------------------- failures

def reason(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"


def is_oom(exc: BaseException | None) -> bool:
    """Out of memory, also when a library wrapped it (a compiler's error, a kernel launch's RuntimeError)."""
    for _ in range(8):  # the chain of causes, bounded: a cycle must not hang the report
        if exc is None:
            return False
        if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def failure(exc: BaseException, s: core.Setup) -> str:
    """What the table says for a row or peer that raised: "OOM at X GB" (the --memory-limit-gb cap, else the
    card's size) or the error. The failed call's frames are cleared so that its tensors can be freed now."""
    import traceback

    traceback.clear_frames(exc.__traceback__)
    if not is_oom(exc):
        return reason(exc)
    if s.memory_limit_gb is not None:
        return f"OOM at {s.memory_limit_gb:g} GB"
    if s.device.type == "cuda":
        return f"OOM at {torch.cuda.get_device_properties(s.device).total_memory / 2**30:.0f} GB"
    return "OOM (host memory)"


# ---------------------------------------------------------------------------------------------- modes

def place(model: FluxDiT, mode: str, s: core.Setup) -> FluxDiT:
    """The built model made ready for its mode (stream: built with its blocks on the CPU, see `time_row`)."""
    if mode == "stream":
        prepare(model, s.device)  # the pipeline's own step: small layers to the device, blocks pinned
    elif mode == "compiled":
        compile_blocks(model, cuda_graphs=s.cuda_graphs, device=s.device)
    return model


def runner(model: FluxDiT, mode: str, device: torch.device) -> contextlib.AbstractContextManager[BlockRunner]:
    """The block runner of one sampling run, as the pipeline makes it: a streaming one puts every block back home
    when the run ends, also when it fails."""
    return StreamingBlocks(model, device) if mode == "stream" else contextlib.nullcontext(PLAIN)


def device_bytes(model: FluxDiT, mode: str) -> int:
    if mode != "stream":
        return core.parameter_bytes(model)
    # Streamed blocks only visit (a block or two at a time: that shows in the peak); the other layers stay.
    return sum(core.parameter_bytes(m) for name, m in model.named_children() if name not in BLOCK_LISTS)


def eager_fallback(model: nn.Module) -> str | None:
    """Why a compiled row did not run compiled: compile_blocks switches failed blocks back to the plain forward
    (nn.Module's `_compiled_call_impl` None) and logs the compiler's error."""
    if any(b._compiled_call_impl is None for b in [*model.double_blocks, *model.single_blocks]):
        return "torch.compile failed and the blocks ran eagerly (its warning is logged above)"
    return None


def mode_note(mode: str, s: core.Setup) -> str | None:
    if mode == "stream" and s.device.type != "cuda":
        return "CPU stand-in: the blocks are copied CPU to CPU (checks the runner and its numbers, not PCIe speed)"
    if mode == "compiled" and s.cuda_graphs:
        return "with CUDA graphs (torch.compile mode reduce-overhead)"
    return None


def relative_diff(v: torch.Tensor, ref: torch.Tensor) -> float:
    return float((v - ref).abs().max() / ref.abs().max())


# ---------------------------------------------------------------------------------------------- rows

@torch.no_grad()
def time_row(s: core.Setup, x: core.Inputs, mode: str, path: str) -> tuple[core.Row, torch.Tensor]:
    """Build the path's model for the mode, time a step (and its warm-up) and a whole edit; the row and the first
    call's velocity (on the CPU). The model is freed on return."""
    core.reset_memory(s.device)
    model = place(core.build(s, path, blocks_on=CPU if mode == "stream" else None), mode, s)
    row = core.Row(mode, core.path_name(s, path), weight_bytes=device_bytes(model, mode), note=mode_note(mode, s))
    den = Denoiser(model, (s.latent, s.latent), [x.ref], "offset", s.device)
    with runner(model, mode, s.device) as blocks:
        step = lambda: den(x.z, core.SIGMA, x.txt, x.pooled, core.GUIDANCE, blocks)
        first_ms, v = core.timed_once(step, s.device)
        row.ms_step = core.median_ms(step, s)
    row.warmup_s = (first_ms - row.ms_step) / 1000
    if not s.step_only:
        with runner(model, mode, s.device) as blocks:
            edit = lambda: sample_latent(model, x.txt, x.pooled, ref_latents=[x.ref], width=s.res, height=s.res,
                                         steps=s.steps, device=s.device, blocks=blocks)
            row.s_edit = core.timed_once(edit, s.device)[0] / 1000
    if s.device.type == "cuda":
        row.peak_bytes = torch.cuda.max_memory_allocated(s.device)
    if mode == "compiled":
        row.error = eager_fallback(model)  # measured, but not compiled: never reported as a compiled figure
    return row, v.float().cpu()


def run_row(s: core.Setup, x: core.Inputs, mode: str, path: str) -> tuple[core.Row, torch.Tensor | None]:
    """`time_row`, with a failure (out of memory under a card's cap, a missing kernel) as the row's text."""
    try:
        return time_row(s, x, mode, path)
    except Exception as exc:  # noqa: BLE001 - one row failing keeps the others
        return core.Row(mode, core.path_name(s, path), error=failure(exc, s), note=mode_note(mode, s)), None
    finally:
        if mode == "compiled":
            torch.compiler.reset()  # each compiled row pays its own compile; no graph outlives its model
        core.reset_memory(s.device)


def run_peer(name: str, fn: Callable[[], core.Peer], s: core.Setup) -> core.Peer:
    """A peer that is missing or fails is one line saying why, never the end of the run."""
    core.reset_memory(s.device)
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - an import error, a version mismatch, out of memory: others count
        return core.Peer(name, note=failure(exc, s))
    finally:
        core.reset_memory(s.device)


def time_peers(s: core.Setup, x: core.Inputs, comfy_dir: Path | None) -> list[core.Peer]:
    peers = [run_peer("diffusers", lambda: core.time_diffusers(s, x), s)]
    if comfy_dir is not None:
        peers.append(run_peer("comfyui", lambda: core.time_comfyui(s, x, comfy_dir), s))
    return peers


def run_all(s: core.Setup, paths: list[str], comfy_dir: Path | None = None, size_name: str = "",
            modes: list[str] | None = None, progress: Callable[[dict], None] | None = None) -> dict:
    """kontext.bench.bench: the peers first (each row's ratios are then known as it lands), then every mode, in
    MODES order, over every path."""
    modes = [m for m in MODES if m in (modes or MODES)]
    x = core.make_inputs(s)
    result: dict = {"meta": core.meta(s, size_name, modes), "rows": [], "peers": []}
    with memory_limit(s):
        peers = time_peers(s, x, comfy_dir)
        result["peers"] = [vars(p) for p in peers]
        resident: dict[str, torch.Tensor] = {}  # path -> the resident mode's velocity
        for mode in modes:
            for path in paths:
                row, v = run_row(s, x, mode, path)
                if v is not None and mode == "resident":
                    resident[path] = v
                elif v is not None and path in resident:
                    row.dv = relative_diff(v, resident[path])
                # fp8/fp4 compare against the peer's dense path too: what a user would otherwise run
                row.ratios = {p.name: p.ms / row.ms_step for p in peers if p.ms is not None and row.ms_step}
                result["rows"].append(vars(row))
                log.info("bench row: %s", row_line(row, list(row.ratios)))  # as it lands: a run cut short shows it
                if progress is not None:
                    progress(result)
    return result


# ---------------------------------------------------------------------------------------------- table

def size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def cell(v: float | None, fmt: str, width: int) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:{width}{fmt}}"


def row_line(r: core.Row, names: list[str]) -> str:
    lead = f"{r.mode:9} {r.path:5}"
    if r.error and r.ms_step is None:
        return f"{lead} {r.error if r.error.startswith('OOM') else 'FAILED: ' + r.error}"
    line = (f"{lead} {cell(r.ms_step, '.1f', 9)} {cell(r.s_edit, '.2f', 8)} {cell(r.warmup_s, '.2f', 9)} "
            f"{size(r.peak_bytes):>10} {size(r.weight_bytes):>10} {cell(r.dv, '.1e', 9)}")
    line += "".join(f" {cell(r.ratios.get(n), '.2f', 15)}" for n in names)
    return line + (f"  FAILED: {r.error}" if r.error else "")  # measured, but not what the mode promises


def table(rows: list[core.Row], peers: list[core.Peer], steps: int | None = None) -> str:
    names = [p.name for p in peers if p.ms is not None]
    head = (f"{'mode':9} {'path':5} {'ms/step':>9} {'s/edit':>8} {'warm-up s':>9} {'peak mem':>10} {'weights':>10} "
            f"{'dv/res.':>9}")
    lines = [head + "".join(f" {n + '/ours':>15}" for n in names)]
    lines += [row_line(r, names) for r in rows]
    for p in peers:
        lines.append(f"{p.name}: {p.ms:.1f} ms/step ({p.dtype}, same weights and inputs)" if p.ms is not None
                     else f"{p.name}: not timed ({p.note})")
    lines += list(dict.fromkeys(f"{r.mode}: {r.note}" for r in rows if r.note))
    edit = f"a whole edit of {steps} steps" if steps else "not timed (step only)"
    lines.append(f"s/edit: {edit}; warm-up s: the first step minus the steady-state one")
    lines.append("weights: bytes the device holds for the whole run; dv/res.: max |v - v_resident| / max |v_resident| "
                 "on the same path and inputs")
    if names:
        lines.append("ratios: peer ms / our ms per step (> 1: we are faster); fp8/fp4 against the peer's dense path")
    return "\n".join(lines)


def render(result: dict) -> str:
    """The table of a `bench` result."""
    return table([core.Row(**r) for r in result["rows"]], [core.Peer(**p) for p in result["peers"]],
                 result["meta"].get("steps"))
