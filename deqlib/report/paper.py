"""The paper's numbers and claims, each with where it comes from (see ../shared/REFERENCE.md)."""

from __future__ import annotations

from typing import Any

__all__ = ["PAPER"]

# Versioned reference numbers; each with where it comes from.
PAPER: dict[str, dict[str, Any]] = {
    "synthetic.claim_fit": {
        "value": "all gamma fit the target",
        "source": "supplement A.1 and Figure 5 (Bai, Koltun, Kolter 2021)",
    },
    "synthetic.claim_flat": {
        "value": "larger gamma flattens z_out = f(z; x) around the fixed point",
        "source": "supplement A.1, Figure 5 caption",
    },
    "synthetic.claim_nfe": {
        "value": "larger gamma needs fewer NFEs to reach the fixed point",
        "source": "Figure 5 caption (bottom row: fixed-point iterations on the slice x = -1); supplement A.1",
    },
    "synthetic.noise_var": {"value": 0.05, "source": "supplement A.1: delta ~ N(0, 0.05)"},
    "synthetic.nfe_threshold": {"value": "6 / 6", "source": "supplement Table 4, Synthetic column"},
    "solvers.forward_eps": {"value": 1e-3, "source": "supplement Table 4 (relative residual, A.5)"},
    "solvers.backward_eps": {
        "value": 1e-4,
        "source": "supplement Table 4 (the released code uses 1e-3 for both)",
    },
    "solvers.anderson": {
        "value": "window m = 5-6, lam = 1e-4, beta = 1",
        "source": "official code (locuslab/deq v2.0)",
    },
    "solvers.broyden": {
        "value": "inverse Jacobian -I + U V^T, first step plain, lowest-residual iterate returned",
        "source": "official code (locuslab/deq v2.0); paper section 3",
    },
    "cifar10.mdeq": {"value": {"accuracy": 93.6, "std": 0.2, "nfe": 17},
                     "source": "Table 2 (CIFAR-10, 5 runs): MDEQ"},
    "cifar10.mdeq_hard_stop": {"value": {"accuracy": 89.1, "nfe": 6},
                               "source": "Table 2: MDEQ hard-stopped at 6 NFE"},
    "cifar10.mdeq_jr": {"value": {"accuracy": 93.1, "std": 0.3, "nfe": 6},
                        "source": "Table 2 (CIFAR-10, 5 runs): MDEQ + JR"},
    "cifar10.resnet18": {"value": {"accuracy": 93.0}, "source": "Table 2: ResNet-18 (explicit network)"},
    "cifar10.table3": {"value": {0.1: [82.4, 89.7, 91.9, 92.3, 92.7, 92.9],
                                 0.6: [85.8, 91.5, 92.7, 93.0, 93.0, 93.1],
                                 1.2: [84.4, 89.6, 92.2, 92.6, 92.7, 92.7]},
                       "source": "Table 3: accuracy (%) of JR models (gamma = key) evaluated at NFE 1..6"},
    "imagenet.mdeq_small": {"value": {"top1": 75.4, "nfe": 27, "params_m": 18},
                            "source": "Table 2 (ImageNet): MDEQ-small"},
    "imagenet.mdeq_small_jr": {"value": {"top1": 74.5, "nfe": 14, "params_m": 17},
                               "source": "Table 2 (ImageNet): MDEQ-small + JR"},
    "imagenet.mdeq_large": {"value": {"top1": 77.5, "nfe": 30, "params_m": 63},
                            "source": "Table 2 (ImageNet): MDEQ-large"},
    "imagenet.mdeq_large_jr": {"value": {"top1": 76.8, "nfe": 15, "params_m": 62},
                               "source": "Table 2 (ImageNet): MDEQ-large + JR"},
    "imagenet.resnet18": {"value": {"top1": 70.2, "params_m": 13}, "source": "Table 2 (ImageNet): ResNet-18"},
    "imagenet.nfe_threshold": {"value": "14 / 14", "source": "supplement Table 4, ImageNet column"},
    "cifar10.nfe_threshold": {"value": "7 / 8", "source": "supplement Table 4, CIFAR-10 column"},
    # WikiText-103, Table 1 / Table 5: test perplexity, train / valid NFE, training time relative
    # to Transformer-XL, memory at batch 15 (excluding embeddings).
    "wikitext.explicit": {
        "value": {"ppl": 24.1, "train_nfe": None, "valid_nfe": None, "t_train": 1.0, "memory_gb": 9.0},
        "source": "Table 1 / Table 5: Transformer-XL, 18 layers (110M)",
    },
    "wikitext.post_ln": {
        "value": {"ppl": 24.0, "train_nfe": 30, "valid_nfe": 30, "t_train": 3.1, "memory_gb": 3.9},
        "source": "Table 1 / Table 5: DEQ-Transformer Post-LN (98M)",
    },
    "wikitext.post_ln_early_stop": {
        "value": {"ppl": 29.2, "train_nfe": 30, "valid_nfe": 12, "t_train": 3.1, "memory_gb": 3.9},
        "source": "Table 1 / Table 5: DEQ-Transformer Post-LN hard-stopped at 12 NFE at inference",
    },
    "wikitext.post_ln_reduced": {
        "value": {"ppl": 26.0, "train_nfe": 20, "valid_nfe": 20, "t_train": 2.2, "memory_gb": 3.6},
        "source": "Table 5: DEQ Post-LN trained at 20 / 20 NFE (at 15 it diverged)",
    },
    "wikitext.post_ln_15nfe": {
        "value": {"ppl": "diverged", "train_nfe": 15, "valid_nfe": None, "t_train": None, "memory_gb": 3.6},
        "source": "Table 5: DEQ-Transformer Post-LN trained at 15 NFE (diverged)",
    },
    "wikitext.pre_ln": {
        "value": {"ppl": "diverged", "train_nfe": 30, "valid_nfe": None, "t_train": None, "memory_gb": None},
        "source": "Table 5: DEQ Pre-LN without JR",
    },
    "wikitext.pre_ln_jr": {
        "value": {"ppl": 24.5, "train_nfe": 14, "valid_nfe": 14, "t_train": 1.5, "memory_gb": 4.8},
        "source": "Table 5 (1.6x in Table 1): DEQ Pre-LN + JR",
    },
    "wikitext.post_ln_jr": {
        "value": {"ppl": 24.9, "train_nfe": 13, "valid_nfe": 12, "t_train": 1.4, "memory_gb": 4.8},
        "source": "Table 5 (1.5x in Table 1): DEQ Post-LN + JR",
    },
    "wikitext.claim_jr_memory": {
        "value": ("JR adds about 25% training memory (3.9 -> 4.8 GB); the DEQ uses about half the memory of "
                  "Transformer-XL"),
        "source": "supplement B.1; Table 1",
    },
    "memory.jr_b1": {
        "value": "about +25% training memory with JR (3.9 -> 4.8 GB, excluding embeddings, batch 15), less than "
                 "one layer's memory because fewer NFE save the solver's memory; Transformer-XL about 2x",
        "source": "supplement B.1 (Memory Consumption) and Table 5",
    },
    "deq2019.memory": {
        "value": "constant training memory, that of one layer's activations, whatever the depth (no intermediate "
                 "values stored); 80-85% less memory than explicit models on WikiText-103 (DEQ-TrellisNet)",
        "source": "DEQ (Bai, Kolter, Koltun, NeurIPS 2019), as summarized in ../shared/seeds/003",
    },
    "wikitext.settings": {
        "value": "23 epochs, batch 60, Adam 2.5e-4 with 1 epoch warm-up, cosine, d_model 700, seq 150, "
                 "dropout 0.06, weight norm, thresholds 12/12, gamma 1.6 -> 2.5, p 0.35",
        "source": "supplement Table 4, WikiText-103 column",
    },
    # Supplement B.2 / B.3 and Figures 8 and 10 (notebook 06): qualitative, the figures' values are
    # not in the text.
    "weight_decay.fig8": {
        "value": "weight decay 1e-6 on the DEQ-Transformer does not stabilize forward convergence; after 50K "
                 "steps the model diverged to > 500 perplexity",
        "source": "Figure 8 and Section 5.5 (main text)",
    },
    "weight_decay.fig10a": {
        "value": "CIFAR-10 MDEQ backward residual after 14 iterations: unregularized fluctuates and rises; weight "
                 "decay damps the fluctuations but converges worse (relative residual > 0.05 and rising); JR "
                 "(gamma 0.5) smooth and stable",
        "source": "supplement B.2, Figure 10a",
    },
    "weight_decay.fig10b": {
        "value": "a larger relative residual comes with a larger ||J_f||_F^2; weight-decayed DEQ-Transformers the "
                 "worst",
        "source": "supplement B.3, Figure 10b",
    },
    "weight_decay.fig10c": {
        "value": "at a fixed gamma ||J_f||_F grows slowly over training ('critical stability'), much slower than "
                 "unregularized and weight-decayed models; calls for adaptive gamma scheduling",
        "source": "supplement B.3, Figure 10c",
    },
    "weight_decay.claim_general": {
        "value": "weight decay is generally not effective in stabilizing DEQs and sometimes even counter-productive",
        "source": "Section 5.5 (main text); supplement B.3",
    },
}
