"""GroupedBatchSampler: aspect groups, rank sharding, per-epoch determinism, mid-epoch state."""
import pytest
from lightning_fabric.utilities.data import _set_sampler_epoch
from torch.utils.data import DataLoader

from htc_lightning.data.samplers import GroupedBatchSampler

GROUPS = [0, 1, 1, 0, 0, 0, 1, 0, 1, 1, 0, 0, 1, 0, 0, 1, 0, 0, 0, 1, 1, 0, 0]  # 23 images, two orientations


def test_batches_hold_one_group_except_the_leftover_batch():
    batches = list(GroupedBatchSampler(GROUPS, 3, seed=1))
    mixed = [b for b in batches if len({GROUPS[i] for i in b}) > 1]
    assert len(mixed) <= 1 and (not mixed or mixed[0] is batches[-1])
    assert all(len(b) == 3 for b in batches[:-1])
    assert sorted(i for b in batches for i in b) == list(range(len(GROUPS)))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_cover_the_dataset_with_equal_batch_counts(world):
    samplers = [GroupedBatchSampler(GROUPS, 2, seed=0, num_replicas=world, rank=r) for r in range(world)]
    per_rank = [[i for b in s for i in b] for s in samplers]
    assert len({len(s) for s in samplers}) == 1
    assert all(len(list(s.batches())) == len(s) for s in samplers)
    assert set().union(*per_rank) == set(range(len(GROUPS)))
    # DistributedSampler-style padding repeats exactly the shortfall, nothing else
    assert sum(map(len, per_rank)) - len(GROUPS) == -len(GROUPS) % world


def test_ranks_are_disjoint_when_the_dataset_divides_evenly():
    groups = GROUPS[:21]
    shards = [{i for b in GroupedBatchSampler(groups, 2, num_replicas=3, rank=r) for i in b} for r in range(3)]
    assert sum(map(len, shards)) == 21 and len(set().union(*shards)) == 21


def test_same_seed_and_epoch_give_the_same_batches():
    a, b = GroupedBatchSampler(GROUPS, 2, seed=5), GroupedBatchSampler(GROUPS, 2, seed=5)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b)


def test_epochs_and_seeds_reshuffle():
    a = GroupedBatchSampler(GROUPS, 2, seed=5)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    assert GroupedBatchSampler(GROUPS, 2, seed=6).batches() != GroupedBatchSampler(GROUPS, 2, seed=5).batches()


def test_no_shuffle_keeps_index_order_within_groups():
    batches = GroupedBatchSampler(GROUPS, 2, shuffle=False).batches()
    for b in batches[:-1]:
        assert b == sorted(b)


def test_state_round_trip_resumes_mid_epoch_with_the_same_order():
    original = GroupedBatchSampler(GROUPS, 2, seed=9, num_replicas=2, rank=1)
    original.set_epoch(4)
    it = iter(original)
    seen = [next(it) for _ in range(3)]
    state = original.state_dict()
    assert state == {"epoch": 4, "batches_yielded": 3}
    rest = list(it)

    resumed = GroupedBatchSampler(GROUPS, 2, seed=9, num_replicas=2, rank=1)
    resumed.load_state_dict(state)
    resumed.set_epoch(4)  # Lightning sets the same epoch again: the position is kept
    assert list(resumed) == rest
    fresh = GroupedBatchSampler(GROUPS, 2, seed=9, num_replicas=2, rank=1)
    fresh.set_epoch(4)
    assert seen + rest == list(fresh)
    assert resumed.state_dict() == {"epoch": 4, "batches_yielded": 0}


def test_the_epoch_is_the_callers_a_pass_without_set_epoch_replays_it():
    # as DistributedSampler: the caller (Lightning, through batch_sampler.sampler) owns the epoch
    s = GroupedBatchSampler(GROUPS, 2, seed=5)
    first = list(s)
    assert s.epoch == 0 and list(s) == first


def test_set_epoch_to_another_epoch_drops_a_restored_position():
    s = GroupedBatchSampler(GROUPS, 2)
    s.load_state_dict({"epoch": 2, "batches_yielded": 4})
    s.set_epoch(3)
    assert len(list(s)) == len(s)


def test_load_state_dict_rejects_a_position_past_the_epoch():
    with pytest.raises(ValueError, match="batches_yielded"):
        GroupedBatchSampler(GROUPS, 2).load_state_dict({"epoch": 0, "batches_yielded": 99})


def test_lightning_set_epoch_reaches_the_batch_sampler():
    sampler = GroupedBatchSampler(GROUPS, 2)
    loader = DataLoader(list(range(len(GROUPS))), batch_sampler=sampler)
    _set_sampler_epoch(loader, 7)
    assert sampler.epoch == 7


def test_rank_defaults_without_torch_distributed():
    s = GroupedBatchSampler(GROUPS, 2)
    assert (s.num_replicas, s.rank) == (1, 0)
    with pytest.raises(ValueError, match="rank 2"):
        GroupedBatchSampler(GROUPS, 2, num_replicas=2, rank=2)


def test_group_ids_must_be_integers():
    with pytest.raises(TypeError, match="group_ids"):
        GroupedBatchSampler(object(), 2)


def test_with_seeds_pairs_each_index_with_a_seed_of_seed_epoch_and_index():
    plain = list(GroupedBatchSampler(GROUPS, 2, seed=3))
    seeded = GroupedBatchSampler(GROUPS, 2, seed=3, with_seeds=True)
    first = list(seeded)
    assert [[i for i, _ in b] for b in first] == plain
    seeds = [s for b in first for _, s in b]
    assert len(set(seeds)) == len(seeds)
    seeded.set_epoch(1)
    second = {i: s for b in seeded for i, s in b}
    assert all(second[i] != s for b in first for i, s in b)
    again = GroupedBatchSampler(GROUPS, 2, seed=3, with_seeds=True)
    assert list(again) == first
