"""How an epoch's batches are drawn: :func:`epoch_order` (the instance, class-balanced,
square-root and progressive samplers of Kang et al., a fresh draw per epoch from the trainer's
generator) and :class:`KangClassAwareSampler` (their class-aware sampler exactly, with cycles that
persist across epochs).

**Kang et al.'s class-aware sampler, exactly as their code runs it.**

``study.data.samplers.epoch_order(..., "class-balanced", ...)`` reimplements the *scheme* of the decoupling
paper's class-aware sampler but starts fresh cycles every epoch and draws N indices. The authors'
code (facebookresearch/classifier-balancing, ``data/ClassAwareSampler.py``) differs in two ways that
:class:`KangClassAwareSampler` reproduces:

1. The cycles persist. ``ClassAwareSampler.__init__`` creates one ``RandomCycleIter`` over the
   classes and one per class over its image indices, once; every epoch's ``__iter__`` builds a new
   ``class_aware_sample_generator`` over those same iterators, so an epoch continues the class cycle
   and every class's image cycle where the previous epoch left them.
2. An epoch is ``epoch_steps = int(len(dataset) / batch_size)`` batches (``run_networks.py``: the
   training loop breaks at ``step == self.epoch_steps``), i.e. floor(N/B)*B images, although the
   sampler's ``__len__`` is max_c(n_c) * C.

The stream, with every random number drawn from the trainer's ``torch.Generator``:

- ``RandomCycleIter``: a list (the classes, or a class's image indices, initially in increasing
  order) and a position ``i`` that starts at ``len - 1``; ``next`` advances ``i`` and, when it reaches
  ``len``, sets it to 0 and shuffles the list *in place* first (``random.shuffle``; here the list is
  permuted by ``torch.randperm(len, generator=gen)``). The first draw therefore shuffles, and each
  later cycle is a shuffle of the previous cycle's order. The shuffle happens lazily, at the draw that
  needs the new cycle, which fixes the order of the random-number calls (class cycle first, then that
  class's image cycle).
- ``class_aware_sample_generator``: ``next(zip(*[data_iter_list[next(cls_iter)]] * k))`` takes the
  next class from the class cycle and then k = ``num_samples_cls`` consecutive images from that
  class's cycle (a class cycle may wrap, and reshuffle, inside the k); the k images are yielded one by
  one. A fresh generator starts every epoch with a fresh tuple, so when an epoch ends inside a tuple
  (floor(N/B)*B not a multiple of k) the rest of that tuple, already taken from the class's cycle, is
  never used.

Hence: the class visits come in consecutive blocks of C (the number of non-empty classes), each a
permutation of the classes, so after m*C visits every class has been visited m times (k images
each); the images a class contributes come in consecutive blocks of n_c, each a permutation of the
class's images, so within a class any two images have been drawn a number of times that differs by
at most 1 at every point, and exactly equally often after each completed cycle of the class.

What this does not reproduce by default is the DataLoader's read-ahead: the sampler is iterated in
the main process ahead of training, by one batch for the ``step == epoch_steps`` that ends the loop
plus the ``prefetch_factor * num_workers`` batches the multi-process loader keeps in flight (2 *
``num_workers``: the fixed prefetch of PyTorch 0.4-1.6, ``prefetch_factor``'s default since 1.7).
So Kang et al.'s runs draw and discard (1 + 2 * num_workers) * B indices at the end of every epoch
(their ImageNet-LT configs: 12 workers, B = 512, 12,800 indices, about 11 % of an epoch).
``epoch(batch_size, lookahead_batches=1 + 2 * num_workers)`` draws and discards them too, for a
bit-for-bit replay of their stream; the default 0 is the sampler's own stream. Either way the
per-class statistics are those of the scheme above.

Empty classes (n_c = 0) are left out of the class cycle, so they are never drawn (Kang et al.'s code
assumes labels 0..C-1 all present; with contiguous labels the two agree exactly, and with gaps the
stream is theirs for the labels renumbered in increasing order).
"""

from __future__ import annotations

import torch

from study.config.datasets import EPOCH_SAMPLERS
from study.errors import UserError, unknown

_STATE_VERSION = 1


class _Cycle:
    """Kang et al.'s ``RandomCycleIter``: ``items`` in the current cycle's order and ``i`` the
    position of the last item handed out (``len - 1`` before the first draw, so that it shuffles)."""

    __slots__ = ("i", "items")

    def __init__(self, items: list[int], i: int | None = None):
        self.items = items
        self.i = len(items) - 1 if i is None else i

    def take(self, k: int, gen: torch.Generator, out: list[int]) -> None:
        """Append the next ``k`` items to ``out``, reshuffling at every wrap as ``RandomCycleIter``
        does (in place: a new cycle is a permutation of the previous cycle's order)."""
        n = len(self.items)
        while k:
            if self.i + 1 == n:
                perm = torch.randperm(n, generator=gen).tolist()
                self.items = [self.items[p] for p in perm]
                self.i = -1
            got = min(k, n - 1 - self.i)
            out.extend(self.items[self.i + 1 : self.i + 1 + got])
            self.i += got
            k -= got


class KangClassAwareSampler:
    """The persistent class-aware stream of Kang et al. (see the module docstring).

    ``labels``: the training labels (a 1-d integer tensor or sequence, values in ``[0, num_classes)``);
    ``gen``: the trainer's CPU ``torch.Generator``, from which every random number is drawn (it is
    *not* part of :meth:`state_dict`: the trainer checkpoints it); ``num_samples_cls``: images per
    class visit (4 in all of Kang et al.'s configs).

    Create it once per training stage and call :meth:`epoch` once per epoch.
    """

    def __init__(self, labels, num_classes: int, gen: torch.Generator, num_samples_cls: int = 4):
        labels = torch.as_tensor(labels).cpu().to(torch.int64).flatten()
        num_classes = int(num_classes)
        if labels.numel() == 0:
            raise ValueError("KangClassAwareSampler: no labels")
        if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
            raise ValueError(
                f"KangClassAwareSampler: labels must lie in [0, {num_classes}), "
                f"found {int(labels.min())}..{int(labels.max())}"
            )
        if int(num_samples_cls) < 1:
            raise ValueError(f"KangClassAwareSampler: num_samples_cls must be >= 1, got {num_samples_cls}")
        self.gen = gen
        self.num_classes = num_classes
        self.num_samples_cls = int(num_samples_cls)
        self.n = int(labels.numel())
        # indices of each class in increasing order, as Kang's cls_data_list (built by enumerate)
        order = torch.argsort(labels, stable=True)
        counts = torch.bincount(labels, minlength=num_classes)
        self.classes: list[int] = [c for c in range(num_classes) if int(counts[c])]
        self.counts: list[int] = [int(counts[c]) for c in self.classes]
        per_class = torch.split(order, [int(x) for x in counts.tolist()])
        self._class_cycle = _Cycle(list(self.classes))
        self._cycles: dict[int, _Cycle] = {c: _Cycle(per_class[c].tolist()) for c in self.classes}
        self.num_samples = max(self.counts) * len(self.classes)
        """Kang et al.'s ``__len__`` (max_c n_c * C): the most one epoch's generator can yield."""

    def epoch_length(self, batch_size: int) -> int:
        """floor(N / B) * B, the number of indices :meth:`epoch` returns."""
        return (self.n // int(batch_size)) * int(batch_size)

    def epoch(self, batch_size: int, lookahead_batches: int = 0) -> torch.Tensor:
        """The next epoch: floor(N / B) * B training-split indices (CPU int64), in Kang et al.'s order,
        continuing the persistent cycles.

        One epoch's generator starts with a fresh k-tuple (``num_samples_cls``) and yields at most
        :attr:`num_samples` indices; ``lookahead_batches`` further batches are drawn after the
        epoch's and discarded, as Kang et al.'s DataLoader does (``1 + 2 * num_workers``, see the
        module docstring). The indices of a partly used last tuple are consumed from their class's
        cycle either way, as in their code.
        """
        batch_size, lookahead_batches = int(batch_size), int(lookahead_batches)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if lookahead_batches < 0:
            raise ValueError(f"lookahead_batches must be >= 0, got {lookahead_batches}")
        used = self.epoch_length(batch_size)
        # the generator of one epoch stops after num_samples (>= N >= used) indices
        drawn = min(used + lookahead_batches * batch_size, self.num_samples)
        k = self.num_samples_cls
        out: list[int] = []
        visit: list[int] = []
        for _ in range(-(-drawn // k)):  # the generator draws a whole k-tuple at its first index
            visit.clear()
            self._class_cycle.take(1, self.gen, visit)
            self._cycles[visit[0]].take(k, self.gen, out)
        return torch.tensor(out[:used], dtype=torch.int64)

    def state_dict(self) -> dict:
        """Everything needed to continue the stream exactly (with the generator restored by the
        trainer): the current order and position of the class cycle and of every class's cycle, as
        tensors and ints (``torch.load(weights_only=True)`` reads it back). The class list and counts
        are kept to check that a checkpoint is loaded into a sampler over the same labels."""
        return {
            "version": _STATE_VERSION,
            "num_samples_cls": self.num_samples_cls,
            "classes": torch.tensor(self.classes, dtype=torch.int64),
            "counts": torch.tensor(self.counts, dtype=torch.int64),
            "class_cycle": torch.tensor(self._class_cycle.items, dtype=torch.int64),
            "class_pos": int(self._class_cycle.i),
            # every class's cycle order, concatenated in the order of "classes" (lengths: "counts")
            "data_cycles": torch.tensor([x for c in self.classes for x in self._cycles[c].items], dtype=torch.int64),
            "data_pos": torch.tensor([self._cycles[c].i for c in self.classes], dtype=torch.int64),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`'s output. Raises ``ValueError`` when it was taken from a
        sampler over other labels or with another ``num_samples_cls``, or is inconsistent; the
        sampler is unchanged then."""
        if int(state.get("version", -1)) != _STATE_VERSION:
            raise ValueError(
                f"KangClassAwareSampler state: version {state.get('version')!r}, expected {_STATE_VERSION}"
            )
        if int(state["num_samples_cls"]) != self.num_samples_cls:
            raise ValueError(
                f"KangClassAwareSampler state: num_samples_cls {int(state['num_samples_cls'])}, "
                f"this sampler's is {self.num_samples_cls}"
            )
        if state["classes"].tolist() != self.classes or state["counts"].tolist() != self.counts:
            raise ValueError("KangClassAwareSampler state: taken over other labels (classes or class sizes differ)")
        class_items = state["class_cycle"].tolist()
        if sorted(class_items) != self.classes:
            raise ValueError("KangClassAwareSampler state: class_cycle is not a permutation of the classes")
        class_pos = int(state["class_pos"])
        if not 0 <= class_pos < len(class_items):
            raise ValueError(f"KangClassAwareSampler state: class_pos {class_pos} out of range")
        segments = torch.split(state["data_cycles"], self.counts)
        positions = state["data_pos"].tolist()
        if len(positions) != len(self.classes):
            raise ValueError("KangClassAwareSampler state: data_pos has the wrong length")
        cycles: dict[int, _Cycle] = {}
        for c, seg, pos in zip(self.classes, segments, positions):
            items = seg.tolist()
            # the same images as this sampler's class c (its cycle holds them in increasing order
            # before the first draw, and in some order after)
            if sorted(items) != sorted(self._cycles[c].items):
                raise ValueError(f"KangClassAwareSampler state: class {c}'s cycle holds other images")
            if not 0 <= pos < len(items):
                raise ValueError(f"KangClassAwareSampler state: class {c}'s position {pos} out of range")
            cycles[c] = _Cycle(items, pos)
        self._class_cycle = _Cycle(class_items, class_pos)
        self._cycles = cycles


# --- samplers drawn afresh every epoch ------------------------------------------------------------


def _class_index(labels, num_classes: int):
    """Per-class image counts (length ``num_classes``) and the dataset indices grouped by class
    (ascending class, each class's indices ascending) with each class's start offset."""
    import torch

    counts = torch.bincount(labels, minlength=num_classes)[:num_classes]
    grouped = torch.argsort(labels, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    return counts, grouped, starts


def _class_draws(labels, num_classes: int, probs, gen):
    """N draws of the multinomial-class + per-class-cycle scheme: each draw picks a class from
    ``probs`` (one ``torch.multinomial`` call, with replacement, over the non-empty classes only),
    then the class's next image from its own reshuffled cycle. A class drawn k_c times with n_c
    images takes the first k_c entries of ceil(k_c / n_c) concatenated random permutations of its
    images (each permutation the argsort of n_c float64 uniforms), so its images are drawn without
    replacement as far as possible: within a class, the draw counts of any two images differ by at
    most 1. Random numbers: the class draw first, then one ``torch.rand`` per drawn class in
    ascending class order — all from ``gen``."""
    import torch

    n = int(labels.shape[0])
    counts, grouped, starts = _class_index(labels, num_classes)
    present = torch.nonzero(counts > 0).flatten()
    if n == 0 or present.numel() == 0:
        return torch.empty(0, dtype=torch.int64)
    p = probs.to(torch.float64)[present]
    cls = present[torch.multinomial(p, n, replacement=True, generator=gen)]  # class of each draw
    drawn = torch.bincount(cls, minlength=num_classes)
    slots = torch.argsort(cls, stable=True)  # draw positions grouped by class, in draw order
    fills = []
    for c in present.tolist():
        k, nc = int(drawn[c]), int(counts[c])
        if k == 0:
            continue
        cycles = -(-k // nc)
        perm = torch.rand(cycles, nc, generator=gen, dtype=torch.float64).argsort(dim=1).flatten()[:k]
        fills.append(grouped[int(starts[c]) + perm])
    out = torch.empty(n, dtype=torch.int64)
    out[slots] = torch.cat(fills)
    return out


def epoch_order(labels, num_classes: int, sampler: str, gen, epoch: int = 0, epochs: int = 1):
    """Indices for one epoch (CPU int64 tensor of length N = ``len(labels)``), the stage-1 samplers
    of Kang et al. (ICLR 2020), with n_c the number of images of class c in ``labels``, C the number
    of non-empty classes, and every random number drawn from ``gen`` (a CPU ``torch.Generator``), so
    the order is a function of the generator state and a resumed run replays it exactly. Empty
    classes (n_c = 0) are never drawn.

    ``instance``: a random permutation (p_c = n_c / N, each image exactly once).

    ``class-balanced``: the decoupling paper's class-aware sampler — classes visited in reshuffled
    cycles, 4 consecutive images per visit taken from the class's own reshuffled cycle — until N
    indices are drawn, so every non-empty class gets N / C images up to ±4. (Kang et al. keep the
    cycles' positions across epochs; here each epoch starts fresh cycles so that a checkpoint only
    needs the generator.)

    ``square-root``: p_c ∝ n_c^(1/2). N draws, each a class from p (one ``torch.multinomial`` with
    replacement) and then that class's next image from its own reshuffled cycle (a per-class
    permutation, reshuffled when exhausted): images of a class are drawn without replacement as far
    as possible — any two images of a class are drawn a number of times that differs by at most 1.

    ``progressive``: p_c(t) = (1 − t/T)·n_c/N + (t/T)·1/C with t/T = ``epoch`` / (``epochs`` − 1)
    (0 when ``epochs`` == 1; ``epoch`` counts from 0), interpolating from instance-balanced at the
    first epoch to class-balanced at the last. At t/T == 0 the order is exactly ``instance``'s and at
    t/T == 1 exactly ``class-balanced``'s (the same tensor for the same generator state); strictly
    between, the class-draw + per-class-cycle scheme of ``square-root`` with p(t).

    ``epoch`` and ``epochs`` only matter to ``progressive`` (0 <= ``epoch`` < ``epochs`` there).
    """
    import torch

    if sampler not in EPOCH_SAMPLERS:
        raise UserError(unknown("sampler", str(sampler), EPOCH_SAMPLERS))
    labels = torch.as_tensor(labels).cpu()
    n = int(labels.shape[0])
    if sampler == "progressive":
        epoch, epochs = int(epoch), int(epochs)
        if epochs < 1 or not 0 <= epoch < epochs:
            raise ValueError(f"progressive sampler: epoch {epoch} outside 0..{epochs - 1} (epochs {epochs})")
        if epochs == 1 or epoch == 0:
            sampler = "instance"
        elif epoch == epochs - 1:
            sampler = "class-balanced"
        else:
            labels = labels.to(torch.int64)
            counts = torch.bincount(labels, minlength=num_classes)[:num_classes].to(torch.float64)
            present = (counts > 0).to(torch.float64)
            a = epoch / (epochs - 1)
            probs = (1 - a) * counts / counts.sum() + a * present / present.sum()
            return _class_draws(labels, num_classes, probs, gen)
    if sampler == "square-root":
        labels = labels.to(torch.int64)
        counts = torch.bincount(labels, minlength=num_classes)[:num_classes].to(torch.float64)
        return _class_draws(labels, num_classes, counts.sqrt(), gen)
    if sampler == "instance":
        return torch.randperm(n, generator=gen)
    per_class = [torch.nonzero(labels == c).flatten() for c in range(num_classes)]
    present = [c for c in range(num_classes) if per_class[c].numel()]
    queues = {c: per_class[c][torch.randperm(per_class[c].numel(), generator=gen)].tolist() for c in present}
    pos = {c: 0 for c in present}
    out: list[int] = []
    class_cycle: list[int] = []
    while len(out) < n:
        if not class_cycle:
            class_cycle = [present[i] for i in torch.randperm(len(present), generator=gen).tolist()]
        c = class_cycle.pop()
        for _ in range(4):
            if pos[c] == len(queues[c]):
                queues[c] = per_class[c][torch.randperm(per_class[c].numel(), generator=gen)].tolist()
                pos[c] = 0
            out.append(queues[c][pos[c]])
            pos[c] += 1
    return torch.tensor(out[:n], dtype=torch.int64)
