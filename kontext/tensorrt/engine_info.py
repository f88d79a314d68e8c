"""An engine's JSON sidecar and the engine cache: what an engine was built from and for, and when it may run.

`DIR/<key>.plan` is the serialised engine and `DIR/<key>.json` its sidecar: the SHA-256 of the source model file,
the precision, the DiT config, the optimisation profiles, the TensorRT version and the GPU's name. The key is a
hash of everything that makes an engine usable, so engines for other GPUs, TensorRT versions, precisions or models
live side by side in one folder (ComfyUI's `models/tensorrt/`) and a run picks the one that fits, or refuses,
saying what did not match. A TensorRT plan runs only on the TensorRT version and GPU model it was built with.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import FluxConfig
from ..errors import InputError
from .profiles import Profile

SIDECAR_VERSION = 1
HASH_CHUNK = 16 << 20


@dataclass
class EngineInfo:
    source_sha256: str  # of the DiT file the ONNX graph was exported from ("" when unknown)
    precision: str
    config: dict
    profiles: list[Profile]
    tensorrt_version: str
    gpu: str
    source_name: str = ""  # the DiT file's name, for messages
    refittable: bool = False
    sidecar_version: int = SIDECAR_VERSION
    extra: dict = field(default_factory=dict)

    def key(self) -> str:
        """The cache key: everything an engine must match to run."""
        parts = [self.source_sha256, self.precision, json.dumps(self.config, sort_keys=True),
                 json.dumps([p.to_json() for p in self.profiles]), self.tensorrt_version, self.gpu,
                 json.dumps(self.extra.get("loras", []), sort_keys=True), str(self.refittable)]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

    def flux_config(self) -> FluxConfig:
        c = dict(self.config)
        c["axes_dim"] = tuple(c["axes_dim"])
        return FluxConfig(**c)

    def to_json(self) -> str:
        d = asdict(self)
        d["profiles"] = [p.to_json() for p in self.profiles]
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: object = "sidecar") -> "EngineInfo":
        try:
            d = json.loads(text)
            d["profiles"] = [Profile.from_json(p) for p in d["profiles"]]
            if d.get("sidecar_version") != SIDECAR_VERSION:
                raise ValueError(f"sidecar version {d.get('sidecar_version')}, expected {SIDECAR_VERSION}")
            return cls(**d)
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"{where}: not a valid engine sidecar ({e}); rebuild the engine with "
                             "`python -m kontext build-engine`") from None


def _files(path: Path) -> list[Path]:
    """The files that make a model: the file itself, or every file of a (diffusers) folder, in a fixed order."""
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a model file; of a folder, over each file's relative name and bytes."""
    path = Path(path)
    h = hashlib.sha256()
    for f in _files(path):
        if f != path:
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as stream:
            while chunk := stream.read(HASH_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def source_identity(path: str | os.PathLike) -> dict:
    """What export-onnx records of the source besides its hash: name, size and newest modification time (of all
    the files of a folder)."""
    stats = [f.stat() for f in _files(Path(path))]
    return {"source_name": os.path.basename(os.path.normpath(path)), "source_size": sum(st.st_size for st in stats),
            "source_mtime_ns": max((st.st_mtime_ns for st in stats), default=0)}


def source_sha256(path: str | os.PathLike, info: EngineInfo) -> str:
    """The hash of the DiT file at `path`, without reading 24 GB again when it is the very file the engine was
    exported from (same size and modification time as recorded); any other file is hashed."""
    ident = source_identity(path)
    if info.source_sha256 and all(info.extra.get(k) == ident[k] for k in ("source_size", "source_mtime_ns")):
        return info.source_sha256
    return file_sha256(path)


def save(info: EngineInfo, plan: bytes | memoryview, folder: str | os.PathLike) -> Path:
    """Write `<key>.plan` and `<key>.json` into `folder` (created if missing); the sidecar last, so a half-written
    engine is never listed."""
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    key = info.key()
    plan_path = folder / f"{key}.plan"
    _write(plan_path, plan)
    _write(folder / f"{key}.json", info.to_json().encode())
    return plan_path


def _write(path: Path, data: bytes | memoryview) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def entries(location: str | os.PathLike) -> list[tuple[Path, EngineInfo]]:
    """(plan, info) for an engine file given directly, or for every engine of a folder."""
    loc = Path(location).expanduser()
    if loc.is_file():
        sidecar = loc.with_suffix(".json")
        if not sidecar.is_file():
            raise InputError(f"{loc}: no sidecar {sidecar.name} beside it; engines are built with "
                             "`python -m kontext build-engine`, which writes both")
        return [(loc, EngineInfo.from_json(sidecar.read_text(), sidecar))]
    if not loc.is_dir():
        raise InputError(f"{loc}: no such engine file or folder")
    found = []
    for sidecar in sorted(loc.rglob("*.json")):  # subfolders too, as the loader node lists them
        plan = sidecar.with_suffix(".plan")
        if plan.is_file():
            found.append((plan, EngineInfo.from_json(sidecar.read_text(), sidecar)))
    if not found:
        raise InputError(f"{loc}: holds no engine (a <key>.plan with its <key>.json); build one with "
                         "`python -m kontext build-engine --onnx MODEL.onnx --out {loc}`")
    return found


def mismatches(info: EngineInfo, *, tensorrt_version: str, gpu: str, source_sha256: str | None = None,
               precision: str | None = None) -> list[str]:
    """Why an engine cannot run here (empty: it can). `source_sha256`/`precision` are checked when given."""
    why = []
    if info.tensorrt_version != tensorrt_version:
        why.append(f"built with TensorRT {info.tensorrt_version}, this is {tensorrt_version}")
    if info.gpu != gpu:
        why.append(f"built for {info.gpu}, this GPU is {gpu}")
    if source_sha256 and info.source_sha256 and info.source_sha256 != source_sha256:
        why.append(f"built from another model file (SHA-256 {info.source_sha256[:12]}..., the given file's is "
                   f"{source_sha256[:12]}...): stale")
    if precision and info.precision != precision:
        why.append(f"a {info.precision} engine, {precision} was asked for")
    return why


def select(location: str | os.PathLike, *, tensorrt_version: str, gpu: str,
           source: str | os.PathLike | None = None, precision: str | None = None,
           preferred: str | None = None) -> tuple[Path, EngineInfo]:
    """The engine of `location` that can run here, else an InputError listing each engine and why not. With
    `source`, the DiT file the engine should come from, an engine exported from another file is stale. Among those
    that fit, engines without LoRAs baked in come first, then those of the `preferred` precision (the file's own,
    when none was asked for: bf16, fp8 and fp4 engines exported from one file share its hash)."""
    found = sorted(entries(location), key=lambda e: (bool(e[1].extra.get("loras")), e[1].precision != preferred))
    reasons = []
    hashes: dict[str, str] = {}
    for plan, info in found:
        sha = None
        if source is not None:
            if info.source_sha256 not in hashes:
                hashes[info.source_sha256] = source_sha256(source, info)
            sha = hashes[info.source_sha256]
        why = mismatches(info, tensorrt_version=tensorrt_version, gpu=gpu, source_sha256=sha,
                         precision=precision)
        if not why:
            return plan, info
        reasons.append(f"{plan.name}: {'; '.join(why)}")
    raise InputError(f"no engine in {location} can run here: " + " | ".join(reasons) +
                     ". Rebuild it with `python -m kontext build-engine` on this machine")
