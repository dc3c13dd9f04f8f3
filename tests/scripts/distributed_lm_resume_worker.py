"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2``: trains a tiny
DEQ-Transformer LM (whose segment memory differs per process) once without a break and once
stopped after ``STOP`` steps and resumed, with the training loop's own accelerator, and writes to
``<out>/lm_rank<r>.json`` whether the two runs agree bit for bit on this rank, and the warnings it saw."""

import json
import sys
import warnings
from pathlib import Path

import torch

from deqlib.data.wikitext import LMStream
from deqlib.deq import SolverSettings
from deqlib.jacobian import JacobianPenalty
from deqlib.models.transformer import DEQTransformerLM, TransformerConfig
from deqlib.train import TrainConfig, make_accelerator, train

V, STOP = 30, 7


def main(out: Path) -> None:
    cfg = TrainConfig(epochs=1, batch_size=4, lr=3e-3, pretrain_steps=2, grad_clip=1.0, seed=4,
                      forward=SolverSettings("anderson", 8, 1e-3), backward=SolverSettings("broyden", 8, 1e-4),
                      jacobian=JacobianPenalty(gamma=1.0, p=0.5))
    mcfg = TransformerConfig(d_model=16, n_head=2, d_head=8, d_inner=32, tgt_len=5, mem_len=3, dropout=0.1,
                             cutoffs=(10, 20), div_val=2.0, n_layer=3, pretrain_layers=2, init_std=0.05)
    acc = make_accelerator(cfg)  # the one train() makes itself, asked for this process's rank
    stream = LMStream(torch.randint(0, V, (400,), generator=torch.Generator().manual_seed(5)), 4, 5)

    def fresh() -> DEQTransformerLM:
        torch.manual_seed(0)
        return DEQTransformerLM(mcfg, V, cfg.forward, cfg.backward)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = fresh()
        full = train(a, stream, cfg, run_dir=out / "a", progress=False)
        train(fresh(), stream, cfg, run_dir=out / "b", progress=False, stop_after=STOP)
        c = fresh()
        rest = train(c, stream, cfg, run_dir=out / "b", progress=False)
    params_equal = all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))
    mem_a, mem_c = a.get_extra_state(), c.get_extra_state()
    record = {
        "rank": acc.process_index,
        "steps": stream.steps_per_epoch,
        "resumed_from": rest.resumed_from,
        "params_equal": params_equal,
        "memory_equal": mem_a["memory_at"] == mem_c["memory_at"]
        and all(torch.equal(x, y) for x, y in zip(mem_a["memory"], mem_c["memory"])),
        # this rank's own losses and memory lengths after the break, in both runs
        "loss_full": [r["loss"] for r in full.records[STOP:]],
        "loss_resumed": [r["loss"] for r in rest.records[STOP:]],
        "mem_len_resumed": [r["mem_len"] for r in rest.records[STOP:]],
        "warnings": [str(w.message) for w in caught if issubclass(w.category, UserWarning)],
    }
    (out / f"lm_rank{acc.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
