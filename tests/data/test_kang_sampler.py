"""study.data.samplers.KangClassAwareSampler: Kang et al.'s class-aware sampler with persistent cycles
(facebookresearch/classifier-balancing, data/ClassAwareSampler.py, and run_networks.py's
``epoch_steps``), checked against a transcription of their code."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from study.data.samplers import KangClassAwareSampler

# --- a direct transcription of Kang et al.'s code ---------------------------------------------------
# Line for line data/ClassAwareSampler.py, with ``random.shuffle(self.data_list)`` replaced by
# ``_shuffle(self.data_list, gen)`` (the same in-place shuffle, random numbers from the generator).


def _shuffle(x: list, gen: torch.Generator) -> None:
    perm = torch.randperm(len(x), generator=gen).tolist()
    x[:] = [x[p] for p in perm]


class RandomCycleIter:
    def __init__(self, data, gen, test_mode=False):
        self.data_list = list(data)
        self.length = len(self.data_list)
        self.i = self.length - 1
        self.test_mode = test_mode
        self.gen = gen

    def __iter__(self):
        return self

    def __next__(self):
        self.i += 1

        if self.i == self.length:
            self.i = 0
            if not self.test_mode:
                _shuffle(self.data_list, self.gen)

        return self.data_list[self.i]


def class_aware_sample_generator(cls_iter, data_iter_list, n, num_samples_cls=1):

    i = 0
    j = 0
    while i < n:
        if j >= num_samples_cls:
            j = 0

        if j == 0:
            temp_tuple = next(zip(*[data_iter_list[next(cls_iter)]] * num_samples_cls))
            yield temp_tuple[j]
        else:
            yield temp_tuple[j]

        i += 1
        j += 1


class ClassAwareSampler(Sampler):
    def __init__(self, data_source, gen, num_samples_cls=1):
        num_classes = len(set(data_source.labels))  # len(np.unique(data_source.labels))
        self.class_iter = RandomCycleIter(range(num_classes), gen)
        cls_data_list = [list() for _ in range(num_classes)]
        for i, label in enumerate(data_source.labels):
            cls_data_list[label].append(i)
        self.data_iter_list = [RandomCycleIter(x, gen) for x in cls_data_list]
        self.num_samples = max([len(x) for x in cls_data_list]) * len(cls_data_list)
        self.num_samples_cls = num_samples_cls

    def __iter__(self):
        return class_aware_sample_generator(
            self.class_iter, self.data_iter_list, self.num_samples, self.num_samples_cls
        )

    def __len__(self):
        return self.num_samples


class _Indices(Dataset):
    """LT_Dataset reduced to what the sampler and loop see: ``labels``, and items that are the index."""

    def __init__(self, labels):
        self.labels = list(labels)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return index


def kang_training_loop(labels, gen, batch_size, epochs, num_workers, num_samples_cls=4):
    """run_networks.py's loop over a real DataLoader (dataloader.py: shuffle=False, sampler=...):
    ``epoch_steps = int(len(dataset) / batch_size)``, ``if step == self.epoch_steps: break``.
    Returns the indices each epoch trains on."""
    dataset = _Indices(labels)
    loader = DataLoader(
        dataset=dataset,
        batch_size=batch_size,
        shuffle=False,
        sampler=ClassAwareSampler(dataset, gen, num_samples_cls),
        num_workers=num_workers,
    )
    epoch_steps = int(len(loader.dataset) / batch_size)
    out = []
    for _ in range(epochs):
        used = []
        for step, indexes in enumerate(loader):
            if step == epoch_steps:
                break
            used.append(indexes)
        out.append(torch.cat(used) if used else torch.zeros(0, dtype=torch.int64))
    return out


def kang_stream(labels, gen, batch_size, epochs, num_samples_cls=4):
    """Kang's sampler consumed exactly floor(N/B)*B indices per epoch (no read-ahead)."""
    sampler = ClassAwareSampler(_Indices(labels), gen, num_samples_cls)
    used = (len(labels) // batch_size) * batch_size
    return [torch.tensor(list(itertools.islice(iter(sampler), used)), dtype=torch.int64) for _ in range(epochs)]


# --- helpers ---------------------------------------------------------------------------------------


def _labels(counts, seed=0):
    """Labels with the given class sizes, in a shuffled dataset order."""
    lab = torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(counts)])
    return lab[torch.randperm(len(lab), generator=torch.Generator().manual_seed(seed))]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


COUNTS = [40, 17, 9, 5, 3, 1]  # long-tailed, with a class of one image


# --- tests -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_counts, batch", [(COUNTS, 8), (COUNTS, 6), (COUNTS, 75), (COUNTS, 7), ([3, 2], 64)])
def test_epoch_returns_floor_n_over_b_times_b_indices(n_counts, batch):
    labels = _labels(n_counts)
    n = len(labels)
    s = KangClassAwareSampler(labels, len(n_counts), _gen())
    for _ in range(4):
        idx = s.epoch(batch)
        assert idx.dtype == torch.int64 and idx.shape == ((n // batch) * batch,)
        assert s.epoch_length(batch) == (n // batch) * batch
        if idx.numel():
            assert 0 <= int(idx.min()) and int(idx.max()) < n


def test_class_visits_come_in_complete_cycles_of_all_classes_with_4_images_each():
    labels = _labels(COUNTS)
    C = len(COUNTS)
    s = KangClassAwareSampler(labels, C, _gen(3))
    # B a multiple of 4 and no read-ahead: the epochs concatenate to the uninterrupted visit stream
    stream = torch.cat([s.epoch(12) for _ in range(10)])
    assert stream.numel() % 4 == 0
    runs = labels[stream].view(-1, 4)
    assert (runs == runs[:, :1]).all(), "each visit is 4 consecutive images of one class"
    visits = runs[:, 0].tolist()
    full = len(visits) // C
    assert full >= 5
    for m in range(full):
        assert sorted(visits[m * C : (m + 1) * C]) == list(range(C)), "every block of C visits is a permutation"
        seen = torch.bincount(torch.tensor(visits[: (m + 1) * C]), minlength=C)
        assert (seen == m + 1).all(), "after m full class cycles every class was visited m times"
    # and consecutive class cycles are reshuffled, not repeated
    assert len({tuple(visits[m * C : (m + 1) * C]) for m in range(full)}) > 1


def test_within_a_class_images_are_drawn_without_replacement_in_each_of_its_cycles():
    labels = _labels(COUNTS)
    s = KangClassAwareSampler(labels, len(COUNTS), _gen(5))
    stream = torch.cat([s.epoch(16) for _ in range(12)])
    for c, n_c in enumerate(COUNTS):
        members = torch.nonzero(labels == c).flatten()
        drawn = stream[labels[stream] == c].tolist()
        assert len(drawn) >= 2 * n_c, "several complete cycles of every class"
        for start in range(0, len(drawn), n_c):
            chunk = drawn[start : start + n_c]
            if len(chunk) == n_c:
                assert sorted(chunk) == sorted(members.tolist()), f"class {c}: a cycle is a permutation"
            else:
                assert len(set(chunk)) == len(chunk), f"class {c}: the open cycle has no repeats"
        # hence at every point any two images of the class differ by at most one draw, and they are
        # equal after each completed cycle
        counts = dict.fromkeys(members.tolist(), 0)
        for t, i in enumerate(drawn, 1):
            counts[i] += 1
            assert max(counts.values()) - min(counts.values()) <= 1
            if t % n_c == 0:
                assert len(set(counts.values())) == 1


def test_cycles_continue_across_epochs_instead_of_starting_fresh():
    labels = _labels(COUNTS)
    gen = _gen(11)
    s = KangClassAwareSampler(labels, len(COUNTS), gen)
    e1 = s.epoch(20)
    g_state = gen.get_state()
    e2 = s.epoch(20)
    # a sampler created anew at epoch 2 (same generator state) starts fresh cycles: another order
    fresh_gen = torch.Generator()
    fresh_gen.set_state(g_state)
    fresh = KangClassAwareSampler(labels, len(COUNTS), fresh_gen).epoch(20)
    assert not torch.equal(e2, fresh)
    # the persistent one continues each class's cycle where epoch 1 left it: over e1 + e2 every class
    # still draws its images in complete cycles (a class with 40 images is mid-cycle at the boundary)
    both = torch.cat([e1, e2])
    drawn = both[labels[both] == 0].tolist()
    d1 = int((labels[e1] == 0).sum())
    assert 0 < d1 % 40, "class 0's cycle is open at the epoch boundary"
    assert len(set(drawn[:40])) == min(40, len(drawn))
    # and it is exactly Kang et al.'s stream over the two epochs
    ref = kang_stream(labels.tolist(), _gen(11), 20, 2)
    assert torch.equal(e1, ref[0]) and torch.equal(e2, ref[1])


@pytest.mark.parametrize(
    "counts, batch, k",
    [(COUNTS, 8, 4), (COUNTS, 6, 4), (COUNTS, 7, 3), ([5, 5, 5, 5], 4, 4), ([1, 1, 2], 3, 4), (COUNTS, 10, 1)],
)
def test_identical_to_a_direct_transcription_of_kangs_generator(counts, batch, k):
    labels = _labels(counts, seed=2)
    ours = KangClassAwareSampler(labels, len(counts), _gen(7), num_samples_cls=k)
    got = [ours.epoch(batch) for _ in range(6)]
    ref = kang_stream(labels.tolist(), _gen(7), batch, 6, num_samples_cls=k)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_lookahead_replays_kangs_training_loop_over_a_real_dataloader(num_workers):
    # the loop fetches the batch at step == epoch_steps before breaking, and a multi-process loader
    # keeps 2 * num_workers batches in flight: (1 + 2 * num_workers) batches drawn and dropped
    labels = _labels(COUNTS, seed=4)
    gen_ref, gen_ours = _gen(9), _gen(9)
    ref = kang_training_loop(labels.tolist(), gen_ref, 6, 3, num_workers)
    ours = KangClassAwareSampler(labels, len(COUNTS), gen_ours)
    got = [ours.epoch(6, lookahead_batches=1 + 2 * num_workers) for _ in range(3)]
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    assert torch.equal(gen_ref.get_state(), gen_ours.get_state())
    # without the read-ahead the second epoch differs: the dropped batches did advance the cycles
    plain = KangClassAwareSampler(labels, len(COUNTS), _gen(9))
    p = [plain.epoch(6) for _ in range(2)]
    assert torch.equal(p[0], ref[0]) and not torch.equal(p[1], ref[1])


def test_state_dict_round_trip_mid_stream_continues_identically(tmp_path):
    labels = _labels(COUNTS)
    gen = _gen(13)
    s = KangClassAwareSampler(labels, len(COUNTS), gen)
    s.epoch(7)  # 7: epochs end inside a 4-tuple and inside class cycles
    s.epoch(7)
    torch.save({"sampler": s.state_dict(), "gen": gen.get_state()}, tmp_path / "ckpt.pt")
    expect = [s.epoch(7) for _ in range(4)]

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    gen2 = torch.Generator()
    gen2.set_state(ckpt["gen"])
    s2 = KangClassAwareSampler(labels, len(COUNTS), gen2)
    s2.load_state_dict(ckpt["sampler"])
    got = [s2.epoch(7) for _ in range(4)]
    for a, b in zip(got, expect):
        assert torch.equal(a, b)
    assert torch.equal(gen.get_state(), gen2.get_state())
    assert all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
        for x, y in zip(s.state_dict().values(), s2.state_dict().values())
    )


def test_load_state_dict_rejects_a_state_of_other_labels_and_leaves_the_sampler_alone():
    labels = _labels(COUNTS)
    s = KangClassAwareSampler(labels, len(COUNTS), _gen())
    s.epoch(8)
    other = KangClassAwareSampler(_labels([40, 17, 9, 5, 4, 1]), 6, _gen())
    before = other.state_dict()
    with pytest.raises(ValueError, match="other labels"):
        other.load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="num_samples_cls"):
        KangClassAwareSampler(labels, len(COUNTS), _gen(), num_samples_cls=2).load_state_dict(s.state_dict())
    bad = s.state_dict()
    bad["data_pos"][0] = 10_000
    with pytest.raises(ValueError, match="out of range"):
        KangClassAwareSampler(labels, len(COUNTS), _gen()).load_state_dict(bad)
    assert all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
        for x, y in zip(before.values(), other.state_dict().values())
    )


def test_empty_classes_are_never_drawn():
    # classes 1 and 4 are empty: the stream is Kang's for the labels renumbered 0..3, and the
    # empty classes take no visits (the four present ones are visited equally often)
    dense = _labels([12, 7, 3, 2], seed=6)
    sparse = torch.tensor([0, 2, 3, 5])[dense]
    s = KangClassAwareSampler(sparse, 6, _gen(21))
    got = [s.epoch(8) for _ in range(5)]
    ref = kang_stream(dense.tolist(), _gen(21), 8, 5)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    visits = sparse[torch.cat(got)].view(-1, 4)[:, 0]
    per_class = torch.bincount(visits, minlength=6)
    assert per_class[1] == 0 and per_class[4] == 0
    assert int(per_class[[0, 2, 3, 5]].max() - per_class[[0, 2, 3, 5]].min()) <= 1


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="labels must lie"):
        KangClassAwareSampler(torch.tensor([0, 3]), 3, _gen())
    with pytest.raises(ValueError, match="no labels"):
        KangClassAwareSampler(torch.zeros(0, dtype=torch.int64), 3, _gen())
    s = KangClassAwareSampler(torch.tensor([0, 1, 1]), 2, _gen())
    with pytest.raises(ValueError, match="batch_size"):
        s.epoch(0)
