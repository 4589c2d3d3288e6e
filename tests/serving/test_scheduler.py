"""``Scheduler`` on its own: a real (tiny) ``PagedKVCache``, a fake residency manager, no model.

Each test plays the engine with ``drive`` (advance the planned tokens, emit one token when a request's last
token ran, finish at ``max_tokens``) and checks the plans the module docstring promises: the token budget
and chunked prefill, running requests first, admission dense in few deltas, the fairness barrier, and
preemption of the youngest running request when the KV cache runs out.
"""

from __future__ import annotations

import itertools

from serving_fakes import FakeResidency, drive

from hf_delta.model import BASE_NAME
from hf_delta.serving.engine.kv_cache import PagedKVCache
from hf_delta.serving.engine.sampling import SamplingParams
from hf_delta.serving.engine.scheduler import Request, Scheduler


def _scheduler(*, kv_tokens: int = 1024, block_size: int = 4, residency: FakeResidency | None = None,
               **kwargs) -> Scheduler:
    cache = PagedKVCache(num_layers=1, num_kv_heads=1, head_dim=1, max_tokens=kv_tokens, block_size=block_size)
    return Scheduler(cache, residency or FakeResidency(), **kwargs)


_arrivals = itertools.count()


def _request(name: str, model: str = BASE_NAME, *, prompt: int = 4, max_tokens: int = 4) -> Request:
    """A request with a ``prompt``-token prompt, arriving after every earlier one."""
    return Request(id=name, model=model, prompt_ids=list(range(2, 2 + prompt)),
                   params=SamplingParams(max_tokens=max_tokens), arrival=float(next(_arrivals)))


def _ids(plan) -> list[tuple[str, int]]:
    return [(request.id, n) for request, n in plan]


# ------------------------------------------------------------------------------------------------------ budgets
def test_token_budget_chunks_long_prompts_and_running_requests_go_first():
    scheduler = _scheduler(max_batch_tokens=10)
    for name, prompt in (("r1", 6), ("r2", 6), ("r3", 6)):
        scheduler.add(_request(name, prompt=prompt))
    plans = []
    for _ in range(4):
        plan = scheduler.schedule()
        plans.append(_ids(plan))
        assert sum(n for _, n in plan) <= 10
        drive(scheduler, plan)
    assert plans == [
        [("r1", 6), ("r2", 4)],  # r2's prompt is cut at the budget; r3 waits
        [("r1", 1), ("r2", 2), ("r3", 6)],  # r1 decodes, r2 finishes its prefill, r3 gets the rest
        [("r1", 1), ("r2", 1), ("r3", 1)],
        [("r1", 1), ("r2", 1), ("r3", 1)],
    ]


def test_at_most_max_running_requests_run():
    scheduler = _scheduler(max_running=2)
    for name in ("r1", "r2", "r3"):
        scheduler.add(_request(name, max_tokens=2))
    assert _ids(scheduler.schedule()) == [("r1", 4), ("r2", 4)]
    assert [r.id for r in scheduler.waiting] == ["r3"]
    drive(scheduler, [(r, 4) for r in scheduler.running])
    assert _ids(scheduler.schedule()) == [("r1", 1), ("r2", 1)]  # still full: r3 waits
    drive(scheduler, [(r, 1) for r in scheduler.running])  # both reach max_tokens=2 and finish
    assert _ids(scheduler.schedule()) == [("r3", 4)]


def test_a_prompt_that_does_not_fit_the_free_kv_blocks_waits():
    scheduler = _scheduler(kv_tokens=16, block_size=4)  # 4 blocks; the watermark keeps 1 free once one runs
    scheduler.add(_request("r1", prompt=8))
    scheduler.add(_request("r2", prompt=8))
    assert _ids(scheduler.schedule()) == [("r1", 8)]
    assert scheduler.cache.free_blocks == 2 and [r.id for r in scheduler.waiting] == ["r2"]


# ------------------------------------------------------------------------------------------- few deltas a step
def test_waiting_requests_of_deltas_already_running_go_first():
    scheduler = _scheduler(max_running=2)
    scheduler.add(_request("a1", "a"))
    plan = scheduler.schedule()
    assert _ids(plan) == [("a1", 4)]
    drive(scheduler, plan)
    b1, a2, c1 = _request("b1", "b"), _request("a2", "a"), _request("c1", "c")
    for request in (b1, a2, c1):
        scheduler.add(request)
    assert scheduler.wanted_deltas() == ["b", "a", "c"]
    plan = scheduler.schedule()
    assert _ids(plan) == [("a1", 1), ("a2", 4)]  # a2 overtakes the older b1: delta a is in the batch already
    assert (b1.overtaken, c1.overtaken) == (1, 0)  # only requests older than an admitted one are overtaken


def test_without_a_running_delta_admission_is_in_arrival_order():
    scheduler = _scheduler(max_running=2)
    for name, model in (("b1", "b"), ("a1", "a"), ("c1", "c")):
        scheduler.add(_request(name, model))
    plan = scheduler.schedule()
    assert _ids(plan) == [("b1", 4), ("a1", 4)]
    assert scheduler.residency.pins == {"b": 1, "a": 1}


def test_hot_delta_cannot_starve_a_cold_one():
    # One device slot, held by hot delta "h", and a stream of h requests: the cold request c1 cannot get the
    # slot while h runs, and younger h requests overtake it each step until it has been overtaken
    # fairness_steps times. Then it is a barrier: no younger request is admitted, h drains and c1 runs.
    residency = FakeResidency(slots=1)
    scheduler = _scheduler(residency=residency, fairness_steps=3)
    scheduler.add(_request("h0", "h", max_tokens=3))
    cold = _request("c1", "c", max_tokens=2)
    scheduler.add(cold)
    admitted: dict[str, int] = {}
    for step in range(12):
        scheduler.add(_request(f"h{step + 1}", "h", max_tokens=3))
        plan = scheduler.schedule()
        for request, _ in plan:
            admitted.setdefault(request.id, step)
        drive(scheduler, plan)
        if "c1" in admitted:
            break
    assert cold.overtaken == 3
    # Steps 0-2 each admit younger h requests (h0+h1, h2, h3); from step 3 on, c1 is the barrier: h1..h3 drain
    # (3 tokens each, the last of them admitted at step 2 finishes at step 4) and c1 gets the slot at step 5.
    assert admitted == {"h0": 0, "h1": 0, "h2": 1, "h3": 2, "c1": 5}
    assert residency.pins == {"h": 0, "c": 1}
    # Once c1 runs, the younger h requests are admitted again (after c1 finishes and frees the slot).
    assert [r.id for r in scheduler.waiting][:2] == ["h4", "h5"]


# ----------------------------------------------------------------------------------------------------- preemption
def test_when_kv_blocks_run_out_the_youngest_running_request_is_preempted_and_recomputed():
    residency = FakeResidency()
    scheduler = _scheduler(kv_tokens=16, block_size=4, residency=residency)  # 4 blocks
    old, young = _request("old", "a", prompt=4, max_tokens=8), _request("young", "b", prompt=4, max_tokens=8)
    scheduler.add(old)
    scheduler.add(young)
    plan = scheduler.schedule()
    assert _ids(plan) == [("old", 4), ("young", 4)]  # one block each
    drive(scheduler, plan)
    plans = []
    while young.preemptions == 0:
        plan = scheduler.schedule()
        plans.append(_ids(plan))
        drive(scheduler, plan)
    # Token 5 of each needs a second block (4 used), token 9 a third: old takes the last free block, young
    # has none left and is preempted in the step where old's growth left nothing.
    assert plans == [[("old", 1), ("young", 1)], [("old", 1), ("young", 1)], [("old", 1), ("young", 1)],
                     [("old", 1), ("young", 1)], [("old", 1)]]
    assert (young.status, young.num_computed, young.output_ids) == ("waiting", 0, [1] * 5)  # keeps its tokens
    assert (scheduler.preemptions, young.preemptions, old.preemptions) == (1, 1, 0)
    assert not scheduler.cache.holds("young") and residency.pins == {"a": 1, "b": 0}
    # Old needs a 3rd block at its 9th token; with young's 2 blocks free again it goes on without preemption.
    while old.status != "finished":
        plan = scheduler.schedule()
        assert [r.id for r, _ in plan] == ["old"], _ids(plan)  # young's 9 tokens + watermark do not fit beside
        drive(scheduler, plan)
    assert len(old.output_ids) == 8 and scheduler.preemptions == 1
    plan = scheduler.schedule()
    assert _ids(plan) == [("young", 9)]  # readmitted: prompt and 5 generated tokens computed again
    assert young.status == "running" and residency.pins["b"] == 1


def test_a_lone_request_that_outgrows_the_cache_preempts_itself():
    scheduler = _scheduler(kv_tokens=8, block_size=4)  # 2 blocks
    request = _request("r", prompt=4, max_tokens=16)
    scheduler.add(request)
    drive(scheduler, scheduler.schedule())
    for _ in range(4):
        drive(scheduler, scheduler.schedule())  # tokens 5..8 fill the 2nd block
    assert request.num_computed == 8 and scheduler.preemptions == 0
    assert scheduler.schedule() == []  # token 9 needs a 3rd block: it gives its own blocks back
    assert request.status == "waiting" and scheduler.preemptions == 1 and scheduler.cache.free_blocks == 2


def test_finish_frees_blocks_and_the_delta_pin_wherever_the_request_is():
    residency = FakeResidency()
    scheduler = _scheduler(residency=residency, max_running=1)
    running, waiting = _request("run", "a", prompt=6), _request("wait", "b")
    scheduler.add(running)
    scheduler.add(waiting)
    scheduler.schedule()
    assert scheduler.cache.free_blocks == scheduler.cache.num_blocks - 2
    scheduler.finish(running)
    scheduler.finish(waiting)
    assert scheduler.cache.free_blocks == scheduler.cache.num_blocks
    assert residency.pins == {"a": 0} and not scheduler.has_work()
    assert (running.status, waiting.status) == ("finished", "finished")
