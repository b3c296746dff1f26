"""The worker processes of the modular_lora stages (``ctx.map``): same runs, same order, one torch thread each.

Every stage job seeds torch's global generator itself (peft's LoRA init draws from it), so a run gives the
same result inline and in a spawned worker.
"""
import torch


def _seeded_draw(job: dict) -> list[float]:
    """A stand-in for one training run: seeds torch's global generator itself, as the stage jobs do."""
    torch.manual_seed(job["seed"])
    return torch.randn(3).tolist() + [float(torch.get_num_threads())]


def test_worker_processes_give_the_same_runs_in_the_same_order_as_inline():
    from tasks.core.parallel import map_jobs

    jobs = [{"seed": s} for s in (3, 1, 2)]
    inline = map_jobs(_seeded_draw, jobs, workers=1)
    spawned = map_jobs(_seeded_draw, jobs, workers=2)
    assert [r[:3] for r in spawned] == [r[:3] for r in inline]
    assert all(r[3] == 1.0 for r in spawned)  # one torch thread per worker
