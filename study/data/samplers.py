"""Kang et al.'s class-aware sampler, exactly as their code runs it.

``study.data.lt.epoch_order(..., "class-balanced", ...)`` reimplements the *scheme* of the decoupling
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
            out.extend(self.items[self.i + 1:self.i + 1 + got])
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
            raise ValueError(f"KangClassAwareSampler: labels must lie in [0, {num_classes}), "
                             f"found {int(labels.min())}..{int(labels.max())}")
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
            raise ValueError(f"KangClassAwareSampler state: version {state.get('version')!r}, "
                             f"expected {_STATE_VERSION}")
        if int(state["num_samples_cls"]) != self.num_samples_cls:
            raise ValueError(f"KangClassAwareSampler state: num_samples_cls {int(state['num_samples_cls'])}, "
                             f"this sampler's is {self.num_samples_cls}")
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
