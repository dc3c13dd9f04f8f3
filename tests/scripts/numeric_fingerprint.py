"""Train each model family a few steps through the project's own loop and print a hash of the
parameters: one line ``<model> <sha256 prefix>`` per model, then the numeric path's description.

Run in a fresh process (the numeric path is fixed when the libraries load), for example under
``deqlib.numerics.pinned_environ()`` and under other settings, or under ``qemu-x86_64 -cpu
Haswell-v4`` to see another CPU's bits. Usage: ``python numeric_fingerprint.py [steps]``.
"""

import hashlib
import json
import sys

import torch

import deqlib
from deqlib.deq import SolverSettings
from deqlib.jacobian import JacobianPenalty
from deqlib.models.mdeq import MDEQ, MDEQConfig
from deqlib.models.synthetic import SyntheticDEQ, SyntheticModelConfig
from deqlib.models.transformer import DEQTransformerLM, TransformerConfig
from deqlib.data.wikitext import LMStream
from deqlib.train import TensorBatches, TrainConfig, train


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if isinstance(t, torch.Tensor):
            h.update(name.encode())
            h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def run(steps: int) -> dict[str, str]:
    g = torch.Generator().manual_seed(0)
    fwd, bwd = SolverSettings("anderson", 6, 1e-3), SolverSettings("anderson", 6, 1e-4)
    jr = JacobianPenalty(gamma=1.0, p=0.5, n_probes=1)
    out = {}

    cfg = TrainConfig(epochs=10, max_steps=steps, batch_size=32, lr=1e-3, forward=fwd, backward=bwd, jacobian=jr)
    torch.manual_seed(0)
    model = SyntheticDEQ(SyntheticModelConfig(), fwd, bwd)
    x = torch.rand(128, 1, generator=g) * 4 - 2
    train(model, TensorBatches((x, x ** 3), 32, seed=0), cfg, progress=False)
    out["synthetic"] = digest(model)

    mcfg = MDEQConfig(channels=(8, 16), expansion=2, groups=4, dropout=0.25, downsample=1,
                      head_channels=(16, 32), final_channels=32, image_size=16, init_std=None)
    cfg = TrainConfig(epochs=10, max_steps=steps, batch_size=8, lr=1e-3, forward=fwd.replace(max_iter=4),
                      backward=bwd.replace(max_iter=4), jacobian=jr)
    torch.manual_seed(0)
    model = MDEQ(mcfg, cfg.forward, cfg.backward)
    images = torch.randn(32, 3, 16, 16, generator=g)
    labels = torch.randint(0, 10, (32,), generator=g)
    train(model, TensorBatches((images, labels), 8, seed=0), cfg, progress=False)
    out["mdeq"] = digest(model)

    tcfg = TransformerConfig(d_model=32, n_head=2, d_head=16, d_inner=64, tgt_len=8, mem_len=8, dropout=0.06,
                             cutoffs=(50, 150), div_val=2.0, n_layer=2, pretrain_layers=2)
    cfg = TrainConfig(epochs=10, max_steps=steps, batch_size=4, lr=1e-3, pretrain_steps=1, grad_clip=0.25,
                      forward=fwd.replace(max_iter=5), backward=SolverSettings("broyden", 5, 1e-4), jacobian=jr)
    torch.manual_seed(0)
    model = DEQTransformerLM(tcfg, 300, cfg.forward, cfg.backward)
    tokens = torch.randint(0, 300, (4 * 8 * (steps + 2),), generator=g)
    train(model, LMStream(tokens, 4, 8), cfg, progress=False)
    out["transformer"] = digest(model)
    return out


if __name__ == "__main__":
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 6
    for name, h in run(steps).items():
        print(name, h)
    print(json.dumps(deqlib.numerics.describe()))
