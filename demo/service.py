"""What the demo does, free of Gradio: personalize, generate, manage concepts, read diagnostics.

The Gradio app (:mod:`demo.app`) is a page over this class; every method takes the *user* first,
and that user always comes from the login (never from a form field), so every registry call goes
through ``registry.for_user(user)`` and one user can neither see nor use another's concepts.

Two base instances: one warm for sampling (the sampler packs users' adapters into LoRA slots on it
and grows its tokenizer with placeholder tokens), and one for training, loaded on first use.
Training borrows its base and injects LoRA layers while it runs; on a separate instance it can
never leak into someone's generation, and generation never waits for training.

Everything the app writes goes under ``outputs`` (``users/<user>/generate/<run>``,
``users/<user>/train/<concept>/<run>``, ``users/<user>/exports/<concept>/v<version>-<run>``,
``samples/``); only files the app wrote are ever returned to the page, named by the app. A
training run's folder goes when the run fails or is cancelled; a concept's exports and training
images go when it is deleted (a version's exports with the version), so nothing deleted is served.
Run folders of the older layout (``users/<user>/train|exports/<run>``, no concept level) could
never go with their concept, so they are removed when the service starts.

Messages for the page hide server paths (:meth:`DemoService.public`); the server log keeps them.
"""

from __future__ import annotations

import logging
import math
import re
import secrets
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from adapters.fidelity import FidelitySettings, world_captions, world_evaluator_applies, world_fidelity_hook
from adapters.format_names import FORMATS
from adapters.registry import AdapterRecord, Registry, UserRegistry
from adapters.registry.names import validate_name
from adapters.samples import SAMPLE_SUBJECTS, sample_subject_images, subject_instance
from adapters.train.config import PRESET_NAMES, resolve_config
from adapters.validate import check_text
from demo.jobs import JobStatus, Reporter, TrainingJobs, hide_paths
from demo.uploads import UploadLimits, check_uploads
from gen import world
from gen.base import Base
from gen.concepts import check_known, parse_mentions, substitute
from gen.errors import BespokeError, InvalidRequest
from gen.paths import cache_dir
from gen.provenance import save_png
from gen.sampler import SCHEDULERS, Request, Sampler
from gen.serving import ServingConfig

log = logging.getLogger(__name__)
LOCAL_USER = "local"
_OLD_RUN = re.compile(r"[0-9a-f]{32}")  # a run folder's name (uuid4().hex), right under train/ or exports/ in the older layout
MAX_TRAIN_STEPS = 5000
FIDELITY_KEYS = (
    "subject_fidelity", "autoencoder_ceiling", "subject_fidelity_above_class", "prompt_fidelity", "prompt_fidelity/recontext",
    "prompt_fidelity/position", "prompt_fidelity/accessory", "prompt_fidelity/colour",
    "prior_drift_class_accuracy", "prior_drift_identity",
)


@dataclass(frozen=True)
class DemoSettings:
    """How the demo runs; the defaults suit a person trying it on a laptop."""

    outputs: Path = Path("outputs/demo")
    registry: Path | None = None  # None: the registry's default root
    auth: bool = False  # True: users log in, and each sees only their own concepts
    limits: UploadLimits = field(default_factory=UploadLimits)
    train_options: Mapping[str, Any] = field(default_factory=dict)  # TrainConfig overrides for every job
    fidelity: FidelitySettings = field(default_factory=FidelitySettings)
    validation_rounds: int = 4  # validation image sets per training run
    validation_images: int = 4
    sample_photos: int = 4
    max_images: int = 8  # per generate request
    max_steps: int = 150  # denoising steps per generate request


@dataclass(frozen=True)
class TrainRequest:
    """One personalization, validated and ready for the trainer thread."""

    user: str
    concept: str
    class_word: str
    preset: str
    images: tuple[Image.Image, ...]
    steps: int | None
    evaluate: bool


@dataclass(frozen=True)
class GenerateResult:
    """Saved PNGs (provenance inside) and a caption for each, plus everything to download."""

    personalized: list[tuple[str, str]]
    base: list[tuple[str, str]]
    files: list[str]
    seed: int
    prompt: str
    base_prompt: str | None


@dataclass(frozen=True)
class Diagnostics:
    """What the Diagnostics tab shows for one adapter version."""

    record: AdapterRecord
    metrics: list[tuple[str, float]]
    loss: list[tuple[int, float]]
    fidelity: list[tuple[str, float]]
    layers: list[tuple[str, float]]  # per targeted layer: ||delta W|| / ||W|| (adapters.diagnostics)
    notes: list[str]  # alarms from the metrics (or why there are none), then the weights' warnings


class DemoService:
    """The demo's operations over one warm base, one registry and one outputs folder."""

    def __init__(self, load_base: Callable[[], Base], settings: DemoSettings = DemoSettings()):
        self.settings = settings
        self.outputs = Path(settings.outputs).expanduser().resolve()
        self.outputs.mkdir(parents=True, exist_ok=True)
        self._remove_old_layout()
        self._load_base = load_base
        self.base = load_base()
        self.registry = Registry(settings.registry)
        # latest_ttl_s=0: a version trained, rolled back or deleted a moment ago is what the next request sees.
        self.sampler = Sampler(self.base, adapters=self.registry, config=ServingConfig(latest_ttl_s=0.0))
        self.world_base = world_evaluator_applies(self.base, world.CLASS_WORDS[world.CLASSES[0]])
        self._train_base: Base | None = None
        self._train_base_lock = threading.Lock()
        self._server_roots = (self.outputs, self.registry.root, cache_dir(), Path(tempfile.gettempdir()), Path.home())
        self.jobs = TrainingJobs(self._train, public=self.public)

    def public(self, message: str) -> str:
        """``message`` as a web page may show it: the server's paths (registry, outputs, cache, temp) hidden."""
        return hide_paths(message, [p for root in self._server_roots for p in {str(root), str(Path(root).resolve())}])

    def _remove_old_layout(self) -> None:
        """Delete run folders of the older layout, ``users/<user>/train|exports/<run>`` with files directly inside.

        Deleting a concept removes ``train/<concept>`` and ``exports/<concept>``; the older runs
        there name no concept, so they outlived their concept and stayed served. A folder named
        like a run that holds only run folders is a concept of that name (new layout) and stays.
        """
        for kind, run in (("train", _OLD_RUN), ("exports", re.compile(r"v\d+-[0-9a-f]{32}"))):
            for folder in self.outputs.glob(f"users/*/{kind}/*"):
                if not (_OLD_RUN.fullmatch(folder.name) and folder.is_dir() and not folder.is_symlink()):
                    continue
                children = list(folder.iterdir())
                if not children or not all(run.fullmatch(c.name) and c.is_dir() and not c.is_symlink() for c in children):
                    log.info("removing %s: a run folder of the older demo layout", folder)
                    shutil.rmtree(folder, ignore_errors=True)

    # --- users and folders ---

    def user_of(self, username: str | None) -> str:
        """The user a request acts for: the logged-in name with auth, else the one local user."""
        if not self.settings.auth:
            return LOCAL_USER
        if not username:
            raise InvalidRequest("please log in")
        return validate_name("user", username)

    def handle(self, user: str) -> UserRegistry:
        return self.registry.for_user(user)

    def _run_dir(self, user: str, kind: str, concept: str | None = None, prefix: str = "") -> Path:
        """A fresh folder for one run; its name is random, so URLs to its files cannot be guessed.

        Runs for a concept sit in a folder named after it (names are path-safe), so deleting the
        concept can delete them; ``prefix`` (``v3-``) ties an export to its version.
        """
        folder = self._kind_dir(user, kind, concept) / f"{prefix}{uuid.uuid4().hex}"
        folder.mkdir(parents=True)
        return folder

    def _kind_dir(self, user: str, kind: str, concept: str | None = None) -> Path:
        folder = self.outputs / "users" / validate_name("user", user) / kind
        return folder if concept is None else folder / validate_name("concept", concept)

    # --- personalize ---

    def sample_photos(self, subject: str, n: int | None = None) -> list[Image.Image]:
        """The 'photos' of a sample subject (a held-out instance of the built-in world)."""
        try:
            return sample_subject_images(subject, int(n or self.settings.sample_photos))
        except ValueError as e:
            raise InvalidRequest(str(e)) from None

    def sample_preview(self, subject: str, n: int | None = None) -> list[str]:
        """The sample photos saved once under ``outputs/samples`` (they are the same for everyone)."""
        instance = subject_instance(subject) if subject in SAMPLE_SUBJECTS else None
        if instance is None:
            raise InvalidRequest(f"unknown sample subject {subject!r}")
        n = self._photo_count(n)
        folder = self.outputs / "samples" / f"{instance.cls}-{instance.idx}"
        paths = [folder / f"{i}.png" for i in range(n)]
        if not all(p.is_file() for p in paths):
            folder.mkdir(parents=True, exist_ok=True)
            for path, image in zip(paths, self.sample_photos(subject, n)):
                _save_atomically(image, path)
        return [str(p) for p in paths]

    def _photo_count(self, n: int | float | None) -> int:
        limits = self.settings.limits
        n = self.settings.sample_photos if n is None else int(n)
        if not limits.min_images <= n <= limits.max_images:
            raise InvalidRequest(f"give between {limits.min_images} and {limits.max_images} photos, got {n}")
        return n

    def start_training(
        self,
        user: str,
        *,
        concept: str,
        class_word: str,
        preset: str = "quick",
        uploads: Sequence[str] | None = None,
        subject: str | None = None,
        n_photos: int | None = None,
        steps: int | None = None,
        evaluate: bool = True,
        upload_root: str | None = None,
    ) -> JobStatus:
        """Check everything a user typed or uploaded, then queue the job (training runs in the background)."""
        concept = validate_name("concept", (concept or "").strip())
        class_word = (class_word or "").strip()
        if not class_word:
            raise InvalidRequest("give a class word: what the subject is (dog, mug, robot, ...)")
        check_text("class word", class_word)
        if preset not in PRESET_NAMES:
            raise InvalidRequest(f"unknown preset {preset!r}; choose one of {', '.join(PRESET_NAMES)}")
        if steps is not None and not (isinstance(steps, (int, float)) and math.isfinite(steps)):
            raise InvalidRequest("steps must be a whole number")
        steps = int(steps) if steps else None
        if steps is not None and not 1 <= steps <= MAX_TRAIN_STEPS:
            raise InvalidRequest(f"steps must be between 1 and {MAX_TRAIN_STEPS} (0: the preset's), got {steps}")
        if subject:
            images = self.sample_photos(subject, self._photo_count(n_photos))
        else:
            images = [u.image for u in check_uploads(uploads or [], self.settings.limits, upload_root)]
        request = TrainRequest(user, concept, class_word, preset, tuple(images), steps, bool(evaluate))
        return self.jobs.submit(user, concept, request)

    def train_base(self) -> Base:
        with self._train_base_lock:
            if self._train_base is None:
                self._train_base = self._load_base()
            return self._train_base

    def _train(self, request: TrainRequest, reporter: Reporter) -> int:
        """Runs in the trainer thread: caption, train with progress and validation images, register."""
        from adapters.train import personalize  # heavy imports, paid on the first job only

        reporter.phase("loading the base")
        base = self.train_base()
        reporter.phase("preparing")
        photos = list(request.images)
        applies = world_evaluator_applies(base, request.class_word)
        captions = world_captions(photos, request.class_word) if applies else None
        evaluate = world_fidelity_hook(base, request.class_word, photos, self.settings.fidelity) if applies and request.evaluate else None
        reporter.check()
        options = dict(self.settings.train_options)
        if request.steps:
            options["steps"] = request.steps
        steps = resolve_config(base, request.preset, **options).steps
        options.update(validation_every=max(1, steps // max(1, self.settings.validation_rounds)), num_validation_images=self.settings.validation_images)
        folder = self._run_dir(request.user, "train", request.concept)
        writing = threading.Lock()  # the images are written, or removed at shutdown, never both at once

        def on_validation(v) -> None:
            paths = []
            with writing:
                reporter.check()  # cancelled (or the app shut down and removed the folder): write nothing more
                try:
                    folder.mkdir(parents=True, exist_ok=True)
                    for i, image in enumerate(v.images):
                        path = folder / f"step{v.step:06d}-{i}.png"
                        image.save(path, format="PNG")
                        paths.append(str(path))
                except OSError:  # the concept was deleted meanwhile (its folder with it): a lost preview, not a failed run
                    return
            reporter.validation(v.step, paths)

        def abandon() -> None:  # the app shut down mid-step: this thread's own clean-up will not run
            with writing:
                shutil.rmtree(folder, ignore_errors=True)

        reporter.on_abandon(abandon)
        try:
            record = personalize(
                base, request.user, request.concept, photos, request.class_word, captions=captions, registry=self.registry,
                progress=reporter.progress, evaluate=evaluate, on_validation=on_validation, preset=request.preset, **options,
            )
        except BaseException:  # cancelled or failed: nothing was registered, so its images must not stay served
            reporter.discard_validations()
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return record.version

    # --- generate ---

    def mention_choices(self, user: str) -> list[str]:
        return [f"<{c}>" for c in self.handle(user).concepts()]

    def base_prompt(self, user: str, prompt: str) -> str | None:
        """The prompt with each ``<concept>`` replaced by its class word: what the base alone is asked. None without mentions."""
        mentions = parse_mentions(prompt)
        if not mentions:
            return None
        handle = self.handle(user)
        check_known(user, mentions, handle.concepts())
        texts = {}
        for m in mentions:
            record = handle.record(m.name)
            texts[m.name] = record.class_word or m.name
        return substitute(prompt, texts)

    def generate(
        self,
        user: str,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        seed: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        num_images: int = 1,
        scheduler: str | None = None,
        compare: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> GenerateResult:
        """Generate for ``user`` (their concepts only), save PNGs with provenance; with ``compare`` also the base alone, same seeds."""
        s = self.settings
        num_images = int(num_images)
        if not 1 <= num_images <= s.max_images:
            raise InvalidRequest(f"the demo makes 1 to {s.max_images} images per request, got {num_images}")
        if steps is not None and not 1 <= int(steps) <= s.max_steps:
            raise InvalidRequest(f"steps must be between 1 and {s.max_steps}, got {steps}")
        if scheduler is not None and scheduler not in SCHEDULERS:
            raise InvalidRequest(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        seed = _seed(seed)
        negative_prompt = negative_prompt or None
        base_prompt = self.base_prompt(user, prompt) if compare else None
        common = dict(negative_prompt=negative_prompt, num_images=num_images, seed=seed, steps=None if steps is None else int(steps),
                      guidance_scale=guidance_scale, scheduler=scheduler)
        requests = [Request(prompt, user=user, progress=progress, **common)]
        if base_prompt is not None:
            requests.append(Request(base_prompt, **common))
        generations = self.sampler.generate_many(requests)  # one batch: same settings
        folder = self._run_dir(user, "generate")
        records, personalized, base = [], [], []
        for kind, generation, out in zip(("image", "base"), generations, (personalized, base)):
            for image, prov in zip(generation.images, generation.provenance):
                path = save_png(image, prov, folder / f"{kind}-{prov.seed:010d}.png")
                records.append({"file": path.name, **prov.to_dict()})
                out.append((str(path), f"seed {prov.seed}" + (" (base alone)" if kind == "base" else "")))
        sidecar = folder / "provenance.json"
        sidecar.write_text(_json(records))
        files = [p for p, _ in personalized] + [p for p, _ in base] + [str(sidecar)]
        return GenerateResult(personalized, base, files, seed, generations[0].provenance[0].prompt, base_prompt)

    # --- my concepts ---

    def concept_rows(self, user: str) -> list[list[Any]]:
        """One row per concept: its latest version, how many versions, aliases, what it is and how good."""
        by_concept: dict[str, list[AdapterRecord]] = {}
        for record in self.handle(user).list():
            by_concept.setdefault(record.concept, []).append(record)
        rows = []
        for concept, records in sorted(by_concept.items()):
            latest = max(records, key=lambda r: r.version)
            aliases = sorted({f"{a}→v{r.version}" for r in records for a in r.aliases if a != "latest"})
            rows.append([
                concept, f"<{concept}>", latest.version, len(records), ", ".join(aliases), latest.class_word or "",
                latest.trigger or "", latest.created_at[:19].replace("T", " "),
                _metric(latest, "subject_fidelity"), _metric(latest, "prompt_fidelity"),
            ])
        return rows

    def history_rows(self, user: str, concept: str) -> list[list[Any]]:
        rows = []
        for r in self.handle(user).history(concept):
            rows.append([
                r.version, r.created_at[:19].replace("T", " "), ", ".join(r.aliases), r.parent_version or "",
                r.rank, _metric(r, "steps"), _metric(r, "final_loss"), _metric(r, "subject_fidelity"),
                _metric(r, "prompt_fidelity"), r.sha256[:12], r.damaged or "",
            ])
        return rows

    def versions(self, user: str, concept: str) -> list[str]:
        return [str(r.version) for r in self.handle(user).history(concept)]

    def set_alias(self, user: str, concept: str, alias: str, version: str) -> str:
        record = self.handle(user).set_alias(concept, (alias or "").strip(), _version(version))
        return f"{alias!s} now points at v{record.version} of {concept}"

    def rollback(self, user: str, concept: str) -> str:
        record = self.handle(user).rollback(concept)
        return f"latest of {concept} is now v{record.version} (a copy of v{record.parent_version})"

    def delete(self, user: str, concept: str, version: str | None = None, *, whole: bool = False, force: bool = False) -> str:
        """Delete one version, or every version with ``whole``.

        Deleting everything is its own flag, never a version value: an empty version box (or an
        alias named ``all``) must not turn "delete this version" into "delete the concept".
        """
        if whole:
            deleted = self.handle(user).delete(concept, None, force=force)
        elif version is None or not str(version).strip():
            raise InvalidRequest("pick the version to delete (or choose to delete the whole concept)")
        else:
            deleted = self.handle(user).delete(concept, _version(version), force=force)
        self._remove_files(user, concept, None if whole else deleted)
        what = "the whole concept" if whole else f"v{deleted[0]}"
        return f"deleted {what} of {concept} ({len(deleted)} version{'s' if len(deleted) != 1 else ''})"

    def _remove_files(self, user: str, concept: str, versions: Sequence[int] | None) -> None:
        """Remove what the app wrote for deleted versions: their exports; with ``versions=None`` also the training images."""
        exports = self._kind_dir(user, "exports", concept)
        if versions is None:
            shutil.rmtree(exports, ignore_errors=True)
            shutil.rmtree(self._kind_dir(user, "train", concept), ignore_errors=True)
            return
        for v in versions:
            for folder in exports.glob(f"v{int(v)}-*"):
                shutil.rmtree(folder, ignore_errors=True)

    def export(self, user: str, concept: str, version: str, fmt: str) -> str:
        """A zip of one version in ``fmt`` (diffusers, peft or kohya), written under the user's exports."""
        if fmt not in FORMATS:
            raise InvalidRequest(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
        handle = self.handle(user)
        record = handle.record(concept, _version(version))
        folder = self._run_dir(user, "exports", record.concept, prefix=f"v{record.version}-")
        stem = _safe_stem(f"{record.concept}-v{record.version}-{fmt}")
        staging = folder / stem
        handle.export(concept, staging / f"{stem}.safetensors" if fmt == "kohya" else staging, fmt, record.version)
        archive = shutil.make_archive(str(folder / stem), "zip", root_dir=staging)
        shutil.rmtree(staging, ignore_errors=True)
        return archive

    # --- diagnostics ---

    def diagnostics(self, user: str, concept: str, version: str = "latest") -> Diagnostics:
        """The record's metrics (fidelity, drift, loss curve) plus what the adapter's weights say about it."""
        handle = self.handle(user)
        record = handle.record(concept, _version(version))
        metrics = sorted(record.metrics.items())
        loss = sorted((int(k.rsplit("_", 1)[1]), v) for k, v in record.metrics.items() if re.fullmatch(r"loss/step_\d+", k))
        fidelity = [(k, record.metrics[k]) for k in FIDELITY_KEYS if k in record.metrics]
        notes = []
        if fidelity:  # measured with the world's evaluator: prompt fidelity is a fraction of attributes
            from adapters.evaluation import metric_warnings

            notes += metric_warnings(record.metrics)
        else:
            notes.append("No fidelity numbers recorded: they are measured after training on the built-in base (world class words).")
        summary, layers, warnings = _adapter_diagnostics(handle, record, self.base)
        metrics = [(k, v) for k, v in metrics if not k.startswith("loss/")] + summary
        return Diagnostics(record, metrics, loss, fidelity, layers, notes + warnings)

    def close(self) -> None:
        self.jobs.close()
        self.registry.close()


def _adapter_diagnostics(handle: UserRegistry, record: AdapterRecord, base: Base) -> tuple[list[tuple[str, float]], list[tuple[str, float]], list[str]]:
    """(summary numbers, per-layer relative update norms, warnings) from :mod:`adapters.diagnostics`, when present.

    Read from the weights alone, against the serving base's (untouched: its LoRA slots are hooks).
    The module is optional here, so the tab still shows the record's metrics without it.
    """
    try:
        from adapters.diagnostics import diagnose, short_name
    except ImportError:
        return [], [], []
    try:
        diag = diagnose(handle.get(record.concept, record.version), base)
    except BespokeError as e:
        return [], [], [f"adapter diagnostics unavailable: {e}"]
    summary = [(f"weights/{k}", float(v)) for k, v in diag.summary().items() if math.isfinite(v)]
    layers = [(short_name(layer.module), float(layer.relative_norm if layer.relative_norm is not None else layer.delta_norm)) for layer in diag.layers]
    return summary, layers, list(diag.warnings)


def _metric(record: AdapterRecord, name: str) -> float | str:
    value = record.metrics.get(name)
    return "" if value is None else round(float(value), 4)


def _version(version: str | int | None) -> int | str:
    if version is None or version == "":
        return "latest"
    text = str(version).strip().removeprefix("v")
    return int(text) if text.isascii() and text.isdigit() else text


def _seed(seed: int | float | None) -> int:
    """The request's base seed: random when None or negative (the page's -1), else the page's number as an int.

    The range (image ``i`` uses ``seed + i``, each below 2**63) is the sampler's to check, as for any caller.
    """
    if isinstance(seed, float) and not seed.is_integer():  # NaN and infinity too
        raise InvalidRequest(f"seed must be a whole number, got {seed}")
    return secrets.randbits(31) if seed is None or seed < 0 else int(seed)


def _save_atomically(image: Image.Image, path: Path) -> None:
    """Write a PNG under a temporary name of its own, then rename it into place.

    Two page loads may write the same sample at once: each needs its own temporary file (a shared
    one is renamed away under the other writer), and the rename means no reader sees half a PNG.
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        image.save(tmp, format="PNG")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _safe_stem(text: str) -> str:
    return re.sub(r"[^\w.+-]", "_", text)[:100]


def _json(data: Any) -> str:
    import json

    return json.dumps(data, indent=2)
