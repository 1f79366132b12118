"""CLIP- and DINO-like judges loaded from a local folder, for bases the world's evaluator cannot read.

DreamBench measures subject fidelity with DINO ViT-S/16 (CLS token) and CLIP ViT-B/32 image
embeddings, and prompt fidelity with CLIP's image-text cosine (CLIP-T). Any transformers
checkpoint of that shape plugs in: a ``CLIPModel`` folder (``model.safetensors`` + processor and
tokenizer files, as ``save_pretrained`` writes them) or an ``AutoModel`` vision folder (DINO,
DINOv2, ViT). Everything loads with ``local_files_only=True``: this project never downloads a
judge; if the folder is missing or incomplete, the error says so.

:func:`load_judge` picks the judge for a base: explicit folders first, else the world's evaluator
when it applies, else an error asking for a folder.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from gen.errors import EvaluationError
from gen.evaluate import Images, Judge, world_evaluator_applies

if TYPE_CHECKING:
    from gen.base import Base

BATCH = 32


def _folder(path: str | os.PathLike, what: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise EvaluationError(f"{what} folder {folder} does not exist (judges load from a local folder only, never from the network)")
    return folder


def _features(output) -> torch.Tensor:
    """transformers 5 returns model outputs from ``get_*_features``; 4.x returned the tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipJudge:
    """A local CLIP model: image embeddings (CLIP-I) and image-text cosine (CLIP-T)."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu") -> None:
        from transformers import AutoProcessor, CLIPModel

        folder = _folder(path, "CLIP")
        self.model, self.processor = _load_local(CLIPModel, AutoProcessor, folder, device, "a CLIP model and processor")
        self.device = torch.device(device)
        self.name = f"CLIP ({folder.name})"

    def embed(self, images: Images) -> torch.Tensor:
        return _embed_batches(self, images, lambda pixels: _features(self.model.get_image_features(pixel_values=pixels)))

    @torch.no_grad()
    def embed_text(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.processor(text=list(texts), return_tensors="pt", padding=True, truncation=True)
        out = self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device))
        return F.normalize(_features(out).float().cpu(), dim=1)

    def score(self, images: Images, prompts: Sequence[str]) -> list[float]:
        """CLIP-T: cosine between each image and its prompt (DreamBench reports the mean, ~0.3 for good models)."""
        if len(images) != len(prompts):
            raise EvaluationError(f"got {len(images)} images for {len(prompts)} prompts")
        return (self.embed(images) * self.embed_text(prompts)).sum(dim=1).tolist()


class DinoJudge:
    """A local self-supervised ViT (DINO, DINOv2, ...): the CLS token of the last layer, as DreamBench's DINO score."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu") -> None:
        from transformers import AutoImageProcessor, AutoModel

        folder = _folder(path, "DINO")
        self.model, self.processor = _load_local(AutoModel, AutoImageProcessor, folder, device, "a vision model and image processor")
        self.device = torch.device(device)
        self.name = f"DINO ({folder.name})"

    def embed(self, images: Images) -> torch.Tensor:
        return _embed_batches(self, images, lambda pixels: self.model(pixel_values=pixels).last_hidden_state[:, 0])


def _load_local(model_cls, processor_cls, folder: Path, device: str | torch.device, what: str):
    """Model and processor from a local folder only: a judge is never downloaded."""
    try:
        model = model_cls.from_pretrained(folder, local_files_only=True).to(device).eval()
        return model, processor_cls.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise EvaluationError(f"cannot load {what} from {folder}: {e}") from None


@torch.no_grad()
def _embed_batches(judge, images: Images, features) -> torch.Tensor:
    """Unit-norm embeddings of ``images``, ``BATCH`` at a time through the judge's processor and ``features``."""
    rows = []
    for i in range(0, len(images), BATCH):
        pixels = judge.processor(images=[im.convert("RGB") for im in images[i:i + BATCH]], return_tensors="pt")["pixel_values"]
        rows.append(features(pixels.to(judge.device)).float().cpu())
    return F.normalize(torch.cat(rows), dim=1)


def load_judge(
    base: Base | None,
    class_word: str,
    *,
    clip: str | os.PathLike | None = None,
    dino: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> Judge:
    """The judge for ``base``'s images of ``class_word``.

    With ``clip`` and/or ``dino`` folders: identity from DINO (else CLIP image embeddings), prompt
    fidelity from CLIP-T (None without CLIP). Without them: the world's evaluator, when it applies.
    """
    if clip is None and dino is None:
        if base is not None and world_evaluator_applies(base, class_word):
            return Judge.world()
        raise EvaluationError(
            f"the built-in world's evaluator cannot judge this base's images of {class_word!r}; "
            "give a local CLIP (--clip PATH) and/or DINO (--dino PATH) model folder"
        )
    clip_judge = ClipJudge(clip, device) if clip is not None else None
    identity = DinoJudge(dino, device) if dino is not None else clip_judge
    return Judge(identity=identity, prompt=clip_judge)
