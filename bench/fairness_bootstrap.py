"""Bootstrap cost of fairness_table against fairlearn's own MetricFrame bootstrap, same data, one run.

Synthetic predictions (1,500 rows, 12 classes, 10 attributes of 8 groups); prints seconds and each figure
as a ratio to fairlearn's MetricFrame with n_boot=20. Run: python bench/fairness_bootstrap.py
"""

import time
import warnings

import numpy as np
import pandas as pd

warnings.simplefilter("ignore")
from fairlearn.metrics import MetricFrame  # noqa: E402 (fairlearn warns on import)

from scin_pipeline.core import fairness as fa  # noqa: E402

rng = np.random.default_rng(0)
N, K = 1500, 12
y = rng.integers(0, K, N)
logits = rng.normal(size=(N, K))
logits[np.arange(N), y] += 1.5
p = np.exp(logits)
p /= p.sum(1, keepdims=True)
classes = [f"c{i}" for i in range(K)]
sens = pd.DataFrame({f"a{j}": rng.integers(0, 8, N).astype(str) for j in range(10)})
res = {}
for nb in (0, 20, 200):
    t = time.perf_counter()
    fa.fairness_table("m", y, p, classes, sens, n_bootstrap=nb)
    res[f"ours {nb}"] = time.perf_counter() - t
pred = p.argmax(1)
rows = np.arange(N)
t = time.perf_counter()
for a in sens.columns:
    MetricFrame(
        metrics=fa._metric_functions(p),
        y_true=y,
        y_pred=pred,
        sensitive_features=sens[a],
        sample_params={"mean_ovr_auc": {"row": rows}, "top3_accuracy": {"row": rows}},
        n_boot=20,
        ci_quantiles=[0.025, 0.975],
        random_state=0,
    )
res["fairlearn MetricFrame n_boot=20"] = time.perf_counter() - t
base = res["fairlearn MetricFrame n_boot=20"]
for k, v in res.items():
    print(f"{k:35s} {v:7.2f} s  x{v / base:.3f} of fairlearn n_boot=20")
