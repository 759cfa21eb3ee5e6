"""`gpsr.utils.parallel.split_batch`: a batch's items on separate CPU worker threads that
share the process's torch threads (no oversubscription), results in order, and the bf16
flow's inverse decoded that way equal to one batched call."""

import threading

import pytest
import torch

from gpsr.utils import parallel
from gpsr.utils.parallel import batch_workers, split_batch
from tests.helpers import tiny_flow


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_batch_workers_share_the_threads():
    assert batch_workers(2, 2) == [1, 1]
    assert batch_workers(2, 3) == [2, 1]
    assert batch_workers(5, 2) == [1, 1]
    assert batch_workers(1, 8) == [8]
    assert batch_workers(8, 64) == [8] * 8
    assert batch_workers(3, 1) == [1]


def test_split_batch_runs_items_on_workers_in_order(two_threads):
    """The workers run at the same time, each another OS thread with 1 torch thread (2 in
    all, as the caller had);
    the output is in the batch's order (a reversed or interleaved concatenation would
    fail); afterwards this thread and threads started later still get 2 torch threads."""
    seen = []
    both = threading.Barrier(2, timeout=20)  # broken unless the two calls run at once

    def fn(x):
        seen.append((threading.get_ident(), torch.get_num_threads(), x.shape[0]))
        both.wait()
        return x * 2 + 1

    x = torch.arange(3.0).view(3, 1, 1) + torch.zeros(3, 4, 5)
    with torch.no_grad():
        out = split_batch(fn, x)
    assert torch.equal(out, x * 2 + 1)
    main = threading.get_ident()
    assert sorted(n for *_, n in seen) == [1, 2]  # 3 items over 2 workers
    assert len({ident for ident, *_ in seen}) == 2 and main not in {i for i, *_ in seen}
    assert {threads for _, threads, _ in seen} == {1}
    assert torch.get_num_threads() == 2
    later = []
    thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert later == [2]


def test_split_batch_runs_inline_when_it_must(two_threads):
    """With gradients enabled, one item or one thread: one call, in this thread, on the
    whole batch."""
    calls = []

    def fn(x, y):
        calls.append((threading.get_ident(), x.shape[0]))
        return x + y

    x = torch.randn(2, 3)
    assert torch.equal(split_batch(fn, x, x), 2 * x)  # gradients enabled
    with torch.no_grad():
        split_batch(fn, x[:1], x[:1])
        torch.set_num_threads(1)
        split_batch(fn, x, x)
    assert calls == [(threading.get_ident(), 2), (threading.get_ident(), 1)] + [
        (threading.get_ident(), 2)
    ]


def test_split_batch_raises_a_workers_error(two_threads):
    def fn(x):
        if float(x[0]) > 0:
            raise ValueError("bad item")
        return x

    with torch.no_grad(), pytest.raises(ValueError, match="bad item"):
        split_batch(fn, torch.tensor([0.0, 1.0]))
    assert torch.get_num_threads() == 2


def test_growing_the_pool_does_not_wait_for_running_work(two_threads):
    """A caller that needs more workers replaces the pool without waiting, under the lock,
    for another caller's work still running on the old one (whose workers take that lock
    to set their thread count: waiting there could deadlock)."""
    running, release = threading.Barrier(3, timeout=20), threading.Event()
    result = []

    def fn(x):
        running.wait()
        release.wait(20)
        return x + 1

    def caller():
        with torch.no_grad():
            result.append(split_batch(fn, torch.zeros(2, 3)))

    busy = threading.Thread(target=caller)
    busy.start()
    running.wait()  # both of the busy caller's workers are inside fn
    grown = threading.Thread(target=parallel._executor, args=(parallel._pool_size + 1,))
    grown.start()
    grown.join(5)
    finished_first = not grown.is_alive()
    release.set()
    busy.join(20)
    grown.join(20)
    assert finished_first
    assert torch.equal(result[0], torch.ones(2, 3))


@pytest.mark.parametrize("position", [False, True])
def test_bf16_flow_inverse_on_workers_equals_one_batched_call(two_threads, position):
    """The bf16 copy decodes each image on its own worker; against the same copy decoding
    the batch in one call: equal up to bf16 rounding (kernels may differ with the batch
    size), with 3 different images (a swap or a wrong slice would be off by O(1)), and with a
    tile offset (position channels)."""
    flow = tiny_flow(scale=4, position=position).eval()
    fast = flow.bf16_copy()
    assert fast.parallel_batch and not flow.parallel_batch
    gen = torch.Generator().manual_seed(0)
    coarse = torch.rand(3, 3, 12, 12, generator=gen) * 2 - 1
    latent = torch.randn(3, 9, 12, 12, generator=gen)
    with torch.no_grad():
        split = fast.inverse(coarse, latent, offset=(2, 6))
        fast.parallel_batch = False
        whole = fast.inverse(coarse, latent, offset=(2, 6))
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-3)
    assert float((whole[0] - whole[1]).abs().max()) > 0.1  # the images do differ
