"""Load a user's own model from a folder on disk, offline, for ``captum-implicit explain``.

Two layouts are recognised:

* an HF ``transformers`` model folder (``config.json`` with ``model_type``, ``*.safetensors`` or
  ``pytorch_model.bin``, tokenizer files), as ``save_pretrained`` writes it. The head is chosen from
  ``config.architectures``: ``*ForSequenceClassification`` → ``AutoModelForSequenceClassification``,
  anything else → ``AutoModelForCausalLM``;
* a mamba-ssm checkpoint folder (``config.json`` with ``d_model`` / ``n_layer``, ``pytorch_model.bin``),
  as ``MambaLMHeadModel.save_pretrained`` writes it. mamba-ssm needs CUDA. Its checkpoints carry no
  tokenizer: put the tokenizer files in the folder or point ``tokenizer`` at a folder that has them.

Nothing is ever fetched: every ``from_pretrained`` call passes ``local_files_only=True``, and
``pytorch_model.bin`` files are read with ``torch.load(weights_only=True)`` (tensors only, no code).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .core.errors import InputError
from .core.registry import find_adapter

#: tokenizers that leave the length unbounded report this sentinel (or larger) as model_max_length
_UNBOUNDED = 1_000_000


class ModelLoadError(InputError):
    """The folder is not a model captum-implicit can load, or the model has no supported layer."""


@dataclass
class LocalModel:
    """A loaded model with what ``explain`` needs to know about it.

    Attributes
    ----------
    model : nn.Module
        In eval mode on ``device``.
    tokenizer : HF tokenizer
    kind : {"causal_lm", "classifier"}
        ``causal_lm``: logits ``(B, L, V)``; ``classifier``: logits ``(B, K)``.
    source : {"transformers", "mamba-ssm"}
    max_length : int or None
        The most tokens the model accepts (``max_position_embeddings`` or the tokenizer's
        ``model_max_length``), ``None`` when unbounded (recurrent models).
    labels : {int: str}
        Class names of a classifier (``config.id2label``); empty for a causal LM.
    layers : list of (name, class name)
        The modules captum-implicit explains.
    """

    model: nn.Module
    tokenizer: Any
    kind: Literal["causal_lm", "classifier"]
    source: Literal["transformers", "mamba-ssm"]
    max_length: int | None
    labels: dict[int, str] = field(default_factory=dict)
    layers: list[tuple[str, str]] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def embedding(self) -> nn.Module:
        """The token-embedding module (for Captum's layer methods)."""
        if self.source == "mamba-ssm":
            return self.model.backbone.embedding
        return self.model.get_input_embeddings()


def supported_layers(model: nn.Module) -> list[tuple[str, str]]:
    """``(name, class name)`` of every module a registered adapter covers, in ``named_modules`` order."""
    return [(name, type(m).__name__) for name, m in model.named_modules() if find_adapter(m) is not None]


def model_classes(model: nn.Module) -> list[str]:
    """Distinct class names of the model's own modules (torch's containers and layers left out)."""
    seen: dict[str, None] = {}
    for m in model.modules():
        if not type(m).__module__.startswith("torch."):
            seen[type(m).__name__] = None
    return list(seen)


def load_local(
    path: str | Path,
    tokenizer: str | Path | None = None,
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> LocalModel:
    """Load the model in ``path`` (HF folder or mamba-ssm checkpoint) and its tokenizer, offline.

    Parameters
    ----------
    path : folder with ``config.json`` and the weights
    tokenizer : folder with the tokenizer files (default: ``path``)
    device : default ``"cuda"`` for mamba-ssm, ``"cpu"`` otherwise
    dtype : parameter dtype (default float32: checkpoints stored in bf16/fp16 are explained in float32)

    Raises
    ------
    ModelLoadError
        Missing folder or files, an unknown layout, mamba-ssm without CUDA, no supported layer.
    """
    folder = Path(path)
    if not folder.exists():
        raise ModelLoadError(f"model path {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise ModelLoadError(f"model path {str(folder)!r} is a file; give the folder with config.json and the weights")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"{str(folder)!r} has no config.json: expected an HF model folder (save_pretrained) or a mamba-ssm "
            "checkpoint folder (config.json + pytorch_model.bin)"
        )
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {folder / 'config.json'}: {e}") from e
    if "model_type" not in config and {"d_model", "n_layer"} <= config.keys():
        loaded = _load_mamba_ssm(folder, config, device or "cuda", dtype)
    else:
        loaded = _load_transformers(folder, config, device or "cpu", dtype)
    model, kind, max_length, labels = loaded
    model.eval()
    tok = _load_tokenizer(Path(tokenizer) if tokenizer is not None else folder)
    tok_max = getattr(tok, "model_max_length", None)
    if isinstance(tok_max, int) and tok_max < _UNBOUNDED:
        max_length = tok_max if max_length is None else min(max_length, tok_max)
    layers = supported_layers(model)
    if not layers:
        raise ModelLoadError(
            f"{type(model).__name__} has no layer captum-implicit can explain; its module classes are "
            f"{', '.join(model_classes(model))}. See `captum-implicit supported` for the supported classes, or "
            "register your own (docs/recipes.md, 'Registering a custom layer')"
        )
    source = "mamba-ssm" if "model_type" not in config and "d_model" in config else "transformers"
    return LocalModel(model, tok, kind, source, max_length, labels, layers)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No 'Loading weights' bars or info logs while loading (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _load_transformers(folder: Path, raw_config: dict, device: str, dtype: torch.dtype):
    try:
        import transformers as tf
    except ImportError as e:
        raise ModelLoadError("loading an HF model folder needs transformers: pip install 'captum-implicit[hf]'") from e
    archs = list(raw_config.get("architectures") or [])
    classifier = any(a.endswith("ForSequenceClassification") for a in archs)
    # transformers' own classes for a model type it knows; the Auto classes for the rest
    config_class, auto = _transformers_own(tf, raw_config.get("model_type"), classifier) or (
        tf.AutoConfig, tf.AutoModelForSequenceClassification if classifier else tf.AutoModelForCausalLM
    )
    with _quiet_transformers():
        try:
            config = config_class.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadError(f"transformers cannot read the config in {str(folder)!r}: {e}") from e
        if not any(folder.glob("*.safetensors")) and not any(folder.glob("pytorch_model*.bin")):
            raise ModelLoadError(
                f"{str(folder)!r} has a config.json but no weights (*.safetensors or pytorch_model.bin)"
            )
        try:
            model = auto.from_pretrained(folder, config=config, local_files_only=True, dtype=dtype)
        except ValueError as e:  # the config's type has no causal-LM / classifier class
            raise ModelLoadError(
                f"{config.model_type!r} (architectures {archs or 'not given'}) has no {auto.__name__} class; "
                "explain needs a causal LM or a sequence classifier"
            ) from e
        except OSError as e:
            raise ModelLoadError(f"cannot load the weights in {str(folder)!r}: {e}") from e
    model.to(device)
    max_length = getattr(config, "max_position_embeddings", None)
    labels = {int(k): str(v) for k, v in (config.id2label or {}).items()} if classifier else {}
    return model, "classifier" if classifier else "causal_lm", max_length, labels


def _transformers_own(tf, model_type: str | None, classifier: bool) -> tuple[type, type] | None:
    """transformers' own ``(config class, model class)`` for ``model_type``; ``None`` for a type it does not know
    (the Auto classes then decide).

    Packages can register their models under transformers' model types: importing flash-linear-attention
    (``import fla``) points ``AutoConfig`` and ``AutoModelForCausalLM`` for ``"mamba"`` and ``"mamba2"`` at fla's own
    Triton models, process-wide. A checkpoint saved by transformers then still loads into transformers' classes."""
    from transformers.models.auto import configuration_auto, modeling_auto

    models = (modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES if classifier
              else modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    names = (configuration_auto.CONFIG_MAPPING_NAMES.get(model_type), models.get(model_type))
    classes = tuple(getattr(tf, name, None) if isinstance(name, str) else None for name in names)
    return classes if all(c is not None for c in classes) else None


def _load_mamba_ssm(folder: Path, config: dict, device: str, dtype: torch.dtype):
    try:
        from mamba_ssm.models.config_mamba import MambaConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    except ImportError as e:
        raise ModelLoadError(
            f"{str(folder)!r} is a mamba-ssm checkpoint, but mamba-ssm is not importable ({e}). mamba-ssm runs on "
            "CUDA GPUs only: install it on a GPU machine with pip install 'captum-implicit[mamba]'"
        ) from e
    if not torch.cuda.is_available() or not str(device).startswith("cuda"):
        raise ModelLoadError(
            f"{str(folder)!r} is a mamba-ssm checkpoint; mamba-ssm's kernels need a CUDA GPU "
            f"({'none is available' if not torch.cuda.is_available() else f'device {device!r} was asked for'})"
        )
    weights = folder / "pytorch_model.bin"
    if not weights.is_file():
        raise ModelLoadError(f"{str(folder)!r} has a mamba-ssm config.json but no pytorch_model.bin")
    known = set(MambaConfig.__dataclass_fields__)
    model = MambaLMHeadModel(MambaConfig(**{k: v for k, v in config.items() if k in known}), device=device, dtype=dtype)
    state = torch.load(weights, map_location=device, weights_only=True)
    model.load_state_dict(state)
    return model, "causal_lm", None, {}


def _load_tokenizer(folder: Path):
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise ModelLoadError("reading the tokenizer needs transformers: pip install 'captum-implicit[hf]'") from e
    if not folder.is_dir():
        raise ModelLoadError(f"tokenizer path {str(folder)!r} is not a folder")
    with _quiet_transformers():
        try:
            return AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise ModelLoadError(
                f"no tokenizer could be loaded from {str(folder)!r} ({type(e).__name__}: {e}). Put the tokenizer "
                "files (tokenizer.json / tokenizer_config.json, as tokenizer.save_pretrained writes them) in the "
                "folder or pass --tokenizer DIR (mamba-ssm checkpoints ship without one: state-spaces models use "
                "EleutherAI/gpt-neox-20b's)"
            ) from e
