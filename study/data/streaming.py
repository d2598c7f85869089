"""Streaming input for image-file datasets (ImageNet-LT, Places-LT, iNaturalist 2018).

The CIFAR-style datasets live on the device as uint8 tensors (``study.data.device.DeviceSplit``); file
datasets are far too large for that, so their images are decoded and augmented in DataLoader
worker processes and only the in-flight batches exist at any time. Three pieces:

- :class:`KangTransform`: Kang et al.'s (ICLR 2020, classifier re-balancing) transforms —
  RandomResizedCrop + RandomHorizontalFlip + ColorJitter(0.4, 0.4, 0.4, 0) for training,
  Resize(256/224 · size) + CenterCrop(size) for evaluation — with torchvision's semantics and
  torchvision's functional ops, but every random number drawn from an explicit
  ``numpy.random.Generator``, so an image's augmentation is a pure function of its seed;
- :class:`ImageListDataset`: (index, sample_seed) -> (CHW float tensor, label), decoding with PIL;
  an image that cannot be read raises :class:`UnreadableImage` naming its path;
- :class:`StreamSplit`: the file-dataset counterpart of ``DeviceSplit``; ``batches(order,
  batch_size, epoch_seed)`` walks an epoch's order exactly as the trainer walks a DeviceSplit's,
  with per-sample seeds derived from (epoch_seed, position), so batches do not depend on the
  number of workers and a resumed epoch replays exactly.

This module imports torch, torchvision and PIL at its top: only trials import it.
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from study.config.datasets import IMAGENET_MEAN, IMAGENET_STD, INAT_MEAN, INAT_STD  # noqa: F401  (Kang et al.'s statistics)
from study.errors import UserError

EVAL_RESIZE_RATIO = 256 / 224
"""Evaluation resizes the shorter side to ``round(size * 256 / 224)`` before the centre crop."""


# --- transforms -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainParams:
    """The random decisions of one training augmentation (what torchvision's ``get_params`` of each
    transform would return)."""

    box: tuple[int, int, int, int]
    """The crop as torchvision's (top, left, height, width) — ``RandomResizedCrop.get_params``'s (i, j, h, w)."""
    flip: bool
    jitter_order: tuple[int, ...]
    """The colour ops in the order they are applied: 0 brightness, 1 contrast, 2 saturation
    (``ColorJitter.get_params``'s ``fn_idx`` without the absent hue); empty when jitter is off."""
    factors: tuple[float, float, float] | None
    """Brightness, contrast and saturation factors (in that order, not in application order)."""


class KangTransform:
    """Kang et al.'s transforms, ``transform(pil_rgb_image, rng) -> CHW float32 tensor``.

    ``train=True`` with a ``numpy.random.Generator``: RandomResizedCrop(size, scale, ratio) —
    torchvision's ``get_params``: target area uniform in ``scale`` times the image area, aspect ratio
    log-uniform in ``ratio``, 10 attempts, then the central-crop fallback; bilinear resize —,
    RandomHorizontalFlip(0.5), ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter,
    hue=0) — factors uniform in [max(0, 1 - jitter), 1 + jitter], the three ops in a random order —,
    ToTensor, Normalize(mean, std). ``jitter=0`` turns the colour jitter off (iNaturalist).

    Eval (``train=False``, or any transform called with ``rng=None``): Resize(round(size * 256 /
    224)) of the shorter side, CenterCrop(size), ToTensor, Normalize; size 224 gives Kang's
    Resize(256) + CenterCrop(224).

    The pixels come from torchvision's own functional ops (``resized_crop``, ``hflip``,
    ``adjust_*``, ``resize``, ``center_crop``, ``to_tensor``, ``normalize``), so for the same
    decisions the output equals torchvision's composed transforms bit for bit; only where the random
    numbers come from differs (numpy's generator here, torch's global one there). Draw order per
    image: crop (2 uniforms per attempt, then 2 integers), flip (1 uniform), then jitter (a
    permutation of 3, then 3 uniforms)."""

    def __init__(
        self,
        size: int,
        train: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        jitter: float = 0.4,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ):
        if int(size) < 1:
            raise ValueError(f"transform size {size} must be positive")
        if jitter < 0:
            raise ValueError(f"colour jitter {jitter} must be non-negative")
        self.size = int(size)
        self.train = bool(train)
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        self.jitter = float(jitter)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.eval_resize = int(round(self.size * EVAL_RESIZE_RATIO))

    def __repr__(self) -> str:
        return (
            f"KangTransform(size={self.size}, train={self.train}, jitter={self.jitter:g}, "
            f"mean={tuple(self.mean)}, std={tuple(self.std)})"
        )

    # the random decisions ------------------------------------------------------------------------

    def crop_box(self, rng: np.random.Generator, width: int, height: int) -> tuple[int, int, int, int]:
        """RandomResizedCrop's (top, left, height, width) for a ``width`` x ``height`` image;
        torchvision's ``RandomResizedCrop.get_params`` with numpy's random numbers."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(self.scale[0], self.scale[1])
            aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w <= width and 0 < h <= height:
                i = int(rng.integers(0, height - h + 1))
                j = int(rng.integers(0, width - w + 1))
                return i, j, h, w
        # fallback to the central crop, clamped to the ratio range (as torchvision does)
        in_ratio = float(width) / float(height)
        if in_ratio < min(self.ratio):
            w = width
            h = int(round(w / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h = height
            w = int(round(h * max(self.ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def draw(self, rng: np.random.Generator, width: int, height: int) -> TrainParams:
        """All random decisions of one training augmentation of a ``width`` x ``height`` image."""
        box = self.crop_box(rng, width, height)
        flip = bool(rng.random() < 0.5)
        if self.jitter > 0:
            order = tuple(int(k) for k in rng.permutation(3))
            lo, hi = max(0.0, 1.0 - self.jitter), 1.0 + self.jitter
            factors = tuple(float(f) for f in rng.uniform(lo, hi, size=3))
            return TrainParams(box, flip, order, factors)  # type: ignore[arg-type]
        return TrainParams(box, flip, (), None)

    # the pixels ----------------------------------------------------------------------------------

    def apply(self, img: Image.Image, params: TrainParams) -> torch.Tensor:
        """The training augmentation of ``img`` with the given decisions."""
        i, j, h, w = params.box
        img = TF.resized_crop(img, i, j, h, w, [self.size, self.size], InterpolationMode.BILINEAR, antialias=True)
        if params.flip:
            img = TF.hflip(img)
        if params.factors is not None:
            ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
            for k in params.jitter_order:
                img = ops[k](img, params.factors[k])
        return TF.normalize(TF.to_tensor(img), self.mean, self.std)

    def eval_view(self, img: Image.Image) -> torch.Tensor:
        """The deterministic evaluation view: Resize(shorter side) + CenterCrop + ToTensor + Normalize."""
        img = TF.resize(img, [self.eval_resize], InterpolationMode.BILINEAR, antialias=True)
        img = TF.center_crop(img, [self.size, self.size])
        return TF.normalize(TF.to_tensor(img), self.mean, self.std)

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        if not self.train or rng is None:
            return self.eval_view(img)
        return self.apply(img, self.draw(rng, *img.size))


# --- decoding ---------------------------------------------------------------------------------------


class UnreadableImage(UserError):
    """An image file that is missing or cannot be decoded; the message names its full path and why.

    The constructor takes exactly one string: DataLoader re-raises a worker's exception in the main
    process as ``type(message)`` (torch's ``ExceptionWrapper.reraise``), so this class survives the
    trip and can be caught as itself. (No ``message`` class attribute, on purpose: the re-raise
    would then call ``type(message=...)``.) A UserError, so the CLI prints it as one line."""

    def __init__(self, message: str):
        super().__init__(message)


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror} ({type(e).__name__})"
    text = str(e).strip() or "cannot be decoded"
    return f"{text} ({type(e).__name__})"


def load_rgb(path: str) -> Image.Image:
    """``path`` decoded by PIL as an RGB image (grayscale, CMYK, RGBA and palette images converted
    with ``.convert("RGB")``, as torchvision's ``default_loader`` does); raises UnreadableImage."""
    try:
        with open(path, "rb") as f, Image.open(f) as im:
            # convert() loads the whole image, so a truncated file fails here, not in a transform
            return im.convert("RGB")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise UnreadableImage(f"unreadable image {path}: {_reason(e)}") from e


class ImageListDataset(torch.utils.data.Dataset):
    """Images named by a list of relative paths under ``root``, with int labels.

    ``dataset[(index, sample_seed)]`` -> (``transform(image, rng)``, label), where ``rng`` is
    ``numpy.random.default_rng(sample_seed)`` (any seed numpy accepts: an int or a sequence of
    non-negative ints), or None when ``sample_seed`` is None (``KangTransform``'s eval view);
    ``dataset[index]`` is ``dataset[(index, None)]``.

    The paths are kept as one UTF-8 byte buffer plus offsets (two numpy arrays), not a list of
    Python strings: forked DataLoader workers touching the refcounts of millions of small objects
    would copy their pages, so each worker's memory would grow with the dataset."""

    def __init__(
        self,
        root: str | os.PathLike,
        paths: Sequence[str],
        labels: Sequence[int],
        transform: Callable[[Image.Image, np.random.Generator | None], torch.Tensor],
    ):
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.root = os.fspath(root)
        encoded = [os.fspath(p).encode("utf-8") for p in paths]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self._offsets[1:])
        self._blob = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
        self.labels = np.ascontiguousarray(np.asarray(labels, dtype=np.int64))
        self.transform = transform

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def relpath(self, index: int) -> str:
        """The path of image ``index`` as the list gives it."""
        return self._blob[self._offsets[index] : self._offsets[index + 1]].tobytes().decode("utf-8")

    def path(self, index: int) -> str:
        """The full path of image ``index``."""
        return os.path.join(self.root, self.relpath(index))

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"image index {index} outside 0..{len(self) - 1}")
        img = load_rgb(self.path(index))
        rng = None if seed is None else np.random.default_rng(seed)
        return self.transform(img, rng), int(self.labels[index])


# --- the split --------------------------------------------------------------------------------------


def draw_epoch_seed(gen: torch.Generator) -> int:
    """An epoch's seed from the trainer's CPU ``torch.Generator`` (one ``torch.randint`` draw), so a
    checkpointed generator state reproduces it."""
    return int(torch.randint(0, 2**62, (1,), generator=gen))


class _BatchPlan:
    """The batch sampler of a StreamSplit's DataLoader: refilled before each iteration (the
    DataLoader keeps its persistent workers and calls ``iter()`` on this object at every epoch).
    Each batch is a list of (dataset index, sample seed); the seed of position p of an epoch with
    seed s is ``[s, p]`` (numpy's SeedSequence entropy), None in eval mode."""

    def __init__(self):
        self.set(np.zeros(0, dtype=np.int64), 1, None, False)

    def set(self, order: np.ndarray, batch_size: int, epoch_seed: int | None, drop_last: bool) -> None:
        self.order, self.batch_size, self.epoch_seed, self.drop_last = order, batch_size, epoch_seed, drop_last

    def __len__(self) -> int:
        n, b = len(self.order), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self):
        # Bind the plan now: a refill while this iterator is alive must not change its batches.
        order, b, seed, count = self.order, self.batch_size, self.epoch_seed, len(self)

        def batches():
            for k in range(count):
                lo = k * b
                idx = order[lo : lo + b].tolist()
                if seed is None:
                    yield [(i, None) for i in idx]
                else:
                    yield [(i, (seed, lo + t)) for t, i in enumerate(idx)]

        return batches()


def _clean_worker_message(e: UnreadableImage) -> UnreadableImage | None:
    """The original one-line message of an UnreadableImage re-raised from a DataLoader worker
    (whose message is "Caught UnreadableImage in DataLoader worker process N. Original Traceback
    ... UnreadableImage: <message>"), or None if ``e`` did not come from a worker."""
    text = str(e)
    if not text.startswith("Caught "):
        return None
    tag = f"{UnreadableImage.__name__}: "
    lines = [line for line in text.splitlines() if tag in line]
    return UnreadableImage(lines[-1].split(tag, 1)[1]) if lines else None


class _LoaderBox:
    """Holds a StreamSplit's DataLoader (and so its worker processes), apart from the split."""

    def __init__(self):
        self.loader: torch.utils.data.DataLoader | None = None

    def close(self) -> None:
        loader, self.loader = self.loader, None
        if loader is not None and loader._iterator is not None:
            # DataLoader has no public shutdown; its iterator's is what its __del__ calls
            loader._iterator._shutdown_workers()
            loader._iterator = None


class StreamSplit:
    """One split of an image-file dataset, streamed from disk: the counterpart of ``DeviceSplit``.

    ``batches(order, batch_size, epoch_seed)`` yields (x, y) on ``device`` for consecutive chunks
    of ``order`` (a training epoch); ``eval_batches(batch_size)`` yields the evaluation view in
    dataset order (feature extraction, evaluation). ``len(split)`` is the number of images and
    ``split.y`` the labels as an int64 tensor on the device, as for DeviceSplit.

    Randomness: a sample's augmentation uses only ``numpy.random.default_rng([epoch_seed,
    position])``, position being its index in ``order``; the DataLoader's per-worker seeds (torch's
    ``base_seed + worker_id``, from a private generator so the global torch RNG is never consumed)
    are unused, as are numpy's and Python's global generators. Batches are therefore the same for any
    ``num_workers`` (and a sample's view does not depend on ``batch_size`` either), and replaying
    (order, epoch_seed) — e.g. from the trainer's checkpointed generator — replays the epoch exactly.

    Workers: ``num_workers`` processes, started at the first iteration and kept alive across
    epochs and across train/eval iterations (``persistent_workers``; the batch sampler is a plan
    refilled before each iteration), each holding at most ``prefetch`` batches in flight. With
    ``num_workers=0`` images are decoded in the calling process. On a CUDA device batches come
    through pinned memory and are copied with ``non_blocking=True``. Memory held: the paths (one
    byte buffer, in each worker too), the labels and the in-flight batches (at most ``num_workers *
    prefetch`` of them, one with no workers); no decoded image is kept.

    One iteration at a time: the workers are shared, so starting a new ``batches``/``eval_batches``
    invalidates an unfinished one (which raises RuntimeError if resumed). ``close()`` (or using the
    split as a context manager) stops the workers; they also stop when the split is collected."""

    def __init__(
        self,
        root: str | os.PathLike,
        paths: Sequence[str],
        labels: Sequence[int],
        transform: Callable[[Image.Image, np.random.Generator | None], torch.Tensor],
        device="cpu",
        num_workers: int = 0,
        prefetch: int = 2,
        pin_memory: bool | None = None,
        multiprocessing_context=None,
    ):
        if num_workers < 0:
            raise ValueError(f"num_workers {num_workers} must be >= 0")
        if prefetch < 1:
            raise ValueError(f"prefetch {prefetch} must be >= 1")
        self.dataset = ImageListDataset(root, paths, labels, transform)
        self.device = torch.device(device)
        self.y = torch.as_tensor(self.dataset.labels).to(self.device)
        self.num_workers = int(num_workers)
        self.prefetch = int(prefetch)
        self.pin_memory = (self.device.type == "cuda") if pin_memory is None else bool(pin_memory)
        self.multiprocessing_context = multiprocessing_context
        self._plan = _BatchPlan()
        self._box = _LoaderBox()
        # Stop the workers when the split is collected. The box is referenced from the finalizer
        # registry, so even when the split dies in a reference cycle the loader's queues are not
        # part of the garbage: they are still open when the workers are told to exit (a loader
        # collected along with its queues cannot signal them and waits 5 s per worker instead).
        weakref.finalize(self, self._box.close)
        self._generation = 0

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def transform(self):
        return self.dataset.transform

    def _get_loader(self) -> torch.utils.data.DataLoader:
        if self._box.loader is None:
            workers = self.num_workers
            self._box.loader = torch.utils.data.DataLoader(
                self.dataset,
                batch_sampler=self._plan,
                num_workers=workers,
                persistent_workers=workers > 0,
                prefetch_factor=self.prefetch if workers else None,
                pin_memory=self.pin_memory,
                multiprocessing_context=self.multiprocessing_context if workers else None,
                # private generator: creating an iterator draws a base seed, which must not move
                # the global torch RNG (other code's random streams) — and the seed is unused
                generator=torch.Generator().manual_seed(0),
            )
        return self._box.loader

    def _iterate(self, order, batch_size: int, epoch_seed: int | None, drop_last: bool):
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size} must be >= 1")
        order = np.ascontiguousarray(torch.as_tensor(order).cpu().numpy(), dtype=np.int64).reshape(-1)
        if order.size and (order.min() < 0 or order.max() >= len(self)):
            raise IndexError(f"order holds indices outside 0..{len(self) - 1}")
        self._plan.set(order, int(batch_size), epoch_seed, bool(drop_last))
        self._generation += 1
        generation = self._generation
        loader = self._get_loader()
        # iter() here, not lazily: the plan just set is the one the (persistent) workers get
        it = iter(loader)
        return self._device_batches(it, generation)

    def _device_batches(self, it, generation: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        non_blocking = self.pin_memory and self.device.type == "cuda"
        while True:
            if generation != self._generation:
                raise RuntimeError("another iteration of this StreamSplit started; this one is invalid")
            try:
                x, y = next(it)
            except StopIteration:
                return
            except UnreadableImage as e:
                clean = _clean_worker_message(e)
                if clean is None:
                    raise
                raise clean from e
            yield x.to(self.device, non_blocking=non_blocking), y.to(self.device, non_blocking=non_blocking)

    def batches(
        self, order, batch_size: int, epoch_seed: int, drop_last: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Training batches: (x, y) for ``order[0:B]``, ``order[B:2B]``, ... on the device, the last
        partial batch kept unless ``drop_last``. ``order`` is a 1-d sequence of dataset indices (the
        CPU int64 tensor of ``study.data.samplers.epoch_order``); ``epoch_seed`` a non-negative int (see
        :func:`draw_epoch_seed`). The order and seed are checked and the workers given the epoch
        when this is called, before the first batch is requested."""
        epoch_seed = int(epoch_seed)
        if epoch_seed < 0:
            raise ValueError(f"epoch_seed {epoch_seed} must be non-negative")
        return self._iterate(order, batch_size, epoch_seed, drop_last)

    def eval_batches(self, batch_size: int, order=None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Evaluation batches: the transform's deterministic view (no augmentation) of ``order``
        (default: every image in dataset order), e.g. to extract features once."""
        if order is None:
            order = np.arange(len(self), dtype=np.int64)
        return self._iterate(order, batch_size, None, False)

    def close(self) -> None:
        """Stop the worker processes (a later iteration starts new ones)."""
        self._generation += 1
        self._box.close()

    def __enter__(self) -> StreamSplit:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
