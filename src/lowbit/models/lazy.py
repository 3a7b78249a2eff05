"""A model skeleton on the meta device whose modules are materialised from disk only when their turn comes.

Peak memory while quantizing is one decoder block plus calibration activations plus embeddings: a checkpoint
larger than RAM is processed block by block. GPT-2's Conv1D layers (weights stored [in, out]) become plain
``nn.Linear`` here, the one place weights are read, so nothing downstream needs to know about them.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from lowbit.errors import LowbitError
from lowbit.io.writer import LOWBIT_CONFIG
from lowbit.models.arch import ARCHITECTURES, Arch, arch_for, check_blocks, get_submodule
from lowbit.models.checkpoint import CheckpointReader
from lowbit.models.checkpoint_names import ExpertSlice, Location, checkpoint_locations
from lowbit.models.experts import routed_experts, unfuse_experts

log = logging.getLogger(__name__)


def refuse_remote_code(folder: Path, file: str, model_type: str | None) -> None:
    """lowbit never runs Python shipped in a model folder (transformers' ``trust_remote_code``): a type that only
    that code defines is refused; a type transformers knows is built from transformers' own classes."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise LowbitError(
            f"{folder / file} asks for Python code shipped in the model folder (auto_map) for model type "
            f"{model_type!r}; lowbit never runs code from a model folder: use a transformers release that supports "
            "this model type natively"
        )
    log.warning("%s names code shipped in the model folder (auto_map); lowbit ignores it and builds transformers' "
                "own %r classes", file, model_type)


def load_config(folder: Path) -> PretrainedConfig:
    """config.json through transformers, never running code from the folder."""
    try:
        raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LowbitError(f"cannot read {folder / 'config.json'} ({type(exc).__name__}); re-download the model") from None
    if not isinstance(raw, dict):
        raise LowbitError(f"{folder / 'config.json'} is not a JSON object; re-download the model")
    if "auto_map" in raw:
        refuse_remote_code(folder, "config.json", raw.get("model_type"))
    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (ValueError, OSError, KeyError, TypeError, AttributeError) as exc:
        raise LowbitError(f"cannot read {folder / 'config.json'}: {str(exc)[:200]}") from None


def build_skeleton(config: PretrainedConfig, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The model with parameters on meta (buffers such as rotary tables are real: they are computed, not loaded)."""
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    except (ValueError, TypeError, AttributeError) as exc:
        raise LowbitError(
            f"model type {config.model_type!r} is not a causal LM transformers can build ({str(exc)[:120]}); "
            f"supported model types: {', '.join(sorted(ARCHITECTURES))}"
        ) from None
    return model.eval()


def conv1d_to_linear(root: nn.Module) -> set[str]:
    """Replace every Conv1D under ``root`` by an equivalent nn.Linear (weights transposed; meta stays meta).
    Returns the replaced module paths."""
    replaced = set()
    for name, module in list(root.named_modules()):
        if isinstance(module, Conv1D):
            in_features, out_features = module.weight.shape  # Conv1D stores [in, out]
            linear = nn.Linear(in_features, out_features, bias=module.bias is not None, device="meta")
            if module.weight.device.type != "meta":
                linear.weight = nn.Parameter(module.weight.detach().t().contiguous(), requires_grad=False)
                if module.bias is not None:
                    linear.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
            root.set_submodule(name, linear)
            replaced.add(name)
    return replaced


def narrower_float(wanted: torch.dtype, stored: torch.dtype) -> torch.dtype:
    """The dtype a float tensor stored as ``stored`` is written in when ``wanted`` is asked for: never wider than it
    is stored (widening is exact but only costs bytes); a float16 / bfloat16 pair keeps the stored one."""
    size = torch.finfo(wanted).bits, torch.finfo(stored).bits
    return wanted if size[0] < size[1] else stored


def ties_embeddings(config: PretrainedConfig) -> bool:
    return bool(getattr(config, "tie_word_embeddings", False))


def output_embedding_key(model: PreTrainedModel) -> str:
    """State-dict name of the LM head's weight (shared with the input embedding when tied)."""
    head = model.get_output_embeddings()
    for name, module in model.named_modules():
        if module is head:
            return f"{name}.weight"
    return "lm_head.weight"


class LazyModel:
    """Skeleton + checkpoint reader. ``materialize(prefix)`` loads the tensors under a module; ``release`` frees them."""

    def __init__(self, folder: Path, dtype: torch.dtype = torch.float32) -> None:
        self.folder = folder
        self.dtype = dtype
        self.config = load_config(folder)
        self.model_type: str = self.config.model_type
        self.model = build_skeleton(self.config, dtype)
        unfuse_experts(self.model)
        self.arch: Arch = arch_for(self.model_type, self.model)
        converted = conv1d_to_linear(self.model) if self.arch.conv1d else set()
        is_lowbit = (folder / LOWBIT_CONFIG).exists()
        # HF checkpoints store Conv1D weights [in, out]; lowbit's own output is already in Linear layout
        self.transposed = set() if is_lowbit else converted
        self.reader = CheckpointReader(folder)
        self._prefix = self.model.base_model_prefix + "."
        # names the checkpoint stores differently (mixture-of-experts layers; lowbit's own output uses the model's)
        self.located: dict[str, Location] = {} if is_lowbit else checkpoint_locations(
            self.model_type, self.reader.keys(), dict(routed_experts(self.model)), self._prefix
        )
        self.blocks: nn.ModuleList = get_submodule(self.model, self.arch.blocks, self.model_type)  # type: ignore[assignment]
        if len(self.blocks) == 0:
            raise LowbitError(f"model in {folder} has no decoder blocks at {self.arch.blocks!r}")
        check_blocks(self.arch, self.blocks, self.model_type)
        if not is_lowbit:  # a lowbit output is verified once its runtime modules are in
            self.verify_checkpoint()

    @property
    def tied_embeddings(self) -> bool:
        return ties_embeddings(self.config)

    def _key_or_none(self, name: str) -> Location | None:
        """Where the checkpoint holds model tensor ``name`` (some checkpoints omit the base-model prefix, some name
        or stack experts differently), if anywhere."""
        if name in self.reader:
            return name
        if name.startswith(self._prefix) and name[len(self._prefix) :] in self.reader:
            return name[len(self._prefix) :]
        return self.located.get(name)

    def checkpoint_key(self, name: str) -> Location:
        key = self._key_or_none(name)
        if key is not None:
            return key
        raise LowbitError(
            f"tensor {name!r} is missing from the checkpoint in {self.folder}; it does not match its config.json"
        )

    def verify_checkpoint(self) -> None:
        """Strict loading, checked from the file headers before any work: every tensor of the skeleton is in the
        checkpoint with the shape the config implies, and every checkpoint tensor has a place in the skeleton. A
        missing tensor would otherwise stay at its random initialisation, an extra one would be dropped silently."""
        tied = self.output_embedding_key() if self.tied_embeddings else None
        used: set[str] = set()
        state = self.model.state_dict(keep_vars=True)
        for name, placeholder in state.items():
            if name == tied and self._key_or_none(name) is None:
                continue  # a tied head is the input embedding; checkpoints usually store it once
            location = self.checkpoint_key(name)
            key = location.key if isinstance(location, ExpertSlice) else location
            shape = self.reader.shape(key)
            if isinstance(location, ExpertSlice):
                shape = location.shape(shape)
            if name.rpartition(".")[0] in self.transposed and name.endswith(".weight"):
                shape = shape[::-1]
            if shape != tuple(placeholder.shape):
                raise LowbitError(
                    f"tensor {key!r} has shape {shape} in the checkpoint in {self.folder} but its config.json implies "
                    f"{tuple(placeholder.shape)}; the weights do not belong to this config"
                )
            used.add(key)
        # computed buffers (rotary ``inv_freq``, GPT-2's attention mask) that older checkpoints stored
        computed = {n for n, _ in self.model.named_buffers()} - set(state)
        patterns = getattr(self.model, "_keys_to_ignore_on_load_unexpected", None) or []
        extra = [
            k for k in self.reader.keys()
            if k not in used and not {k, self._prefix + k} & computed and not any(re.search(p, k) for p in patterns)
        ]
        if extra:
            raise LowbitError(
                f"the checkpoint in {self.folder} holds {len(extra)} tensor(s) a {self.model_type!r} model built from its "
                f"config.json has no place for, e.g. {extra[0]!r}; the weights do not belong to this config"
            )

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Model tensors by model name, read from the checkpoint (Conv1D weights transposed to Linear layout)."""
        locations = {name: self.checkpoint_key(name) for name in names}
        keys = {loc.key if isinstance(loc, ExpertSlice) else loc for loc in locations.values()}
        raw = self.reader.get_many(sorted(keys))  # a stacked expert tensor is read once for all its slices
        out = {}
        for name, location in locations.items():
            owner_path, _, attr = name.rpartition(".")
            tensor = location.take(raw[location.key]) if isinstance(location, ExpertSlice) else raw[location]
            out[name] = tensor.t().contiguous() if owner_path in self.transposed and attr == "weight" else tensor
        return out

    def _load(self, names: dict[str, torch.Tensor], device: torch.device | str) -> None:
        """Fill placeholders ``names`` (model name -> meta placeholder) from the checkpoint."""
        for name, tensor in self.read(list(names)).items():
            set_tensor(self.model, name, tensor, names[name], device)

    def _outside_blocks(self, skip_head: bool) -> dict[str, torch.Tensor]:
        blocks = self.arch.blocks + "."
        skip = self.output_embedding_key() if skip_head else None
        return {n: t for n, t in self.model.state_dict(keep_vars=True).items() if not n.startswith(blocks) and n != skip}

    def materialize(self, prefix: str, device: torch.device | str = "cpu") -> None:
        """Load every parameter and persistent buffer under module ``prefix`` ('' = the whole model)."""
        root = self.model.get_submodule(prefix) if prefix else self.model
        head = f"{prefix}." if prefix else ""
        tied = self.output_embedding_key() if self.tied_embeddings else None
        self._load({head + n: t for n, t in root.state_dict(keep_vars=True).items() if head + n != tied}, device)
        if not prefix:
            self.tie_embeddings()

    def materialize_outside_blocks(self, device: torch.device | str = "cpu") -> None:
        """Embeddings, final norm and the rest, except the output head (quantization never needs it)."""
        self._load(self._outside_blocks(skip_head=True), device)

    def tensors_outside_blocks(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        """Embeddings, final norm and an untied head straight from the checkpoint, one at a time (each is freed
        before the next is read: together they are larger than a block), for writing them out: float tensors in
        ``dtype`` or in the checkpoint's own dtype where that is narrower (a bfloat16 embedding written as float32
        would double its bytes and add no information)."""
        for name in self._outside_blocks(skip_head=self.tied_embeddings):
            tensor = self.read([name])[name]
            yield name, tensor.to(narrower_float(dtype, tensor.dtype)) if tensor.is_floating_point() else tensor

    def output_embedding_key(self) -> str:
        return output_embedding_key(self.model)

    def tie_embeddings(self) -> None:
        """The head shares the embedding's weight (a quantized tied head reads the packed table itself)."""
        embedding = self.model.get_input_embeddings()
        if self.tied_embeddings and isinstance(getattr(embedding, "weight", None), torch.Tensor):
            self.model.get_output_embeddings().weight = embedding.weight

    def release(self, prefix: str) -> None:
        """Move a module's tensors back to meta, freeing their memory."""
        self.model.get_submodule(prefix).to("meta")


def set_tensor(model: nn.Module, name: str, tensor: torch.Tensor, placeholder: torch.Tensor, device) -> None:
    """Replace parameter/buffer ``name`` by ``tensor``, checked against the placeholder's shape; floats are cast
    to the placeholder's dtype, integer codes stay as stored."""
    if tensor.shape != placeholder.shape:
        raise LowbitError(
            f"tensor {name!r} has shape {tuple(tensor.shape)} in the checkpoint but the model config implies "
            f"{tuple(placeholder.shape)}; the weights do not belong to this config.json"
        )
    owner_path, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_path) if owner_path else model
    if tensor.is_floating_point() and placeholder.dtype.is_floating_point:
        tensor = tensor.to(placeholder.dtype)
    tensor = tensor.to(device)
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[attr] = tensor
