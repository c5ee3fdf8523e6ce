"""One loader over several chunks (data.batches.iter_batches(chunks=...), used by analysis._run_group):
the same batches as a loader per chunk, none spanning two chunks."""
import pytest

from test_pipeline import SMALL, SMALL_GRID, SMALL_P
from vitsift_core.data.batches import chunk_batches, iter_batches
from vitsift_core.data.sources import resolve_images


def test_chunk_batches_by_hand():
    assert chunk_batches([5, 3, 1], 2) == [[0, 1], [2, 3], [4], [5, 6], [7], [8]]
    assert chunk_batches([4], 4) == [[0, 1, 2, 3]]
    assert chunk_batches([], 3) == []


def _ids(items):
    return [([] if b is None else b.ids) + [s.id for s in sk] for b, sk in items]


@pytest.mark.parametrize("workers", [0, 1])
def test_one_loader_over_chunks_gives_each_chunks_own_batches(bad_images_dir, workers):
    recs = resolve_images(str(bad_images_dir))
    assert len(recs) >= 5
    sizes = [3, len(recs) - 4, 1]
    kw = dict(batch_size=2, num_workers=workers, progress=False)
    whole = list(iter_batches(recs, SMALL, SMALL_GRID, SMALL_P, chunks=sizes, **kw))
    per_chunk, at = [], 0
    for n in sizes:
        per_chunk += list(iter_batches(recs[at:at + n], SMALL, SMALL_GRID, SMALL_P, **kw))
        at += n
    assert _ids(whole) == _ids(per_chunk)
    for (b1, _), (b2, _) in zip(whole, per_chunk):
        assert (b1 is None) == (b2 is None)
        if b1 is not None:
            assert (b1.counts == b2.counts).all() and (b1.tensors == b2.tensors).all()


def test_chunk_sizes_must_cover_the_records(bad_images_dir):
    recs = resolve_images(str(bad_images_dir))
    with pytest.raises(ValueError, match="do not add up"):
        list(iter_batches(recs, SMALL, SMALL_GRID, SMALL_P, chunks=[1], progress=False))
