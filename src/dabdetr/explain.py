"""What the decoder's queries look at: cross-attention split into positional and content parts.

In every decoder layer each cross-attention head concatenates a content half and a positional
half, for the query ([content | positional query]) and for the key ([image feature | image
position embedding]); see `dabdetr.models.transformer.Decoder`. Its logits are therefore a
content term plus a positional term, q.k * s = q_c.k_c * s + q_p.k_p * s, with the model's
scale s = 1/sqrt(head width of q). `attention_maps` recomputes both terms from the q and k the
layer receives (a forward hook) and softmaxes each over the feature cells, beside the model's
own (full) attention. The positional map is what the paper draws: for a "dab" model, a window
around the anchor's centre shaped by its width and height.

`dabdetr explain IMAGE --weights W` draws, for the best-scoring queries, the positional map and
the query's anchor at each decoder layer (rows: queries; columns: the final detection, then the
layers).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from dabdetr.models.outputs import DetectionOutput


@dataclass
class LayerAttention:
    """The cross-attention of one decoder layer.

    positional, content, full: [B, Q, heads, h, w] float, softmax over the feature cells of
        the positional term, of the content term, and of their sum (the model's attention).
        Each sums to 1 over an image's valid cells and is 0 on padded cells. In layer 0 (every
        layer with keep_query_pos) the content half also carries the positional queries the
        model adds there, so the content map is not purely content there.
    anchors: [B, Q, 4] float normalized (cx, cy, w, h) relative to the unpadded image: the
        anchors this layer's positional queries were made from ("anchor2d": w = h = 0.5, the
        point's neutral size); None for a "detr" model, which has no anchors.
    """

    positional: Tensor
    content: Tensor
    full: Tensor
    anchors: Tensor | None


@dataclass
class AttentionMaps:
    """What `attention_maps` returns.

    outputs: the model's predictions for the batch.
    layers: one LayerAttention per decoder layer, layer 0 first.
    valid: [B, h, w] bool, True on the feature cells of each image (False on padding).
    """

    outputs: DetectionOutput
    layers: list[LayerAttention]
    valid: Tensor


def _unwrapped(model):
    """The DabDetr inside `dabdetr.optimize` wrappers: hooks do not fire in a CUDA graph
    replay, so the maps come from the wrapped model's eager forward."""
    from dabdetr.config import DabDetrConfig
    from dabdetr.optimize import InferenceWrapper

    while isinstance(model, InferenceWrapper):
        model = model.model
    if not isinstance(model.config, DabDetrConfig):
        raise ValueError("query attention maps are drawn for DAB-DETR's dense cross-attention; "
                         "DAB-Deformable-DETR samples a few points per query instead: run "
                         "without --explain")
    return model


def _split_softmax(q: Tensor, k: Tensor, mask: Tensor | None, layer_maps: dict) -> None:
    """q: [B, nh, Q, e], k: [B, nh, S, e] with e = 2 * head width ([content | positional]);
    mask: [B, 1, 1, S] bool (True = attend). Stores [B, Q, nh, S] softmaxes in layer_maps."""
    half = q.shape[-1] // 2
    scale = q.shape[-1] ** -0.5  # the model's: one scale for the concatenated head
    terms = {
        "content": (q[..., :half] @ k[..., :half].transpose(-2, -1)) * scale,
        "positional": (q[..., half:] @ k[..., half:].transpose(-2, -1)) * scale,
        "full": (q @ k.transpose(-2, -1)) * scale,
    }
    for name, logits in terms.items():
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        layer_maps[name] = logits.float().softmax(-1).transpose(1, 2)  # (B, Q, nh, S)


@torch.no_grad()
def attention_maps(model, images: Tensor, mask: Tensor | None = None) -> AttentionMaps:
    """Every decoder layer's positional, content and full cross-attention maps, and anchors.

    Args:
        model: a DabDetr in eval mode (or one wrapped by `dabdetr.optimize`).
        images: [B, 3, H, W] float, ImageNet-normalized, zero-padded bottom/right.
        mask: [B, H, W] bool, True on padding; None for no padding.
    Returns:
        AttentionMaps: the model's outputs, one LayerAttention per decoder layer with maps
        [B, Q, heads, h, w] (Q = num_queries * max(1, num_patterns), h x w the feature map)
        and anchors [B, Q, 4], and the valid feature cells [B, h, w].
    """
    model = _unwrapped(model)
    if model.training:
        raise ValueError("attention_maps needs the model in eval mode (call model.eval()): in "
                         "training, dropout and denoising queries change the attention")
    decoder = model.transformer.decoder
    per_layer: list[dict] = [{} for _ in decoder.layers]
    captured: dict = {}

    def on_cross_attention(index: int):
        def hook(module, args, output):
            q, k, _, attn_mask = args
            _split_softmax(q, k, attn_mask, per_layer[index])
        return hook

    def on_backbone(module, args, output):
        captured["valid"] = ~output[1]  # (B, h, w)

    def on_decoder(module, args, output):
        captured["references"] = output[1]  # (L or 1, B, Q, 4) or None

    hooks = [layer.cross_attn.register_forward_hook(on_cross_attention(i))
             for i, layer in enumerate(decoder.layers)]
    hooks += [model.backbone.register_forward_hook(on_backbone),
              decoder.register_forward_hook(on_decoder)]
    try:
        outputs = model(images, mask)
    finally:
        for hook in hooks:
            hook.remove()
    valid = captured["valid"]
    height, width = valid.shape[-2:]
    references = captured["references"]
    layers = []
    for index, maps in enumerate(per_layer):
        shaped = {name: m.reshape(*m.shape[:3], height, width) for name, m in maps.items()}
        anchors = None
        if references is not None:  # static anchors: one set for every layer
            anchors = references[min(index, references.shape[0] - 1)].float()
        layers.append(LayerAttention(anchors=anchors, **shaped))
    return AttentionMaps(outputs, layers, valid)


def peak_offsets(maps: AttentionMaps, layer: int, references: Tensor | None = None,
                 head: int | None = None) -> Tensor:
    """How far each query's positional attention peaks from its reference point, in cells.

    The peak is the feature cell with the largest positional attention, averaged over the
    heads (or of head `head` alone: the learned projections let each head look at its own
    region, e.g. one side of the box, as Conditional DETR describes); the reference is the
    cell holding the point (cx, cy) of `references` ([B, Q, >=2]
    normalized to the unpadded image; default: the anchors of that layer, which a "detr"
    model lacks: pass its predicted boxes, `maps.outputs.pred_boxes`, instead). Returns
    [B, Q] long: the Chebyshev distance between the two cells (0: the peak is in the
    reference's cell; 1: in one of the 8 around it).
    """
    chosen = maps.layers[layer]
    if references is None:
        if chosen.anchors is None:
            raise ValueError("a 'detr' model has no anchors: pass references, e.g. the "
                             "predicted boxes (maps.outputs.pred_boxes)")
        references = chosen.anchors
    positional = chosen.positional.float()  # (B, Q, heads, h, w)
    positional = positional.mean(2) if head is None else positional[:, :, head]
    width = positional.shape[-1]
    peak = positional.flatten(2).argmax(-1)  # (B, Q)
    peak_y, peak_x = peak // width, peak % width
    rows = maps.valid.any(2).sum(1, keepdim=True)  # (B, 1): valid cells per image
    cols = maps.valid.any(1).sum(1, keepdim=True)
    refs = references[..., :2].float().to(positional.device)
    ref_x = torch.minimum((refs[..., 0] * cols).floor().long().clamp(min=0), cols - 1)
    ref_y = torch.minimum((refs[..., 1] * rows).floor().long().clamp(min=0), rows - 1)
    return torch.maximum((peak_x - ref_x).abs(), (peak_y - ref_y).abs())


def top_queries(outputs: DetectionOutput, count: int, image: int = 0) -> tuple[Tensor, Tensor,
                                                                              Tensor]:
    """The `count` queries of image `image` with the highest class probability: (indices [N],
    scores [N], labels [N]), best first."""
    probs = outputs.pred_logits[image].sigmoid()  # (Q, C)
    scores, labels = probs.max(-1)
    best = scores.topk(min(count, scores.numel())).indices
    return best, scores[best], labels[best]


def _anchor_xyxy(anchor: Tensor, point: bool, width: int, height: int) -> Tensor:
    """A normalized cxcywh anchor as absolute xyxy in a width x height image; a point
    ("anchor2d") as a small square marker around it."""
    cx, cy, w, h = anchor.tolist()
    if point:
        side = max(3.0, 0.03 * min(width, height))
        return torch.tensor([cx * width - side, cy * height - side, cx * width + side,
                             cy * height + side])
    return torch.tensor([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width,
                         (cy + h / 2) * height])


def explain_image(model, predictor, image: Image.Image, queries: int = 4,
                  layer: int | None = None) -> Image.Image:
    """The explanation picture of one image.

    Rows: the `queries` best-scoring queries. Columns: the query's final box and class, then
    for each decoder layer (or only `layer`) its positional attention map (averaged over the
    heads, upsampled over the image) with the anchor that layer embedded ("dab": the box;
    "anchor2d": a marker at the point; "detr": none).

    model: a DabDetr in eval mode (or wrapped); predictor: a `dabdetr.inference.Predictor`
    (its transform and device are used); image: PIL RGB.
    """
    from dabdetr.data.batching import batch_images
    from dabdetr.visualize import draw_attention, draw_detections, image_grid

    num_layers = len(_unwrapped(model).transformer.decoder.layers)
    if layer is not None and not -num_layers <= layer < num_layers:
        raise ValueError(f"layer {layer} is out of range: the model has {num_layers} decoder "
                         f"layers (0..{num_layers - 1}, or negative from the end)")
    if queries <= 0:
        raise ValueError(f"the number of queries to draw must be positive, got {queries}")
    tensor = predictor.transform(image).to(predictor.device)
    result = attention_maps(model, *batch_images([tensor]))
    chosen = range(num_layers) if layer is None else [layer % num_layers]
    config = _unwrapped(model).config
    width, height = image.size
    best, scores, labels = top_queries(result.outputs, queries)
    tiles = []
    for query, score, label in zip(best.tolist(), scores.tolist(), labels.tolist(), strict=True):
        box = _anchor_xyxy(result.outputs.pred_boxes[0, query].float().cpu(), False, width, height)
        tiles.append(draw_detections(image, box[None], [label],
                                     [f"q{query} {config.label_name(label)}"],
                                     torch.tensor([score])))
        for index in chosen:
            maps = result.layers[index]
            anchor = None
            if maps.anchors is not None:
                anchor = _anchor_xyxy(maps.anchors[0, query].cpu(),
                                      config.query_type == "anchor2d", width, height)
            tiles.append(draw_attention(image, maps.positional[0, query].mean(0), anchor,
                                        f"layer {index}"))
    return image_grid(tiles, columns=1 + len(chosen))


# ----------------------------------------------------------------------------- CLI


def add_cli(sub: argparse._SubParsersAction) -> None:
    from dabdetr.argtypes import non_negative_int, positive_int

    p = sub.add_parser("explain", help="draw what the best queries attend to: positional "
                       "attention maps and anchors at every decoder layer")
    p.add_argument("images", nargs="+", help="image files and/or directories")
    p.add_argument("--weights", required=True, help="anything `dabdetr predict` accepts")
    p.add_argument("--queries", type=positive_int, default=4,
                   help="rows: the N best-scoring queries (default 4)")
    p.add_argument("--layer", type=int, default=None,
                   help="only this decoder layer (negative: from the end; default: every layer)")
    p.add_argument("--out", default="explain", help="output directory (default explain)")
    p.add_argument("--force", action="store_true", help="replace pictures already in --out")
    p.add_argument("--size", type=positive_int, default=None,
                   help="resize the short side to this (default: the model's evaluation size)")
    p.add_argument("--max-size", type=non_negative_int, default=None,
                   help="cap on the long side, 0 for none (default: the model's)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.set_defaults(func=_cmd_explain)


def _targets(files: list[Path], out: Path, force: bool) -> list[Path]:
    """One `<stem>_explain.png` per image in `out` (a repeated stem gets a `_`); refuses to
    replace an existing picture unless `force`."""
    from dabdetr.errors import OutputExistsError

    targets, used = [], set()
    for path in files:
        name = path.stem
        while name in used:  # the same file name in two folders
            name += "_"
        used.add(name)
        targets.append(out / f"{name}_explain.png")
    existing = [t.name for t in targets if t.exists()]
    if existing and not force:
        raise OutputExistsError(f"{out} already holds {', '.join(existing[:3])}; pass --force "
                                "to replace them, or choose another --out")
    return targets


def _cmd_explain(args: argparse.Namespace) -> int:
    from dabdetr.data.io import load_image_rgb
    from dabdetr.distributed import resolve_device
    from dabdetr.errors import UserError
    from dabdetr.inference import Predictor, find_images
    from dabdetr.io_utils import atomic_path
    from dabdetr.weights.loading import load_model

    files = find_images(args.images)
    if not files:
        raise UserError(f"no images found in {args.images}; give image files or folders")
    targets = _targets(files, Path(args.out), args.force)
    device = str(resolve_device(args.device))
    model = load_model(args.weights, device=device)
    predictor = Predictor(model, size=args.size, max_size=args.max_size, device=device)
    for path, target in zip(files, targets, strict=True):
        picture = explain_image(model, predictor, load_image_rgb(path), args.queries, args.layer)
        with atomic_path(target) as tmp:
            picture.save(tmp, format="PNG")
        print(f"{path} -> {target}")
    return 0
