"""Load and save checkpoints in their real on-disk layouts (local directories only).

Our modules have one canonical set of parameter names (`vision.vit.*`, `vision.projector.*`,
`language_model.*`; NVLM-X/H add `vision.cross_projector.*` and `cross_layers.*`). Each layout
declares one table of `KeyRule`s (`LayoutSpec.key_rules`, in its family module) that maps a
canonical name to the name(s) stored on disk; a rule with several stored names concatenates them
along dim 0 (transformers' InternVL splits the fused qkv into q_proj/k_proj/v_proj). Loading is
strict: every canonical parameter must be found with the shape the config implies, and every
stored tensor must be used, otherwise a `CheckpointError` names the file and the key.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nvlm_export.errors import CheckpointError
from nvlm_export.models.config import CONFIG_FILE, ModelConfig
from nvlm_export.models.config_io import convert_layout, read_config, render_config
from nvlm_export.models.model import AnyVisionLanguageModel, build_model
from nvlm_export.models.registry import architecture_of, layout_spec
from nvlm_export.output import apply_umask_permissions

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
)
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


# The canonical tensor whose stored row count reveals the number of padded ViT heads.
QKV_PROBE = "vision.vit.layers.0.attn.qkv.weight"


def stored_names(layout: str, key: str) -> list[str]:
    """The on-disk name(s) of canonical parameter `key` in `layout`."""
    for rule in layout_spec(layout).key_rules:
        names = rule.stored_names(key)
        if names is not None:
            return names
    raise CheckpointError(
        f"No {layout} key mapping for parameter {key!r}",
        why="the layout's key table does not cover this module",
    )


# --- reading ------------------------------------------------------------------------------------


class StoredTensors:
    """The tensors of one checkpoint directory: sharded with an index, or a single file."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.files = self._weight_map()
        self._shapes: dict[str, dict[str, tuple[int, ...]]] = {}

    def _weight_map(self) -> dict[str, str]:
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError) as error:
                raise CheckpointError(f"Cannot read {index}", why=repr(error)) from error
            for shard in sorted(set(weight_map.values())):
                if not (self.directory / shard).is_file():
                    raise CheckpointError(
                        f"Checkpoint shard not found: {self.directory / shard}",
                        why=f"{INDEX_FILE} lists it",
                        fix="Download the missing shard again",
                    )
            return dict(weight_map)
        single = self.directory / SINGLE_FILE
        if single.is_file():
            try:
                with safe_open(str(single), framework="pt") as handle:
                    return dict.fromkeys(handle.keys(), SINGLE_FILE)
            except Exception as error:  # safetensors raises its own error types
                raise CheckpointError(
                    f"Cannot read {single}",
                    why=f"it is not a valid safetensors file ({error})",
                    fix="Download or convert the weights again",
                ) from error
        raise CheckpointError(
            f"No weights found in {self.directory}",
            why=f"neither {INDEX_FILE} nor {SINGLE_FILE} exists",
            fix="Pass a checkpoint directory with safetensors weights",
        )

    @property
    def source(self) -> str:
        """The file that lists the keys (named in missing-key errors)."""
        name = INDEX_FILE if (self.directory / INDEX_FILE).is_file() else SINGLE_FILE
        return str(self.directory / name)

    def path(self, key: str) -> str:
        return str(self.directory / self.files[key])

    @contextlib.contextmanager
    def _open(self, key: str) -> Iterator[Any]:
        """The shard holding `key`, opened for one read. Not kept open: a safetensors handle maps
        its file, and every page read through it would stay resident for as long as it lives."""
        try:
            handle = safe_open(self.path(key), framework="pt")
        except Exception as error:  # safetensors raises its own error types
            raise CheckpointError(f"Cannot open {self.path(key)}", why=str(error)) from error
        with handle:
            yield handle

    def shape(self, key: str) -> tuple[int, ...]:
        file = self.files[key]
        if file not in self._shapes:  # one pass over each file's header
            with self._open(key) as handle:
                names = handle.keys()  # a safe_open handle is not iterable
                self._shapes[file] = {n: tuple(handle.get_slice(n).get_shape()) for n in names}
        return self._shapes[file][key]

    def get(self, key: str) -> torch.Tensor:
        with self._open(key) as handle:
            try:
                return handle.get_tensor(key)
            except Exception as error:
                raise CheckpointError(
                    f"{self.path(key)}: cannot read tensor {key!r}", why=str(error)
                ) from error

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop of a stored tensor; only those bytes are read from the file."""
        with self._open(key) as handle:
            try:
                return handle.get_slice(key)[start:stop]
            except Exception as error:
                raise CheckpointError(
                    f"{self.path(key)}: cannot read rows {start}..{stop} of {key!r}",
                    why=str(error),
                ) from error


def count_dummy_heads(config: ModelConfig, stored: StoredTensors) -> int:
    """Padded ViT heads beyond the configured ones, from the stored qkv rows."""
    names = stored_names(config.layout, QKV_PROBE)
    for name in names:
        if name not in stored.files:
            raise CheckpointError(f"{stored.source}: missing key {name!r}")
    rows = sum(stored.shape(name)[0] for name in names)
    heads, remainder = divmod(rows, 3 * config.vision.head_dim)
    if remainder or heads < config.vision.num_heads:
        raise CheckpointError(
            f"{stored.path(names[0])}: {names[0]!r} has {rows} rows",
            why=f"expected 3 x heads x head_dim {config.vision.head_dim} with at least "
            f"{config.vision.num_heads} heads",
        )
    return heads - config.vision.num_heads


def resolve_image_token_id(directory: Path, config: ModelConfig) -> int:
    """The id of the layout's image placeholder, read from the checkpoint's tokenizer."""
    token = architecture_of(config.layout).prompt_format.placeholder_token
    path = Path(directory) / "tokenizer.json"
    if path.is_file():
        from tokenizers import Tokenizer

        token_id = Tokenizer.from_file(str(path)).token_to_id(token)
        if token_id is None:
            raise CheckpointError(f"{path} has no {token} token", why="image features go there")
        if config.image_token_id is not None and config.image_token_id != token_id:
            raise CheckpointError(
                f"{path} gives {token} id {token_id} but config.json says image_token_id "
                f"{config.image_token_id}",
                fix="Use the tokenizer that belongs to this checkpoint",
            )
        return token_id
    if config.image_token_id is not None:
        return int(config.image_token_id)
    raise CheckpointError(
        f"Tokenizer not found: {path}",
        why=f"the id of the image placeholder {token} comes from the tokenizer",
        fix="Copy the checkpoint's tokenizer files into the directory",
    )


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build modules directly in `dtype` (transformers keeps rotary tables in float32 itself)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def canonical_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by canonical name; tied weights appear once."""
    tensors = dict(model.named_parameters())
    persistent = model.state_dict(keep_vars=True)
    tensors.update({name: b for name, b in model.named_buffers() if name in persistent})
    return tensors


def tied_aliases(model: torch.nn.Module) -> set[str]:
    """State-dict names that alias another parameter (e.g. a tied lm_head)."""
    return set(model.state_dict(keep_vars=True)) - set(canonical_parameters(model))


def open_checkpoint(
    directory: Path | str, image_token_id: int | None = None
) -> tuple[ModelConfig, StoredTensors]:
    """The model a checkpoint directory describes, and its stored tensors (headers only).

    Reads config.json, the safetensors headers and the tokenizer, no weights: the config then
    knows the padded ViT heads and the image token id, and `read_parameter` reads any tensor.
    """
    directory = Path(directory)
    config = read_config(directory)
    stored = StoredTensors(directory)
    if layout_spec(config.layout).stores_dummy_heads:
        config = config.with_dummy_heads(count_dummy_heads(config, stored))
    token_id = (
        image_token_id if image_token_id is not None else resolve_image_token_id(directory, config)
    )
    return replace(config, image_token_id=token_id), stored


def load_checkpoint(
    directory: Path | str,
    dtype: torch.dtype = torch.float32,
    image_token_id: int | None = None,
) -> AnyVisionLanguageModel:
    """Build the model a checkpoint directory describes and fill it strictly from its weights.

    Works for every registered layout; bf16 / fp16 / fp32 on disk are cast to `dtype`.
    """
    config, stored = open_checkpoint(directory, image_token_id)
    with default_dtype(dtype), parameters_on_meta():
        model = build_model(config)
    # Every stored shape checked from the file headers before any weight is read.
    check_stored_tensors(model, stored, config.layout)
    owners = _parameter_owners(model)
    for key, target in canonical_parameters(model).items():
        value = read_parameter(stored, config.layout, key, tuple(target.shape)).to(target.dtype)
        _assign(owners[id(target)], target, value)
    return model


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory, and their random
    initialisation does nothing); buffers stay real, so the tables computed at construction (e.g.
    rotary frequencies, not stored in checkpoints) keep their values. The stored weights are
    then assigned as they are read, so each is held once, in the dtype it runs in (building the
    model for real and copying into it held every weight twice while loading, and its random
    initialisation took longer than reading the weights). accelerate's `init_empty_weights`
    does the same; it is not a dependency."""
    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register  # type: ignore[method-assign]


def _parameter_owners(model: torch.nn.Module) -> dict[int, list[tuple[torch.nn.Module, str]]]:
    """Every (module, attribute) holding each parameter or buffer, by tensor identity: a tied
    weight has several owners, and all of them get the loaded value."""
    owners: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is not None:
                    owners.setdefault(id(tensor), []).append((module, name))
    return owners


def _assign(
    owners: list[tuple[torch.nn.Module, str]], target: torch.Tensor, value: torch.Tensor
) -> None:
    if isinstance(target, torch.nn.Parameter):
        value = torch.nn.Parameter(value, requires_grad=target.requires_grad)
    for module, name in owners:
        table = module._parameters if name in module._parameters else module._buffers
        table[name] = value


def check_stored_tensors(model: torch.nn.Module, stored: StoredTensors, layout: str) -> None:
    """Strictness from the file headers alone: every parameter of `model` is stored with the
    shape its config implies, and every stored tensor belongs to a parameter."""
    used: set[str] = set()
    for key, target in canonical_parameters(model).items():
        names = stored_names(layout, key)
        part_shape = (target.shape[0] // len(names), *target.shape[1:])
        for name in names:
            _check_stored(stored, name, part_shape)
        used.update(names)
    allowed = {n for alias in tied_aliases(model) for n in stored_names(layout, alias)}
    unexpected = sorted(set(stored.files) - used - allowed)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(
            f"{stored.path(unexpected[0])}: unexpected key {unexpected[0]!r}{more}",
            why=f"the {layout} model built from config.json has no such parameter",
            fix="Check that config.json belongs to these weights",
        )


def read_parameter(
    stored: StoredTensors, layout: str, key: str, shape: tuple[int, ...]
) -> torch.Tensor:
    """Canonical parameter `key` with `shape`, read from its stored tensor(s) in the stored dtype
    (fused tensors concatenated on dim 0). Only this tensor is read: the helper for any code
    that streams a checkpoint tensor by tensor."""
    names = stored_names(layout, key)
    part_shape = (shape[0] // len(names), *shape[1:])
    parts = [_read(stored, name, part_shape) for name in names]
    value = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return value.reshape(shape)


def _check_stored(stored: StoredTensors, name: str, shape: tuple[int, ...]) -> None:
    """`name` is stored, with `shape` (read from the file header)."""
    if name not in stored.files:
        raise CheckpointError(
            f"{stored.source}: missing key {name!r}",
            why="the model built from config.json needs it",
            fix="Check that the checkpoint is complete and config.json belongs to it",
        )
    if stored.shape(name) != tuple(shape):
        raise CheckpointError(
            f"{stored.path(name)}: {name!r} has shape {list(stored.shape(name))}",
            why=f"config.json implies {list(shape)}",
            fix="Check that config.json belongs to these weights",
        )


def _read(stored: StoredTensors, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """One stored tensor, after checking (from the file header) that it has `shape`."""
    _check_stored(stored, name, shape)
    return stored.get(name)


# --- writing ------------------------------------------------------------------------------------


def _plan_shards(entries: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in entries:
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def save_checkpoint(
    model: AnyVisionLanguageModel,
    directory: Path | str,
    layout: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer_from: Path | str | None = None,
) -> list[Path]:
    """Write config.json and safetensors weights exactly as `layout` stores them.

    One shard is written as model.safetensors; more as model-0000i-of-0000n.safetensors plus
    model.safetensors.index.json. Shards are converted and written one at a time, so peak memory
    is the model plus one shard. Returns the files written.
    """
    parameters = canonical_parameters(model)
    return save_weights(
        model.config,
        {name: t.shape for name, t in parameters.items()},
        lambda name, shape: parameters[name].detach(),
        directory,
        layout,
        dtype,
        max_shard_bytes,
        tokenizer_from,
    )


def save_weights(
    config: ModelConfig,
    shapes: Mapping[str, torch.Size],
    value_of: Callable[[str, torch.Size], torch.Tensor],
    directory: Path | str,
    layout: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer_from: Path | str | None = None,
) -> list[Path]:
    """`save_checkpoint` for weights that need not exist yet: only one shard is ever held.

    `shapes` lists the canonical parameters in writing order; `value_of(name, shape)` is called
    once per parameter, in that order, so a seeded generator can make the values on the way.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layout = layout or config.layout
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = []
    for name, shape in shapes.items():
        names = stored_names(layout, name)
        sizes += [(stored, math.prod(shape) // len(names) * itemsize) for stored in names]
    shards = _plan_shards(sizes, max_shard_bytes)
    files = _shard_names(len(shards))
    written: list[Path] = []
    payload: dict[str, torch.Tensor] = {}
    for name, part in _stored_parts(layout, shapes, value_of):
        payload[name] = part.to(dtype).contiguous().clone()
        if len(payload) == len(shards[len(written)]):
            file = directory / files[len(written)]
            save_file(payload, str(file), metadata={"format": "pt"})
            apply_umask_permissions(file)  # safetensors creates files as 0600
            written.append(file)
            payload = {}
    if len(shards) > 1:
        weight_map = {n: file for file, names in zip(files, shards, strict=True) for n in names}
        index = {"metadata": {"total_size": sum(s for _, s in sizes)}, "weight_map": weight_map}
        _write_json(directory / INDEX_FILE, index)
        written.append(directory / INDEX_FILE)
    rendered = render_config(convert_layout(config, layout)) | {"torch_dtype": _dtype_name(dtype)}
    _write_json(directory / CONFIG_FILE, rendered)
    written.append(directory / CONFIG_FILE)
    if tokenizer_from is not None:
        written += _copy_tokenizer(Path(tokenizer_from), directory)
    return written


def _stored_parts(
    layout: str,
    shapes: Mapping[str, torch.Size],
    value_of: Callable[[str, torch.Size], torch.Tensor],
) -> Iterator[tuple[str, torch.Tensor]]:
    """(stored name, tensor) pairs in writing order, fused tensors split as stored."""
    for key, shape in shapes.items():
        names = stored_names(layout, key)
        tensor = value_of(key, shape)
        yield from zip(names, tensor.chunk(len(names), dim=0), strict=True)


def _shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _copy_tokenizer(source: Path, directory: Path) -> list[Path]:
    copied = []
    for name in TOKENIZER_FILES:
        path = checkpoint_file(source, name)
        if path is not None and source.resolve() != directory.resolve():
            shutil.copyfile(path, directory / name)
            copied.append(directory / name)
    return copied


def checkpoint_file(directory: Path, name: str) -> Path | None:
    """`directory/name` resolved, or None when there is no such file. A file that resolves outside
    `directory` (a symlink out of the checkpoint) is refused: whatever is copied from a checkpoint
    into a bundle or another checkpoint must come from the checkpoint itself."""
    path = Path(directory) / name
    if not path.is_file():
        return None
    resolved, root = path.resolve(), Path(directory).resolve()
    if not resolved.is_relative_to(root):
        raise CheckpointError(
            f"{path} points outside the checkpoint, to {resolved}",
            why="files copied from a checkpoint must be inside its directory",
            fix=f"Replace the link by a copy of the file, if {resolved} is the one you mean",
        )
    return resolved
