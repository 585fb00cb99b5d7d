"""Read a Hugging Face / sentence-transformers folder into `(params, spec)` and write a
parameter export (`python -m embedder.convert from-hf SRC DST`)."""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import re
import tempfile

import jax
import numpy as np
from safetensors import safe_open
from tokenizers.implementations import BertWordPieceTokenizer

from embedder.checkpoint import save_params
from embedder.convert.hf_config import config_from_hf
from embedder.convert.hf_mapping import (TensorRule, canonical_name, encoder_rules, find_prefix,
                                         get_path, head_rules, set_path)
from embedder.model.config import ModelConfig
from embedder.model.layer_stack import stack_layers

log = logging.getLogger(__name__)

_ST_TYPES = ("Transformer", "Pooling", "Dense", "Normalize")


@dataclasses.dataclass
class ConvertedModel:
    """A HF folder or GGUF file read into our terms; `tokenizer_file` is an absolute path."""

    params: dict
    config: ModelConfig
    spec: dict
    tokenizer_file: pathlib.Path


def is_hf_folder(path) -> bool:
    """A transformers / sentence-transformers folder: `modules.json`, or a `config.json` with a
    `model_type` (an embedder workdir also has a `config.json`, the train config, without one)."""
    path = pathlib.Path(path)
    if (path / "modules.json").is_file():
        return True
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        return "model_type" in json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def _read_json(path: pathlib.Path, what: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def _safetensors_files(folder: pathlib.Path) -> list[pathlib.Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index, "safetensors index")["weight_map"].values()))
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        legacy = [p.name for p in folder.glob("*.bin")]
        hint = f" (found {legacy}; re-save it with safe_serialization=True)" if legacy else ""
        raise FileNotFoundError(f"no *.safetensors weights in {folder}{hint}")
    return files


def _load_tensors(files, rules: list[TensorRule], prefix: str, dtype, what: str, *,
                  shapes_only: bool = False) -> dict:
    """Streams the tensors named by `rules` out of `files`, one at a time, into a params tree
    (with `shapes_only`, `jax.ShapeDtypeStruct` leaves from the safetensors headers)."""
    wanted = {prefix + r.hf_name: r for r in rules}
    params: dict = {}
    found = set()
    for file in files:
        # "flax" reads bfloat16 too, which numpy cannot represent.
        with safe_open(str(file), framework="flax") as f:
            for name in f.keys():
                rule = wanted.get(canonical_name(name))
                if rule is None:
                    continue
                if shapes_only:
                    hf_shape = jax.ShapeDtypeStruct(tuple(f.get_slice(name).get_shape()), np.dtype(dtype))
                    value = jax.eval_shape(rule.layout.to_ours, hf_shape)
                else:
                    value = np.asarray(f.get_tensor(name), dtype=np.float32)
                    value = rule.layout.to_ours(value).astype(dtype)
                set_path(params, rule.path, value)
                found.add(prefix + rule.hf_name)
    missing = sorted(set(wanted) - found)
    if missing:
        raise ValueError(f"{what} lacks {len(missing)} tensor(s) the config implies, e.g. "
                         f"{missing[:3]}; is config.json from the same checkpoint?")
    return params


def _tensor_names(files) -> list[str]:
    names = []
    for file in files:
        with safe_open(str(file), framework="flax") as f:
            names.extend(canonical_name(n) for n in f.keys())
    return names


def _post_processor_specials(tokenizer_json: pathlib.Path) -> tuple[bool, bool] | None:
    """(adds BOS, adds EOS) from a tokenizer.json's single-sequence template, if it has one."""
    if not tokenizer_json.is_file():
        return None
    post = json.loads(tokenizer_json.read_text(encoding="utf-8")).get("post_processor") or {}
    steps = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for step in steps:
        if step.get("type") == "TemplateProcessing":
            items = step.get("single", [])
            seq = [i for i, item in enumerate(items) if "Sequence" in item]
            if not seq:
                return None
            return seq[0] > 0, seq[0] < len(items) - 1
    return None


def _tokenizer_spec(folder: pathlib.Path, cfg: ModelConfig, max_length: int, scratch) -> tuple[dict, pathlib.Path]:
    tok_cfg_path = folder / "tokenizer_config.json"
    tok_cfg = _read_json(tok_cfg_path, "tokenizer config") if tok_cfg_path.is_file() else {}
    if cfg.family == "bert":
        path = folder / "tokenizer.json"
        if not path.is_file():
            vocab = folder / "vocab.txt"
            if not vocab.is_file():
                raise FileNotFoundError(f"{folder} has neither tokenizer.json nor vocab.txt; a BERT "
                                        "model needs its WordPiece vocabulary")
            tok = BertWordPieceTokenizer(str(vocab), lowercase=tok_cfg.get("do_lower_case", True))
            path = pathlib.Path(scratch()) / "tokenizer.json"
            tok.save(str(path))
        return {"kind": "wordpiece", "file": str(path.resolve()), "max_length": max_length}, path
    specials = _post_processor_specials(folder / "tokenizer.json")
    if specials is None:
        specials = (bool(tok_cfg.get("add_bos_token", True)), bool(tok_cfg.get("add_eos_token", False)))
    path = folder / "tokenizer.model"
    if path.is_file():
        return ({"kind": "sentencepiece", "file": str(path.resolve()), "max_length": max_length,
                 "add_bos": specials[0], "add_eos": specials[1]}, path)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has neither tokenizer.model nor tokenizer.json; copy the tokenizer "
                                "files from the original checkpoint into the folder")
    names = {k: _token_content(tok_cfg.get(k), default)
             for k, default in (("bos_token", "<bos>"), ("eos_token", "<eos>"), ("pad_token", "<pad>"))}
    return ({"kind": "tokenizer_json", "file": str(path.resolve()), "max_length": max_length,
             "add_bos": specials[0], "add_eos": specials[1], **names}, path)


def _token_content(value, default: str) -> str:
    """A tokenizer_config.json special-token entry: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else default


def _prompt_template(prompt: str, side: str) -> str:
    """A sentence-transformers prompt prefix -> our template ending in `{text}`."""
    if side == "query" and re.fullmatch(r"task: .+ \| query: ", prompt):
        return "task: {task} | query: {text}"
    if side == "document" and re.fullmatch(r"title: .+ \| text: ", prompt):
        return "title: {title} | text: {text}"
    return prompt.replace("{", "{{").replace("}", "}}") + "{text}"


def _prompts(folder: pathlib.Path) -> dict | None:
    path = folder / "config_sentence_transformers.json"
    if not path.is_file():
        return None
    prompts = _read_json(path, "sentence-transformers config").get("prompts") or {}
    query = prompts.get("query")
    document = prompts.get("document", prompts.get("passage"))
    if not query and not document:
        return None
    return {"query": _prompt_template(query, "query") if query else None,
            "document": _prompt_template(document, "document") if document else None}


def _st_modules(folder: pathlib.Path) -> list[tuple[str, pathlib.Path]]:
    modules = _read_json(folder / "modules.json", "modules.json")
    out = []
    for m in sorted(modules, key=lambda m: m.get("idx", 0)):
        kind = m["type"].rsplit(".", 1)[-1]
        if kind not in _ST_TYPES:
            raise ValueError(f"sentence-transformers module {m['type']} in {folder} is not supported; "
                             f"supported: {', '.join(_ST_TYPES)}")
        out.append((kind, folder / m.get("path", "")))
    if not out or out[0][0] != "Transformer":
        raise ValueError(f"{folder}/modules.json must start with a Transformer module")
    return out


def _check_pooling(path: pathlib.Path) -> None:
    cfg = _read_json(path / "config.json", "Pooling config")
    if "pooling_mode" in cfg:  # sentence-transformers >= 6: "mean" or a list of modes
        mode = cfg["pooling_mode"]
        on = sorted([mode] if isinstance(mode, str) else mode)
    else:  # older files: one boolean flag per mode
        on = sorted(k[len("pooling_mode_"):] for k, v in cfg.items()
                    if k.startswith("pooling_mode") and v is True)
    if on not in (["mean"], ["mean_tokens"]):
        raise ValueError(f"{path}: pooling {on} is not supported; embedder models use mean pooling")
    if cfg.get("include_prompt", True) is False:
        raise ValueError(f"{path}: include_prompt=false (prompt tokens left out of the mean) is not "
                         "supported; embedder pools over every non-padding token")


def _dense_dims(path: pathlib.Path) -> int:
    cfg = _read_json(path / "config.json", "Dense config")
    act = cfg.get("activation_function", "torch.nn.modules.linear.Identity")
    if cfg.get("bias", True) or not act.endswith("Identity"):
        raise ValueError(f"{path}: Dense with bias={cfg.get('bias', True)} and activation {act!r} is not "
                         "supported; projections are linear and bias-free")
    return int(cfg["out_features"])


def read_hf_folder(src, *, dtype=np.float32, shapes_only: bool = False, **config_overrides) -> ConvertedModel:
    """Reads a transformers folder (Gemma/Gemma2/Gemma3 text/BERT) or a sentence-transformers
    folder (Transformer, Pooling, Dense..., Normalize) into params, config and spec.

    `config_overrides` are ModelConfig fields, e.g. `scan_layers=True` for stacked layers.
    `shapes_only=True` reads no arrays: the params leaves are `jax.ShapeDtypeStruct`s taken
    from the safetensors headers (what a full read would give, missing tensors still raise)."""
    src = pathlib.Path(src).absolute()
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a directory")
    dense_dirs: list[pathlib.Path] = []
    body = src
    max_length = None
    if (src / "modules.json").is_file():
        for kind, path in _st_modules(src):
            if kind == "Transformer":
                body = path
            elif kind == "Pooling":
                _check_pooling(path)
            elif kind == "Dense":
                dense_dirs.append(path)
        st_cfg = body / "sentence_bert_config.json"
        if st_cfg.is_file():
            max_length = _read_json(st_cfg, "sentence_bert_config").get("max_seq_length")
    elif not (src / "config.json").is_file():
        raise ValueError(f"{src} is neither a transformers folder (config.json) nor a "
                         "sentence-transformers folder (modules.json)")
    hf_cfg = _read_json(body / "config.json", "transformers config.json")
    projection_dims = tuple(_dense_dims(p) for p in dense_dirs)
    cfg = config_from_hf(hf_cfg, projection_dims=projection_dims, **config_overrides)
    if max_length is None:
        max_length = cfg.max_position_embeddings if cfg.family == "bert" else 512
    if cfg.family == "bert":
        max_length = min(int(max_length), cfg.max_position_embeddings)

    files = _safetensors_files(body)
    prefix = find_prefix(_tensor_names(files), cfg.family)
    params = _load_tensors(files, encoder_rules(cfg), prefix, dtype, str(body), shapes_only=shapes_only)
    for rule, path in zip(head_rules(cfg), dense_dirs):
        head = _load_tensors(_safetensors_files(path), [rule], "", dtype, str(path), shapes_only=shapes_only)
        set_path(params, rule.path, get_path(head, rule.path))
    if cfg.scan_layers:  # the rules read the unrolled layout; a scanned target stacks it
        params = stack_layers(params, cfg)

    scratch_dirs = []

    def scratch():
        scratch_dirs.append(tempfile.mkdtemp(prefix="embedder_tok_"))
        return scratch_dirs[-1]

    tok_spec, tok_file = _tokenizer_spec(body, cfg, int(max_length), scratch)
    spec = {"model": cfg.to_dict(), "tokenizer": tok_spec, "prompts": _prompts(src)}
    return ConvertedModel(params=params, config=cfg, spec=spec, tokenizer_file=tok_file)


def convert_from_hf(src, dst, *, overwrite: bool = False, scan_layers: bool = False) -> pathlib.Path:
    """Converts `src` and writes a parameter export to `dst`; returns `dst`.

    `scan_layers=True` writes the scanned layout (`encoder/layers`, stacked) and says so in the
    spec, for training with `model.scan_layers`."""
    model = read_hf_folder(src, scan_layers=scan_layers)
    return save_params(dst, model.params, model.spec, tokenizer_file=model.tokenizer_file,
                       overwrite=overwrite)
