"""Hugging Face `DabDetrForObjectDetection` weights: import, export, hub download.

The conversion is a declarative table of key renames (regex -> replacement) plus one merge:
transformers splits the encoder's packed q/k/v projection into q_proj/k_proj/v_proj.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from torch import Tensor

from dabdetr.config import BACKBONES, DabDetrConfig
from dabdetr.errors import BadWeightsError
from dabdetr.io_utils import atomic_write
from dabdetr.weights.native import load_safetensors

# Declarative key table: (transformers template, our template). `{n}` is a layer index and
# `{rest}` the remaining dotted path; the same table converts in both directions.
_ENC = "transformer.encoder.layers.{n}."
_DEC = "transformer.decoder.layers.{n}."
KEY_TABLE: list[tuple[str, str]] = [
    ("model.backbone.conv_encoder.model._backbone.{rest}", "backbone.body.{rest}"),
    # files written without the TimmBackbone wrapper (plain timm model); import only
    ("model.backbone.conv_encoder.model.{rest}", "backbone.body.{rest}"),
    ("model.query_refpoint_embeddings.weight", "refpoint_embed.weight"),
    ("model.input_projection.{rest}", "input_proj.{rest}"),
    ("model.patterns.weight", "transformer.patterns.weight"),
    ("model.encoder.query_scale.{rest}", "transformer.encoder.query_scale.{rest}"),
    ("model.encoder.norm.{rest}", "transformer.encoder.norm.{rest}"),
    ("model.encoder.layers.{n}.self_attn.out_proj.{rest}", _ENC + "self_attn.out_proj.{rest}"),
    ("model.encoder.layers.{n}.self_attn_layer_norm.{rest}", _ENC + "norm1.{rest}"),
    ("model.encoder.layers.{n}.final_layer_norm.{rest}", _ENC + "norm2.{rest}"),
    ("model.encoder.layers.{n}.fc1.{rest}", _ENC + "linear1.{rest}"),
    ("model.encoder.layers.{n}.fc2.{rest}", _ENC + "linear2.{rest}"),
    ("model.encoder.layers.{n}.activation_fn.{rest}", _ENC + "activation.{rest}"),
    ("model.decoder.layers.{n}.self_attn.self_attn_query_content_proj.{rest}",
     _DEC + "sa_qcontent_proj.{rest}"),
    ("model.decoder.layers.{n}.self_attn.self_attn_query_pos_proj.{rest}",
     _DEC + "sa_qpos_proj.{rest}"),
    ("model.decoder.layers.{n}.self_attn.self_attn_key_content_proj.{rest}",
     _DEC + "sa_kcontent_proj.{rest}"),
    ("model.decoder.layers.{n}.self_attn.self_attn_key_pos_proj.{rest}",
     _DEC + "sa_kpos_proj.{rest}"),
    ("model.decoder.layers.{n}.self_attn.self_attn_value_proj.{rest}", _DEC + "sa_v_proj.{rest}"),
    ("model.decoder.layers.{n}.self_attn.self_attn.output_proj.{rest}",
     _DEC + "self_attn.out_proj.{rest}"),
    ("model.decoder.layers.{n}.self_attn.self_attn_layer_norm.{rest}", _DEC + "norm1.{rest}"),
    ("model.decoder.layers.{n}.cross_attn.cross_attn_query_content_proj.{rest}",
     _DEC + "ca_qcontent_proj.{rest}"),
    ("model.decoder.layers.{n}.cross_attn.cross_attn_query_pos_proj.{rest}",
     _DEC + "ca_qpos_proj.{rest}"),
    ("model.decoder.layers.{n}.cross_attn.cross_attn_key_content_proj.{rest}",
     _DEC + "ca_kcontent_proj.{rest}"),
    ("model.decoder.layers.{n}.cross_attn.cross_attn_key_pos_proj.{rest}",
     _DEC + "ca_kpos_proj.{rest}"),
    ("model.decoder.layers.{n}.cross_attn.cross_attn_value_proj.{rest}", _DEC + "ca_v_proj.{rest}"),
    ("model.decoder.layers.{n}.cross_attn.cross_attn_query_pos_sine_proj.{rest}",
     _DEC + "ca_qpos_sine_proj.{rest}"),
    ("model.decoder.layers.{n}.cross_attn.cross_attn.output_proj.{rest}",
     _DEC + "cross_attn.out_proj.{rest}"),
    ("model.decoder.layers.{n}.cross_attn.cross_attn_layer_norm.{rest}", _DEC + "norm2.{rest}"),
    ("model.decoder.layers.{n}.mlp.fc1.{rest}", _DEC + "linear1.{rest}"),
    ("model.decoder.layers.{n}.mlp.fc2.{rest}", _DEC + "linear2.{rest}"),
    ("model.decoder.layers.{n}.mlp.final_layer_norm.{rest}", _DEC + "norm3.{rest}"),
    ("model.decoder.layers.{n}.mlp.activation_fn.{rest}", _DEC + "activation.{rest}"),
    ("model.decoder.layernorm.{rest}", "transformer.decoder.norm.{rest}"),
    ("model.decoder.query_scale.{rest}", "transformer.decoder.query_scale.{rest}"),
    ("model.decoder.ref_point_head.{rest}", "transformer.decoder.ref_point_head.{rest}"),
    ("model.decoder.ref_anchor_head.{rest}", "transformer.decoder.ref_anchor_head.{rest}"),
    ("class_embed.{rest}", "class_embed.{rest}"),
    ("bbox_predictor.{rest}", "bbox_embed.{rest}"),
]
# transformers ties model.decoder.bbox_embed to bbox_predictor: one head, stored twice. It also
# splits the encoder's packed q/k/v projection (upstream's in_proj) into three Linear layers.
_HF_DECODER_BOX_HEAD = re.compile(r"^model\.decoder\.bbox_embed\.(.+)$")
_HF_ENCODER_QKV = re.compile(r"^model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")
_OUR_ENCODER_QKV = re.compile(r"^transformer\.encoder\.layers\.(\d+)\.self_attn\.in_proj_(weight|bias)$")


def _compile(template: str) -> re.Pattern:
    pattern = re.escape(template)
    pattern = pattern.replace(r"\{n\}", r"(?P<n>\d+)").replace(r"\{rest\}", r"(?P<rest>.+)")
    return re.compile("^" + pattern + "$")


_FORWARD = [(_compile(src), dst) for src, dst in KEY_TABLE]
_BACKWARD = [(_compile(dst), src) for src, dst in KEY_TABLE]


def _rename(key: str, table: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, target in table:
        if m := pattern.match(key):
            return target.format(**m.groupdict())
    return None


def hf_to_ours(hf_state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Rename a transformers state dict to ours. Returns (state dict, keys not understood)."""
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    unknown: list[str] = []
    tied: dict[str, Tensor] = {}
    for key, value in hf_state.items():
        if key.endswith("num_batches_tracked"):
            continue
        if m := _HF_ENCODER_QKV.match(key):
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
            continue
        if m := _HF_DECODER_BOX_HEAD.match(key):
            tied["bbox_embed." + m.group(1)] = value
            continue
        new = _rename(key, _FORWARD)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            unknown.extend(f"model.encoder.layers.{layer}.self_attn.{p}_proj.{kind}" for p in parts)
            continue
        packed = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
        out[f"transformer.encoder.layers.{layer}.self_attn.in_proj_{kind}"] = packed
    for key, value in tied.items():
        if key not in out:  # only the decoder copy was saved (tied weights deduplicated)
            out[key] = value
        elif not torch.equal(out[key], value):
            raise ValueError(f"model.decoder.{key} differs from bbox_predictor: not tied as expected")
    return out, unknown


def ours_to_hf(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of hf_to_ours (contiguous copies: safetensors refuses shared tensors)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if m := _OUR_ENCODER_QKV.match(key):
            layer, kind = m.groups()
            for name, part in zip("qkv", value.chunk(3, dim=0), strict=True):
                out[f"model.encoder.layers.{layer}.self_attn.{name}_proj.{kind}"] = part.clone()
            continue
        new = _rename(key, _BACKWARD)
        if new is None:
            raise ValueError(f"no Hugging Face name for our key {key!r}")
        out[new] = value.contiguous().clone()
        if key.startswith("bbox_embed."):
            out["model.decoder." + key] = value.contiguous().clone()
    return out


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> DabDetrConfig:
    """Map a transformers DabDetrConfig (config.json as a dict) to ours."""
    if hf.get("model_type") != "dab-detr":
        raise ValueError(f"config.json has model_type {hf.get('model_type')!r}, expected 'dab-detr'")
    backbone_cfg = hf.get("backbone_config") or {}
    backbone = backbone_cfg.get("backbone") or hf.get("backbone") or "resnet50"
    if backbone not in BACKBONES:
        raise ValueError(f"unsupported Hugging Face backbone {backbone!r}; only torchvision-compatible "
                         "ResNets (resnet18/34/50/101) can be loaded")
    if hf.get("encoder_ffn_dim", 2048) != hf.get("decoder_ffn_dim", 2048):
        raise ValueError("encoder_ffn_dim and decoder_ffn_dim differ; dabdetr uses one FFN width")
    if hf.get("encoder_attention_heads", 8) != hf.get("decoder_attention_heads", 8):
        raise ValueError("encoder and decoder head counts differ; dabdetr uses one head count")
    scale = hf.get("sine_position_embedding_scale")
    if scale is not None and not math.isclose(scale, 2 * math.pi):
        raise ValueError(f"sine_position_embedding_scale={scale} is not supported (only 2*pi)")
    id2label = {int(k): v for k, v in (hf.get("id2label") or {}).items()}
    num_classes = len(id2label) if id2label else int(hf.get("num_labels", 91))
    values = dict(
        backbone=backbone,
        dilation=bool(hf.get("dilation", False)),
        hidden_dim=int(hf.get("hidden_size", hf.get("d_model", 256))),
        nheads=int(hf.get("encoder_attention_heads", 8)),
        enc_layers=int(hf.get("encoder_layers", 6)),
        dec_layers=int(hf.get("decoder_layers", 6)),
        dim_feedforward=int(hf.get("encoder_ffn_dim", 2048)),
        dropout=float(hf.get("dropout", 0.0)),
        activation=hf.get("activation_function", "prelu"),
        pre_norm=bool(hf.get("normalize_before", False)),
        pe_temperature_h=float(hf.get("temperature_height", 20)),
        pe_temperature_w=float(hf.get("temperature_width", 20)),
        num_queries=int(hf.get("num_queries", 300)),
        num_patterns=int(hf.get("num_patterns", 0)),
        random_refpoints_xy=bool(hf.get("random_refpoints_xy", False)),
        keep_query_pos=bool(hf.get("keep_query_pos", False)),
        inverse_sigmoid_eps=1e-5,  # transformers' inverse_sigmoid
        aux_loss=True,
        num_classes=num_classes,
        id2label={k: v for k, v in id2label.items() if not re.fullmatch(r"LABEL_\d+", v)},
    )
    values.update(overrides)
    return DabDetrConfig(**values)


def config_to_hf(config: DabDetrConfig) -> dict[str, Any]:
    """A transformers config.json for our config; ValueError for what transformers lacks."""
    unsupported = []
    if config.query_type != "dab":
        unsupported.append(f"query_type={config.query_type!r}")
    if config.backbone_return_layer != "layer4":
        unsupported.append(f"backbone_return_layer={config.backbone_return_layer!r}")
    if config.backbone_norm != "frozen":
        unsupported.append("backbone_norm='batch' (transformers freezes batch norm)")
    if config.position_embedding != "sine":
        unsupported.append("position_embedding='learned'")
    if config.query_scale_type != "cond_elewise":
        unsupported.append(f"query_scale_type={config.query_scale_type!r}")
    if not config.modulate_hw_attn:
        unsupported.append("modulate_hw_attn=False")
    if config.bbox_embed_diff_each_layer:
        unsupported.append("bbox_embed_diff_each_layer=True")
    if not config.iter_update:
        unsupported.append("iter_update=False")
    if config.query_pe_temperature != 10000:
        unsupported.append(f"query_pe_temperature={config.query_pe_temperature}")
    if config.two_stage:
        unsupported.append("two_stage=True")
    if unsupported:
        raise ValueError("transformers' DabDetr cannot express: " + ", ".join(unsupported))
    if config.inverse_sigmoid_eps != 1e-5:
        warnings.warn(
            f"transformers' DabDetr uses inverse_sigmoid eps 1e-5; this model uses "
            f"{config.inverse_sigmoid_eps}. Boxes may differ slightly for anchors near 0 or 1.",
            stacklevel=2,
        )
    backbone_config: dict[str, Any] = {
        "model_type": "timm_backbone", "backbone": config.backbone, "num_channels": 3,
        "features_only": True, "use_pretrained_backbone": False, "out_indices": [1, 2, 3, 4],
        "freeze_batch_norm_2d": False,
    }
    if config.dilation:
        backbone_config["output_stride"] = 16
    id2label = {str(i): config.label_name(i) for i in range(config.num_classes)}
    return {
        "model_type": "dab-detr",
        "architectures": ["DabDetrForObjectDetection"],
        "backbone_config": backbone_config,
        "num_queries": config.num_queries,
        "encoder_layers": config.enc_layers,
        "decoder_layers": config.dec_layers,
        "encoder_ffn_dim": config.dim_feedforward,
        "decoder_ffn_dim": config.dim_feedforward,
        "encoder_attention_heads": config.nheads,
        "decoder_attention_heads": config.nheads,
        "activation_function": config.activation,
        "hidden_size": config.hidden_dim,
        "dropout": config.dropout,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "auxiliary_loss": config.aux_loss,
        "dilation": config.dilation,
        # transformers declares these as int; ours are float to allow any temperature
        "temperature_height": _int_if_whole(config.pe_temperature_h),
        "temperature_width": _int_if_whole(config.pe_temperature_w),
        "query_dim": 4,
        "random_refpoints_xy": config.random_refpoints_xy,
        "keep_query_pos": config.keep_query_pos,
        "num_patterns": config.num_patterns,
        "normalize_before": config.pre_norm,
        "is_encoder_decoder": True,
        "id2label": id2label,
        "label2id": {v: int(k) for k, v in id2label.items()},
    }


def _int_if_whole(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def read_hf_directory(path: Path, **overrides: Any) -> tuple[DabDetrConfig, dict[str, Tensor]]:
    """config.json + model.safetensors (or sharded *.safetensors) from a local directory; the
    eval resize from preprocessor_config.json when there is one."""
    config_file = path / "config.json"
    try:
        hf_config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadWeightsError(f"cannot read {config_file}: {err}") from None
    if not isinstance(hf_config, dict):
        raise BadWeightsError(f"{config_file} is not a JSON object: not a model config")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise BadWeightsError(
            f"{path} has a config.json but no *.safetensors weights (pytorch_model.bin is not "
            "loaded: it is a pickle; convert it to safetensors with transformers first)"
        )
    hf_state: dict[str, Tensor] = {}
    for file in files:
        hf_state.update(load_safetensors(file))
    state, unknown = hf_to_ours(hf_state)
    if unknown:
        raise BadWeightsError(f"{path}: keys not understood as DAB-DETR weights: {unknown[:20]}"
                              + (f" (and {len(unknown) - 20} more)" if len(unknown) > 20 else ""))
    overrides = {**read_eval_resize(path), **overrides}
    try:
        return config_from_hf(hf_config, **overrides), state
    except ValueError as err:
        raise BadWeightsError(f"{config_file}: {err}") from None
    except (TypeError, AttributeError, KeyError) as err:
        raise BadWeightsError(f"{config_file} holds a value of the wrong type ({err}); fix or "
                              "download it again") from None


PREPROCESSOR_FILE = "preprocessor_config.json"


def read_eval_resize(path: Path) -> dict[str, int | None]:
    """{"eval_size", "eval_max_size"} from a preprocessor_config.json's size, or {} if there
    is none or it does not state a shortest/longest edge."""
    try:
        size = json.loads((path / PREPROCESSOR_FILE).read_text()).get("size")
        short, long = size.get("shortest_edge"), size.get("longest_edge")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return {}
    if not (isinstance(short, int) and short > 0 and (long is None or isinstance(long, int))):
        return {}
    return {"eval_size": short, "eval_max_size": long}


def preprocessor_config(config: DabDetrConfig) -> dict[str, Any]:
    """transformers' image processor settings for the model's eval resize (COCO detection)."""
    size = {"shortest_edge": config.eval_size}
    if config.eval_max_size is not None:
        size["longest_edge"] = config.eval_max_size
    return {"image_processor_type": "DetrImageProcessor", "format": "coco_detection",
            "do_resize": True, "size": size, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": [0.485, 0.456, 0.406],
            "image_std": [0.229, 0.224, 0.225], "do_pad": True}


def write_hf_directory(config: DabDetrConfig, state: dict[str, Tensor], path: Path) -> None:
    """Write a directory that transformers' DabDetrForObjectDetection.from_pretrained loads
    (config.json, model.safetensors, preprocessor_config.json), each file atomically."""
    hf_config = config_to_hf(config)
    atomic_write(path / "model.safetensors", save(ours_to_hf(state), metadata={"format": "pt"}))
    atomic_write(path / "config.json", json.dumps(hf_config, indent=2, sort_keys=True))
    atomic_write(path / PREPROCESSOR_FILE, json.dumps(preprocessor_config(config), indent=2))


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def download_from_hub(repo_id: str) -> Path:
    """Download config.json + safetensors of a hub model id; a clear error when offline."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["config.json", "*.safetensors",
                                                              PREPROCESSOR_FILE]))
    except Exception as err:  # offline, unknown repo, no access: all end the same way for a user
        raise BadWeightsError(
            f"could not get {repo_id!r} from the Hugging Face hub ({type(err).__name__}: {err}). "
            "If you are offline, download the model elsewhere (config.json and model.safetensors) "
            "and pass the local directory instead, e.g. load_model('/path/to/dab-detr-resnet-50')"
        ) from None
