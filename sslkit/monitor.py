"""The online kNN monitor: does the trunk's representation improve while it trains?

Every `monitor.every` epochs (and after the last one) rank 0 extracts features of a labelled shard
folder with the trunk as it is (`sslkit.eval`'s extraction and weighted kNN vote, nothing cached) and
logs one record, kind "monitor": `knn_top1`/`knn_top5` at `monitor.k` neighbours and `monitor_s`, the
seconds it cost. Without `monitor.train`, the folder is split by sample index: even indices are the
neighbours, odd ones the queries (one folder suffices; a fixed split, so epochs compare).

Every rank runs the same collective at the same epochs: rank 0 computes inside `dist.on_main`
while the other ranks wait in its broadcast, so one evaluation must take less than
`dist_timeout_s` (default 600 s), or the waiting ranks take rank 0 for hung. A few thousand images at
a small crop take seconds to a minute; keep the monitor's folder small.
"""

from __future__ import annotations

import time

from .config import MonitorConfig


class KnnMonitor:
    def __init__(self, cfg: MonitorConfig, epochs: int, info, log):
        self.cfg, self.epochs, self.info, self.log = cfg, epochs, info, log

    @property
    def enabled(self) -> bool:
        return self.cfg.data is not None

    def check(self):
        """Before training (collective when enabled): the folders exist and are labelled, or one line."""
        if self.enabled:
            from . import dist
            from .eval.features import data_info
            dist.on_main(lambda: [data_info(d) for d in (self.cfg.data, self.cfg.train) if d], self.info)

    def due(self, epochs_done: int) -> bool:
        """Whether an evaluation follows the epoch that made `epochs_done` (the same on every rank)."""
        return self.enabled and (epochs_done % self.cfg.every == 0 or epochs_done == self.epochs)

    def run(self, method, epoch: int, step: int) -> dict | None:
        """Collective: rank 0 evaluates `method.backbone`; returns its record there (None elsewhere).
        The trunk is left in eval mode: the caller puts the model back into training mode."""
        from . import dist
        return dist.on_main(lambda: self._evaluate(method, epoch, step), self.info)

    def _evaluate(self, method, epoch: int, step: int) -> dict:
        import torch

        from .eval.encoders import TrunkEncoder
        from .eval.features import extract
        from .eval.knn import knn_eval
        from .trunk import TrunkSpec

        t0 = time.perf_counter()
        c = self.cfg
        spec = TrunkSpec(**method.trunk_spec, source=f"training step {step}")
        encoder = TrunkEncoder(method.backbone, spec, size=c.size)
        device = "cuda" if self.info.device.type == "cuda" else "cpu"

        def features(data):
            return extract(encoder, data, size=c.size, resize=c.resize, device=device, batch_size=c.batch_size,
                           cache_dir=None, progress=True)

        val = features(c.data)
        if c.train:
            ref = features(c.train)
        else:
            odd = val.index % 2 == 1
            ref, val = val.subset(torch.nonzero(~odd).flatten()), val.subset(torch.nonzero(odd).flatten())
        result = knn_eval(ref.x, ref.labels, val.x, val.labels, max(ref.num_classes, val.num_classes), ks=(c.k,),
                          device=self.info.device)
        seconds = time.perf_counter() - t0
        rec = {"kind": "monitor", "epoch": epoch, "step": step, "knn_top1": result["top1"][str(c.k)],
               "knn_top5": result["top5"][str(c.k)], "k": c.k, "queries": int(val.x.shape[0]),
               "neighbours": int(ref.x.shape[0]), "monitor_s": round(seconds, 3)}
        self.log.info("monitor after epoch %d: kNN top-1 %.2f%% (k=%d, %d queries over %d neighbours), %.1f s",
                      epoch, 100 * rec["knn_top1"], c.k, rec["queries"], rec["neighbours"], seconds)
        return rec
