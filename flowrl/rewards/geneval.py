"""Compositional (GenEval-style) reward: objects, counts, colours and positions from prompt metadata.

GenEval (Ghosh et al. 2023, https://arxiv.org/abs/2310.11513; github.com/djghosh13/geneval,
evaluation/evaluate_images.py) scores an image against its prompt's metadata

    {"tag": "position", "prompt": "a photo of a cat left of a dog",
     "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 0]}],
     "exclude": [{"class": "cat", "count": 2}]}

with an object detector, a CLIP colour classifier on the detected boxes, and box-centre positions.
Flow-GRPO (Liu et al. 2025) trains on the same metadata (dataset/geneval/*_metadata.jsonl) with a
fractional score from its reward server (github.com/yifan123/reward-server, gen_eval.py).

Here the detector is an open-vocabulary one that transformers ships (OWL-ViT or OWLv2, from a local
folder or a hub id) and the colours come from a transformers ``CLIPModel``; the decision rules are
GenEval's and Flow-GRPO's, as pure functions of the detections (tested on hand-made boxes):

    keep_detections      score > threshold (counting prompts: counting_threshold), best first, at
                         most max_objects per class, greedy NMS at IoU max_overlap (GenEval's IoU)
    relative_position    A's relation to B: the centre offset shrunk by position_threshold x
                         (A's + B's width / height), then "left of" / "right of" / "above" /
                         "below" where the shrunk offset over |offset| passes 0.5 on that axis
    geneval_correct      GenEval's ``correct``: every include clause holds on its `count` most
                         confident boxes (>= count found; >= count of them in the colour; each
                         of them in the relation to every box of the target clause), no exclude
                         clause holds (count or more found)
    flow_grpo_score      Flow-GRPO's ``strict_correct`` (counts must be exact) and ``score``, the
                         mean of per-clause terms: 1 - |count - found| / count per include, the
                         same for the colour, 0 / 1 for the position (exclude clauses unscored)

The reward is ``score`` (``fractional``, Flow-GRPO's training reward), ``strict`` or ``geneval``;
the info holds the batch's ``accuracy`` (GenEval), ``strict_accuracy`` and ``score``. Differences
from GenEval's Mask2Former (thresholds, NMS, crops without masks): docs/faithful.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flowrl.rewards import register_reward

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels
ColorsOf = Callable[[str, list[Box]], list[str]]  # (class, boxes) -> one colour name per box

COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
COLOR_TEMPLATES = ["a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object"]


# ---------------------------------------------------------------------- decision rules
def box_iou(a: Box, b: Box) -> float:
    """GenEval's IoU (pixel-inclusive areas: width x1 - x0 + 1)."""

    def area(x: Box) -> float:
        return max(x[2] - x[0] + 1, 0) * max(x[3] - x[1] + 1, 0)

    inter = area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    union = area(a) + area(b) - inter
    return inter / union if union else 0.0


def keep_detections(
    found: list[tuple[Box, float]], threshold: float, max_objects: int = 16, max_overlap: float = 1.0
) -> list[Box]:
    """One class's boxes that count, most confident first: score > threshold, the top
    ``max_objects``, then greedy NMS (a box overlapping a kept one at IoU >= max_overlap is
    dropped; 1 keeps all, GenEval's default for Mask2Former's distinct instances)."""
    order = sorted((d for d in found if d[1] > threshold), key=lambda d: -d[1])[:max_objects]
    kept: list[Box] = []
    while order:
        best = order.pop(0)[0]
        kept.append(best)
        order = [d for d in order if max_overlap == 1 or box_iou(best, d[0]) < max_overlap]
    return kept


def relative_position(a: Box, b: Box, position_threshold: float = 0.1) -> set[str]:
    """The relations of box A to box B (GenEval's ``relative_position``)."""
    ca = np.array([(a[0] + a[2]) / 2, (a[1] + a[3]) / 2])
    cb = np.array([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2])
    dims = np.abs([a[2] - a[0], a[3] - a[1]]) + np.abs([b[2] - b[0], b[3] - b[1]])
    offset = ca - cb
    shrunk = np.maximum(np.abs(offset) - position_threshold * dims, 0) * np.sign(offset)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    rel = set()
    if dx < -0.5:
        rel.add("left of")
    if dx > 0.5:
        rel.add("right of")
    if dy < -0.5:
        rel.add("above")
    if dy > 0.5:
        rel.add("below")
    return rel


def geneval_correct(
    objects: dict[str, list[Box]], metadata: dict, colors_of: ColorsOf, position_threshold: float = 0.1
) -> tuple[bool, list[str]]:
    """GenEval's ``evaluate``: (correct, reasons). Include clauses AND, exclude clauses OR; colour
    and position are judged on the ``count`` most confident boxes of the class."""
    correct, reasons, groups = True, [], []
    for req in metadata.get("include", []):
        cls, n = req["class"], req["count"]
        found = objects.get(cls, [])[:n]
        matched = len(found) >= n
        if not matched:
            reasons.append(f"expected {cls}>={n}, found {len(found)}")
        else:
            if "color" in req:
                hits = colors_of(cls, found).count(req["color"])
                if hits < n:
                    matched = False
                    reasons.append(f"expected {req['color']} {cls}>={n}, found {hits} {req['color']}")
            if "position" in req and matched:
                rel, target = req["position"]
                if groups[target] is None:
                    matched = False
                    reasons.append(f"no target for {cls} to be {rel}")
                elif not all(
                    rel in relative_position(o, t, position_threshold) for o in found for t in groups[target]
                ):
                    matched = False
                    reasons.append(f"expected {cls} {rel} target")
        correct &= matched
        groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        if len(objects.get(req["class"], [])) >= req["count"]:
            correct = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {len(objects[req['class']])}")
    return correct, reasons


def flow_grpo_score(
    objects: dict[str, list[Box]], metadata: dict, colors_of: ColorsOf, position_threshold: float = 0.1
) -> tuple[bool, float]:
    """Flow-GRPO's ``evaluate_reward`` (reward-server gen_eval.py): (strict_correct, score). Counts
    must be exact; ``score`` is the mean of the clause terms, as its reference appends them: a
    count term per include clause; a colour term (1 - |count - hits| / count) or, for a wrong count
    with a colour or position asked, one 0; for a position, 0 at the first box pair that fails and
    then 1 after the pairs are checked (the reference appends the 1 whatever the outcome)."""
    strict, terms, groups = True, [], []
    for req in metadata.get("include", []):
        cls, n = req["class"], req["count"]
        found = objects.get(cls, [])
        terms.append(1 - abs(n - len(found)) / n)
        matched = len(found) == n
        if not matched:
            if "color" in req or "position" in req:
                terms.append(0.0)
        else:
            if "color" in req:
                hits = colors_of(cls, found).count(req["color"])
                terms.append(1 - abs(n - hits) / n)
                matched = hits == n
            if "position" in req and matched:
                rel, target = req["position"]
                if groups[target] is None:
                    matched = False
                    terms.append(0.0)
                else:
                    pairs = ((o, t) for o in found for t in groups[target])
                    if not all(rel in relative_position(o, t, position_threshold) for o, t in pairs):
                        matched = False
                        terms.append(0.0)
                    terms.append(1.0)
        strict &= matched
        groups.append(found if matched else None)
    return strict, (sum(terms) / len(terms) if terms else 0.0)


# ---------------------------------------------------------------------- models
def _features(out) -> Tensor:  # transformers 5 returns an output object, 4.x a tensor
    return out if isinstance(out, Tensor) else out.pooler_output


class OwlDetector:
    """Open-vocabulary boxes from OWL-ViT / OWLv2: every predicted box is labelled with its best
    query (score = sigmoid of that logit), as transformers' post-processing does."""

    def __init__(self, path: str, device: torch.device | str):
        from transformers import AutoConfig, AutoProcessor, Owlv2ForObjectDetection, OwlViTForObjectDetection

        self.v2 = AutoConfig.from_pretrained(path).model_type == "owlv2"
        cls = Owlv2ForObjectDetection if self.v2 else OwlViTForObjectDetection
        self.model = cls.from_pretrained(path).to(device).eval().requires_grad_(False)
        self.processor = AutoProcessor.from_pretrained(path)
        self.device = device

    @torch.no_grad()
    def __call__(
        self, images: list[np.ndarray], queries: list[str]
    ) -> list[dict[str, list[tuple[Box, float]]]]:
        """For each (H, W, 3) uint8 image, query -> [(box, score)] over all predicted boxes."""
        inputs = self.processor(text=[queries] * len(images), images=images, return_tensors="pt").to(
            self.device
        )
        out = self.model(**inputs)
        scores, labels = out.logits.float().max(-1)  # (B, P): the best query of each box
        scores = scores.sigmoid()
        result = []
        for b, img in enumerate(images):
            h, w = img.shape[:2]
            sx, sy = (max(h, w), max(h, w)) if self.v2 else (w, h)  # OWLv2 pads to a square
            cx, cy, bw, bh = out.pred_boxes[b].float().unbind(-1)  # (P,) each, relative
            corners = torch.stack(
                [(cx - bw / 2) * sx, (cy - bh / 2) * sy, (cx + bw / 2) * sx, (cy + bh / 2) * sy], -1
            )
            corners = torch.minimum(corners.clamp(min=0), torch.tensor([w, h, w, h], dtype=corners.dtype))
            found: dict[str, list[tuple[Box, float]]] = {}
            for box, s, q in zip(corners.tolist(), scores[b].tolist(), labels[b].tolist()):
                found.setdefault(queries[q], []).append((tuple(box), s))
            result.append(found)
        return result


class ClipColors:
    """GenEval's colour classifier: CLIP zero-shot over :data:`COLORS` on each box's crop, the
    class embedding the normalized mean of three normalized templates (clip_benchmark's
    ``zero_shot_classifier``)."""

    def __init__(self, path: str, device: torch.device | str):
        from transformers import AutoTokenizer, CLIPModel

        self.model = CLIPModel.from_pretrained(path).to(device).eval().requires_grad_(False)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError):
            from flowrl.models.tokenizer import offline_clip_tokenizer

            self.tokenizer = offline_clip_tokenizer()
        self.size = self.model.config.vision_config.image_size
        self.mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor([0.26862954, 0.26130258, 0.27577711], device=device).view(1, 3, 1, 1)
        self.device, self.classifiers = device, {}

    @torch.no_grad()
    def classifier(self, cls: str) -> Tensor:
        if cls not in self.classifiers:
            texts = [t.format(c=c, cls=cls) for c in COLORS for t in COLOR_TEMPLATES]
            ids = self.tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
            emb = _features(self.model.get_text_features(**ids.to(self.device)))
            emb = (emb / emb.norm(dim=-1, keepdim=True)).view(len(COLORS), len(COLOR_TEMPLATES), -1).mean(1)
            self.classifiers[cls] = emb / emb.norm(dim=-1, keepdim=True)  # (10, D)
        return self.classifiers[cls]

    @torch.no_grad()
    def __call__(self, image: Tensor, cls: str, boxes: list[Box]) -> list[str]:
        """One colour per box of the (3, H, W) image in [0, 1]."""
        from flowrl.rewards.clip import preprocess

        h, w = image.shape[-2:]
        crops = []
        for x0, y0, x1, y1 in boxes:
            x0, y0 = min(int(x0), w - 1), min(int(y0), h - 1)
            x1, y1 = max(math.ceil(x1), x0 + 1), max(math.ceil(y1), y0 + 1)
            crops.append(preprocess(image[None, :, y0:y1, x0:x1].float(), self.size, self.mean, self.std))
        feats = _features(self.model.get_image_features(pixel_values=torch.cat(crops).to(self.device)))
        feats = feats / feats.norm(dim=-1, keepdim=True)
        return [COLORS[i] for i in (feats @ self.classifier(cls).T).argmax(-1).tolist()]


def _vocabulary(spec: str | list[str] | None) -> list[str]:
    if isinstance(spec, list):
        return [str(s) for s in spec]
    if spec in (None, "geneval"):
        path = Path(__file__).resolve().parents[1] / "data" / "assets" / "geneval_object_names.txt"
        return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    raise ValueError(f"geneval vocabulary must be 'geneval' or a list of class names, got {spec!r}")


@register_reward("geneval")
def geneval(
    detector: str = "google/owlv2-base-patch16-ensemble",
    clip: str = "openai/clip-vit-large-patch14",
    score: str = "fractional",
    threshold: float = 0.1,
    counting_threshold: float = 0.1,
    max_objects: int = 16,
    max_overlap: float = 0.5,
    position_threshold: float = 0.1,
    vocabulary: str | list[str] = "geneval",
    device: str | torch.device = "cpu",
):
    """``detector``: an OWL-ViT / OWLv2 folder or hub id; ``clip``: a transformers CLIP folder or hub
    id (GenEval's colour model is OpenAI's ViT-L/14). ``score``: ``fractional`` (Flow-GRPO's
    training reward), ``strict`` (its exact-count correctness) or ``geneval`` (GenEval's). The
    thresholds are on OWL's sigmoid scores (GenEval's 0.3 / 0.9 are Mask2Former's); ``max_overlap``
    the NMS IoU (GenEval: 1, none); ``vocabulary``: the queries besides the prompt's own classes
    (``geneval``: its 80 COCO names), so that a box takes the best of competing labels."""
    if score not in ("fractional", "strict", "geneval"):
        raise ValueError(f"geneval score must be fractional, strict or geneval, got {score!r}")
    vocab = _vocabulary(vocabulary)
    detect, colors = OwlDetector(detector, device), ClipColors(clip, device)

    def reward_fn(images, prompts, metadata):
        for p, m in zip(prompts, metadata):
            if not (m.get("include") or m.get("exclude")):
                raise ValueError(
                    f"the prompt {p!r} has no GenEval metadata (include / exclude clauses); train on a "
                    "GenEval JSONL file, e.g. train.prompts=dataset/geneval (train_metadata.jsonl)"
                )
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        arrays = list(pixels.permute(0, 2, 3, 1).cpu().numpy())
        queries = [
            vocab + sorted({r["class"] for r in m.get("include", []) + m.get("exclude", [])} - set(vocab))
            for m in metadata
        ]
        found: list = [None] * len(arrays)
        for q in {tuple(q) for q in queries}:  # one detector pass per query set
            rows = [i for i, qi in enumerate(queries) if tuple(qi) == q]
            for i, f in zip(rows, detect([arrays[i] for i in rows], list(q))):
                found[i] = f
        values, correct, strict, frac = [], [], [], []
        for i, m in enumerate(metadata):
            t = counting_threshold if m.get("tag") == "counting" else threshold
            objects = {c: keep_detections(d, t, max_objects, max_overlap) for c, d in found[i].items()}
            objects = {c: v for c, v in objects.items() if v}
            cache: dict = {}

            def colors_of(cls, boxes, i=i, cache=cache):
                key = (cls, tuple(boxes))
                if key not in cache:
                    cache[key] = colors(images[i].detach(), cls, boxes)
                return cache[key]

            ok, _ = geneval_correct(objects, m, colors_of, position_threshold)
            s_ok, s = flow_grpo_score(objects, m, colors_of, position_threshold)
            correct.append(float(ok))
            strict.append(float(s_ok))
            frac.append(s)
            values.append({"fractional": s, "strict": float(s_ok), "geneval": float(ok)}[score])
        info = {
            "accuracy": float(np.mean(correct)),
            "strict_accuracy": float(np.mean(strict)),
            "score": float(np.mean(frac)),
        }
        return torch.tensor(values), info

    return reward_fn
