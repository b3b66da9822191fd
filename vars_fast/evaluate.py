"""The "evaluate" stage: the defence against every attack, as rows of metrics.json.

Sections (each timed into ``meta["evaluate"]``):

* ranking   (Tables 2/3, Fig. 6): clean and attacked catalogues (saved by the attack stage,
  attacked against the *undefended* model, as in the paper) are purified -- ``denoise`` =
  D(x), ``denoise+rand`` = D(x) then a seeded random resize-pad -- re-encoded and ranked.
  Models in ``eval.models``; ``eval.table_eps`` and, for ``eval.curve_models``, the
  ``eval.curve_eps`` too (Fig. 6). ``detect+denoise`` (at ``eval.table_eps``): what a screening
  platform deploys -- D(x) only where the detector flags x, x itself elsewhere; its rows
  carry ``flagged`` (the share of the catalogue that was denoised).
* detection (Table 4): FGSM at each ``defense.eval_eps`` on the defence's held-out *test*
  items (``Defense.split["test"]``), ours (distance vs the stored threshold) vs ADDITION;
  Gaussian-noise rows (``attack: "gaussian", eps: sigma``) with the share judged clean.
* ablation  (Table 5): PGD at ``eval.table_eps`` on VBPR with the ``no-detector`` and
  ``no-perceptual`` checkpoints (rows carry ``variant``), plus PGD detection accuracy.
* targeted  (Table 6): the saved targeted images purified, every user re-scored.
* adaptive  (beyond the paper): ``attacks.adaptive.AdaptivePGD`` through the defence on
  VBPR, once against ``denoise`` and once (EOT) against ``denoise+rand``; ranking rows
  ``attack: "adaptive-pgd"`` and the detection rate of the adaptive images.

The arrays the figures need (distances, embeddings, example images) are saved to
``figures/eval_arrays.npz``, so ``vars_fast.report`` redraws every figure without models.
"""
from __future__ import annotations

import json
import math
import time
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

from vars_fast.utils import progress

RANK_DEFENSES = ("denoise", "denoise+rand")
ARRAYS = "eval_arrays.npz"


def _chunks(n: int, bs: int):
    for s in range(0, n, bs):
        yield s, min(s + bs, n)


def _to_float(x: Tensor, device) -> Tensor:
    x = x.to(device)
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


class Evaluation:
    """Holds what the sections share (catalogue, defence, the clean purification, arrays)."""

    def __init__(self, ctx):
        self.ctx, self.cfg, self.run, self.dev, self.log = ctx, ctx.cfg, ctx.run, ctx.device, ctx.log
        self.cat = ctx.catalogue
        self.defense = self.fast_defense(ctx.defense())
        self.topk = tuple(int(k) for k in self.cfg.eval.topk)
        self.bs = int(self.cfg.eval.batch_size)
        self.arrays: dict[str, np.ndarray] = {}
        self.timings: dict[str, float] = {}
        self._clean_purified = None
        self._d_clean = None
        self._gated_clean = None
        self.models = [m for m in self.cfg.attack.models if self.run.checkpoint(f"recommender_{m}").is_file()]
        self.test_items = self._test_items()

    # ---------------------------------------------------------------- helpers
    def fast_defense(self, defense):
        """The defence for inference: a copy with the denoiser in NHWC (1.4x faster forward on
        2 cores) and the detector's eval BatchNorms folded into its convs (``attacks.fast``),
        the fold kept only if the embeddings match the original on real images (rtol 1e-3).
        Differentiable as before (the adaptive attack goes through it); the weights are frozen."""
        import copy

        from vars_fast.attacks.fast import folded_copy

        fast = copy.copy(defense)
        fast.denoiser = copy.deepcopy(defense.denoiser).eval().to(memory_format=torch.channels_last)
        if defense.detector is not None:
            probe = _to_float(self.cat.images[:8], self.dev)
            det, n = folded_copy(defense.detector, lambda m: m.embed(probe))
            if n:
                fast.detector = det.to(memory_format=torch.channels_last)
        return fast

    def _bar(self, total: int, desc: str):
        return progress(total=total, desc=desc, unit="img", enabled=self.cfg.run.progress)

    def _test_items(self) -> Tensor:
        """Held-out test items of the defence (never trained on, threshold not chosen on them)."""
        split = self.defense.split or {}
        test = split.get("test")
        if test is None or len(test) == 0:
            self.log.warning("defense checkpoint has no extra['split']['test']: detection uses all ok items")
            test = [i for i, s in enumerate(self.cat.status) if s == "ok"]
        test = torch.as_tensor(test, dtype=torch.long).flatten()
        g = self.ctx.generator("evaluate:detect-items")
        test = test[torch.randperm(test.numel(), generator=g)]
        return test[: int(self.cfg.defense.n_detect_items)]

    @torch.no_grad()
    def purify_all(self, images: Tensor, defense=None, desc: str = "purify", tag: str = "") -> tuple[Tensor, Tensor]:
        """uint8/float [N,3,S,S] -> (D(x), resize-pad(D(x))) float [N,3,S,S] on CPU.

        The denoiser runs once; OURS-rand applies the same random resize-pad as
        ``Defense.purify(rand=True)`` to its output, from a generator seeded by ``tag``.
        """
        from vars_fast.ops import random_resize_pad

        d = defense or self.defense
        S = images.shape[-1]
        g = self.ctx.generator(f"evaluate:rand:{tag or desc}")
        den = torch.empty(images.shape, dtype=torch.float32)
        rnd = torch.empty_like(den)
        bar = self._bar(images.shape[0], desc)
        for s, e in _chunks(images.shape[0], self.bs):
            out = d.purify(_to_float(images[s:e], self.dev).contiguous(memory_format=torch.channels_last))
            den[s:e] = out.cpu()
            rnd[s:e] = random_resize_pad(out, S, d.rand_min_size(S), generator=g)[0].cpu()
            bar.update(e - s)
        bar.close()
        return den, rnd

    @torch.no_grad()
    def gate(self, images: Tensor, den: Tensor) -> tuple[Tensor, float]:
        """detect+denoise: D(x) where the detector flags x, x elsewhere -> (float [N,3,S,S], flagged share)."""
        det, thr = self.defense.detector, float(self.defense.threshold)
        out = torch.empty(images.shape, dtype=torch.float32)
        n_flag = 0
        for s, e in _chunks(images.shape[0], self.bs):
            x, d = _to_float(images[s:e], self.dev), den[s:e].to(self.dev)
            flag = det.distance(x, d).float() > thr
            out[s:e] = torch.where(flag.view(-1, 1, 1, 1), d, x).cpu()
            n_flag += int(flag.sum())
        return out, n_flag / max(images.shape[0], 1)

    def gated_clean(self) -> tuple[Tensor, float]:
        if self._gated_clean is None:
            self._gated_clean = self.gate(self.cat.images, self.clean_purified()[0])
        return self._gated_clean

    @torch.no_grad()
    def encode_all(self, rec, images: Tensor) -> Tensor:
        """[N,3,S,S] (uint8 or float) -> rec.encode features [N, F] on the device."""
        return torch.cat([rec.encode(_to_float(images[s:e], self.dev)).float()
                          for s, e in _chunks(images.shape[0], self.bs)])

    @torch.no_grad()
    def rank(self, rec, images: Tensor) -> dict:
        from vars_fast.metrics import ranking_metrics

        m = ranking_metrics(rec, self.cat, visual=self.encode_all(self.ctx.encoder(rec.name), images), topk=self.topk)
        return {k: float(v) for k, v in m.items()}

    @torch.no_grad()
    def distances(self, images: Tensor, defense=None) -> Tensor:
        d = defense or self.defense
        return torch.cat([d.distance(_to_float(images[s:e], self.dev)).float().cpu()
                          for s, e in _chunks(images.shape[0], self.bs)])

    def load_attack(self, model: str, attack: str, eps) -> Optional[Tensor]:
        path = self.run.attack_file(model, attack, eps)
        if not path.is_file():
            self.log.warning("evaluate: %s missing (attack stage not run for %s %s eps=%s): rows skipped",
                             path, model, attack, eps)
            return None
        return torch.from_numpy(np.load(path))

    def d_clean(self) -> Tensor:
        """Detector distances of the clean held-out test items under the main defence (cached)."""
        if self._d_clean is None:
            self._d_clean = self.distances(self.cat.images[self.test_items])
        return self._d_clean

    def clean_purified(self) -> tuple[Tensor, Tensor]:
        if self._clean_purified is None:
            self._clean_purified = self.purify_all(self.cat.images, desc="purify clean", tag="clean")
        return self._clean_purified

    def eps_for(self, model: str) -> list:
        eps = [e for e in self.cfg.attack.eps]
        if model in self.cfg.eval.curve_models:
            curve = {float(e) for e in self.cfg.eval.curve_eps} | {float(self.cfg.eval.table_eps)}
            return eps if not self.cfg.eval.curve_eps else [e for e in eps if float(e) in curve]
        return [e for e in eps if float(e) == float(self.cfg.eval.table_eps)] or eps[:1]

    # ---------------------------------------------------------------- sections
    def ranking(self) -> None:
        """Tables 2/3 and Fig. 6: Clean/FGSM/PGD x {denoise, denoise+rand} per model."""
        den_c, rnd_c = self.clean_purified()
        table_eps = float(self.cfg.eval.table_eps)
        for name in [m for m in self.models if m in self.cfg.eval.models]:
            rec = self.ctx.recommender(name)
            rows = []
            if not self.run.rows("ranking", model=name, defense="none", attack="clean"):
                rows.append({"model": name, "defense": "none", "attack": "clean", "eps": 0,
                             **self.rank(rec, self.cat.images)})
            for dname, imgs in zip(RANK_DEFENSES, (den_c, rnd_c)):
                rows.append({"model": name, "defense": dname, "attack": "clean", "eps": 0, **self.rank(rec, imgs)})
            gate = self.defense.detector is not None and self.defense.threshold is not None
            if gate:
                imgs, share = self.gated_clean()
                rows.append({"model": name, "defense": "detect+denoise", "attack": "clean", "eps": 0,
                             "flagged": share, **self.rank(rec, imgs)})
            for attack in self.cfg.attack.untargeted:
                for eps in self.eps_for(name):
                    adv = self.load_attack(name, attack, eps)
                    if adv is None:
                        continue
                    den, rnd = self.purify_all(adv, desc=f"purify {name} {attack} eps={eps}", tag=f"{name}:{attack}:{eps}")
                    for dname, imgs in zip(RANK_DEFENSES, (den, rnd)):
                        rows.append({"model": name, "defense": dname, "attack": attack, "eps": eps,
                                     **self.rank(rec, imgs)})
                    if gate and float(eps) == table_eps:
                        imgs, share = self.gate(adv, den)
                        rows.append({"model": name, "defense": "detect+denoise", "attack": attack, "eps": eps,
                                     "flagged": share, **self.rank(rec, imgs)})
                    if name == "VBPR" and float(eps) == table_eps:
                        self._examples(attack, adv, den, rnd)
            self.run.add_rows("ranking", rows)
            self.log.info("evaluate ranking %s: %d rows", name, len(rows))

    def _examples(self, attack: str, adv: Tensor, den: Tensor, rnd: Tensor) -> None:
        """Fig. 7 material: a few test items, clean / D(clean) / adv / D(adv) / D+rand(adv)."""
        idx = self.test_items[:4]
        den_c, rnd_c = self.clean_purified()
        u8 = lambda t: (t.clamp(0, 1) * 255).round().to(torch.uint8).numpy()  # noqa: E731
        self.arrays["ex_items"] = idx.numpy()
        self.arrays["ex_clean"] = self.cat.images[idx].numpy()
        self.arrays["ex_clean_denoised"] = u8(den_c[idx])
        self.arrays[f"ex_{attack}"] = adv[idx].numpy()
        self.arrays[f"ex_{attack}_denoised"] = u8(den[idx])
        self.arrays[f"ex_{attack}_rand"] = u8(rnd[idx])
        self.arrays["ex_eps"] = np.array(float(self.cfg.eval.table_eps))

    def _fgsm_items(self, rec, items: Tensor, eps) -> Tensor:
        """FGSM images uint8 for ``items``: the saved catalogue when there, else attacked now."""
        adv = self.load_attack(rec.name, "fgsm", eps)
        if adv is not None:
            return adv[items]
        from vars_fast.attacks.base import frozen, quantize_within
        from vars_fast.attacks.catalogue import item_loss_fn, sample_item_triples
        from vars_fast.attacks.fgsm import FGSM

        tr = sample_item_triples(self.cat, self.cfg.attack.triples_per_item, self.ctx.generator(f"evaluate:fgsm:{eps}"))
        out = torch.empty((items.numel(),) + tuple(self.cat.images.shape[1:]), dtype=torch.uint8)
        with frozen(rec):
            for s, e in _chunks(items.numel(), self.bs):
                it = items[s:e]
                fn = item_loss_fn(rec, it.to(self.dev), tr.users[it].to(self.dev), tr.others[it].to(self.dev),
                                  tr.sign[it].to(self.dev))
                x_adv = FGSM(fn, float(eps) / 255.0)(self.cat.item_batch(it, self.dev))
                out[s:e] = quantize_within(x_adv.cpu(), self.cat.images[it], float(eps))
        return out

    def _addition(self, rec):
        from vars_fast.defense.addition import Addition

        dcfg = self.cfg.defense
        g = self.ctx.generator("evaluate:addition-users")
        users = torch.randperm(self.cat.n_users, generator=g)[: int(self.cfg.eval.addition_users)]
        add = Addition(rec, lambda x: self.defense.purify(x), users=users, sigma=dcfg.addition_sigma,
                       change=dcfg.addition_change, generator=self.ctx.generator("evaluate:addition-noise"))
        return add

    @torch.no_grad()
    def _addition_change(self, add, images: Tensor, items: Tensor) -> Tensor:
        return torch.cat([add.change(_to_float(images[s:e], self.dev), items[s:e]).cpu()
                          for s, e in _chunks(images.shape[0], self.bs)])

    def detection(self) -> None:
        """Table 4 (ours vs ADDITION per eps) and the Gaussian-noise check."""
        from vars_fast.metrics import detection_metrics

        if self.defense.detector is None or not math.isfinite(self.defense.threshold):
            self.log.warning("evaluate: the defence has no detector/threshold: detection rows skipped")
            return
        if "VBPR" not in self.models:
            self.log.warning("evaluate: no VBPR recommender: detection rows skipped")
            return
        rec, items, thr = self.ctx.recommender("VBPR"), self.test_items, float(self.defense.threshold)
        clean = self.cat.images[items]
        d_clean = self.d_clean()
        add = self._addition(rec)
        val = torch.as_tensor((self.defense.split or {}).get("val") or items.tolist(), dtype=torch.long)
        add.calibrate(_to_float(self.cat.images[val[:256]], self.dev))  # reference energy from clean val items
        c_clean = self._addition_change(add, clean, items)
        self.arrays.update(d_clean=d_clean.numpy(), threshold=np.array(thr), addition_clean=c_clean.numpy())
        rows = []
        for eps in self.cfg.defense.eval_eps:
            adv = self._fgsm_items(rec, items, eps)
            d_adv = self.distances(adv)
            c_adv = self._addition_change(add, adv, items)
            self.arrays[f"d_fgsm_{eps}"] = d_adv.numpy()
            self.arrays[f"addition_fgsm_{eps}"] = c_adv.numpy()
            base = {"attack": "fgsm", "eps": eps, "n_clean": int(d_clean.numel()), "n_adv": int(d_adv.numel())}
            rows.append({"detector": "ours", **base, **_det(detection_metrics(d_clean, d_adv, thr))})
            rows.append({"detector": "addition", **base,
                         **_det(detection_metrics(c_clean, c_adv, float(self.cfg.defense.addition_change)))})
        x = _to_float(clean, "cpu")
        g = self.ctx.generator("evaluate:gaussian")
        for sigma in self.cfg.defense.noise_sigmas:
            noisy = (x + float(sigma) * torch.randn(x.shape, generator=g)).clamp(0, 1)
            d = self.distances(noisy)
            c = self._addition_change(add, noisy, items)
            self.arrays[f"d_gauss_{sigma}"] = d.numpy()
            for det, score, t in (("ours", d, thr), ("addition", c, float(self.cfg.defense.addition_change))):
                share = float((score <= t).float().mean())
                rows.append({"detector": det, "attack": "gaussian", "eps": sigma, "clean_rate": share,
                             "accuracy": share, "fpr": 1.0 - share, "threshold": t, "n_clean": int(score.numel())})
        self.run.add_rows("detection", rows)

    def ablation(self) -> None:
        """Table 5: PGD at table eps on VBPR, full vs no-detector vs no-perceptual."""
        from vars_fast.defense import load_defense
        from vars_fast.metrics import detection_metrics

        eps = self.cfg.eval.table_eps
        if "VBPR" not in self.models:
            return
        adv = self.load_attack("VBPR", "pgd", eps)
        if adv is None:
            return
        rec = self.ctx.recommender("VBPR")
        rows, det_rows = [], []
        variants = [("full", self.defense)]
        for v in ("no-detector", "no-perceptual"):
            path = self.run.checkpoint(f"defense_{v}")
            if path.is_file():
                variants.append((v, self.fast_defense(load_defense(path, device=self.dev))))
            else:
                self.log.warning("evaluate: %s missing: ablation %s skipped", path, v)
        items = self.test_items
        for v, d in variants:
            if v != "full":  # the full model's ranking rows are the main ones (no variant key)
                den, rnd = self.purify_all(adv, defense=d, desc=f"ablation {v}", tag=f"ablation:{v}")
                for dname, imgs in zip(RANK_DEFENSES, (den, rnd)):
                    rows.append({"model": "VBPR", "defense": dname, "attack": "pgd", "eps": eps, "variant": v,
                                 **self.rank(rec, imgs)})
            if d.detector is not None and math.isfinite(d.threshold):
                dc = self.d_clean() if d is self.defense else self.distances(self.cat.images[items], d)
                m = detection_metrics(dc, self.distances(adv[items], d), float(d.threshold))
                det_rows.append({"detector": "ours", "attack": "pgd", "eps": eps, "variant": v, **_det(m)})
        self.run.add_rows("ranking", rows)
        self.run.add_rows("detection", det_rows)

    def targeted(self) -> None:
        """Table 6: prediction shift of the targeted attacks after purification."""
        from vars_fast.attacks.targeted import target_scores
        from vars_fast.metrics import prediction_shift

        meta_path = self.run.path / "attacks" / "targets.json"
        if not meta_path.is_file() or "VBPR" not in self.models:
            self.log.warning("evaluate: %s missing: targeted rows skipped", meta_path)
            return
        info = json.loads(meta_path.read_text())
        model = info.get("model", "VBPR")
        rec = self.ctx.recommender(model)
        targets = torch.as_tensor(info["targets"], dtype=torch.long)
        with torch.no_grad():
            # the attack stage's reference: clean cached features (its "none" rows use the same)
            before = target_scores(rec, targets, rec.item_visual[targets.to(self.dev)].float(), self.cat.n_users)
        rows = []
        for attack in self.cfg.attack.targets:
            for eps in self.cfg.attack.target_eps:
                path = self.run.attack_file(model, attack, eps)
                if not path.is_file():
                    continue
                adv = torch.from_numpy(np.load(path))
                den, rnd = self.purify_all(adv, desc=f"purify {attack} eps={eps}", tag=f"targeted:{attack}:{eps}")
                for dname, imgs in zip(RANK_DEFENSES, (den, rnd)):
                    with torch.no_grad():
                        after = target_scores(rec, targets, self.encode_all(self.ctx.encoder(rec.name), imgs), self.cat.n_users)
                    # NOTE prediction shift only (Table 6's metric): the targets' HR@N of
                    # ``targeted_metrics`` re-scores every user's negatives each call, which was
                    # ~90% of this section's 58 CPU-s on the default preset
                    rows.append({"attack": attack, "eps": eps, "defense": dname, "model": model,
                                 "prediction_shift": float(prediction_shift(before, after))})
        self.run.add_rows("targeted", rows)

    def adaptive(self) -> None:
        """PGD through the defence (EOT + detector hinge) on VBPR: ranking + detection rows."""
        from vars_fast.attacks.adaptive import AdaptivePGD
        from vars_fast.attacks.base import frozen, quantize_within
        from vars_fast.attacks.catalogue import item_loss_fn, sample_item_triples
        from vars_fast.attacks.pgd import default_alpha
        from vars_fast.metrics import detection_metrics

        dcfg, ecfg = self.cfg.defense, self.cfg.eval
        if not dcfg.adaptive or "VBPR" not in self.models:
            return
        rec = self.ctx.recommender("VBPR")
        eps255 = float(ecfg.adaptive_eps or ecfg.table_eps)
        eps, steps = eps255 / 255.0, int(ecfg.adaptive_steps or self.cfg.attack.pgd_steps)
        N = self.cat.n_items
        # which items the adaptive attacker perturbs; the rest keep the non-adaptive PGD image
        n_ad = min(int(ecfg.adaptive_items) or N, N)
        # held-out test items first, so that the detection rate is measured on items the
        # detector never saw; then a seeded draw of the others
        g = self.ctx.generator("evaluate:adaptive-items")
        is_test = torch.zeros(N, dtype=torch.bool)
        is_test[self.test_items] = True
        rest = (~is_test).nonzero().squeeze(1)
        pool = torch.cat([self.test_items, rest[torch.randperm(rest.numel(), generator=g)]])
        chosen = torch.sort(pool[:n_ad]).values
        det_items = chosen[is_test[chosen]]
        base = self.load_attack("VBPR", "pgd", int(eps255)) if n_ad < N else None
        base = base.clone() if base is not None else self.cat.images.clone()
        tr = sample_item_triples(self.cat, self.cfg.attack.triples_per_item, self.ctx.generator("evaluate:adaptive-triples"))
        has_det = self.defense.detector is not None and math.isfinite(self.defense.threshold)
        d_clean = self.d_clean() if has_det else None
        rows, det_rows = [], []
        mods = [rec, self.defense.denoiser] + ([self.defense.detector] if has_det else [])
        for dname, rand in (("denoise", False), ("denoise+rand", True)):
            out = base.clone()
            gen = self.ctx.generator(f"evaluate:adaptive:{dname}")
            bar = self._bar(chosen.numel(), f"adaptive-pgd vs {dname}")
            with frozen(*mods):
                for s, e in _chunks(chosen.numel(), self.bs):
                    it = chosen[s:e]
                    fn = item_loss_fn(rec, it.to(self.dev), tr.users[it].to(self.dev), tr.others[it].to(self.dev),
                                      tr.sign[it].to(self.dev))
                    atk = AdaptivePGD(fn, self.defense, eps, alpha=default_alpha(eps, steps), steps=steps,
                                      eot=dcfg.adaptive_eot, rand=rand, detect_weight=ecfg.adaptive_detect_weight,
                                      generator=gen)
                    x_adv = atk(self.cat.item_batch(it, self.dev))
                    out[it] = quantize_within(x_adv.cpu(), self.cat.images[it], eps255)
                    bar.update(e - s)
            bar.close()
            np.save(self.run.attack_file("VBPR", f"adaptive-pgd-{'rand' if rand else 'det'}", eps255), out.numpy())
            den, rnd = self.purify_all(out, desc=f"purify adaptive {dname}", tag=f"adaptive:{dname}")
            extra = {"n_adaptive_items": int(chosen.numel()), "eot": dcfg.adaptive_eot if rand else 1, "steps": steps}
            rows.append({"model": "VBPR", "defense": dname, "attack": "adaptive-pgd", "eps": int(eps255),
                         **self.rank(rec, rnd if rand else den), **extra})
            if has_det and det_items.numel():
                d_adv = self.distances(out[det_items])
                self.arrays[f"d_adaptive_{dname}"] = d_adv.numpy()
                m = _det(detection_metrics(d_clean, d_adv, float(self.defense.threshold)))
                det_rows.append({"detector": "ours", "attack": "adaptive-pgd", "eps": int(eps255), "variant": dname,
                                 "detection_rate": m["tpr"], "n_adv": int(det_items.numel()), **m})
        self.run.add_rows("ranking", rows)
        self.run.add_rows("detection", det_rows)

    @torch.no_grad()
    def embeddings(self) -> None:
        """Fig. 11 material: detector embeddings of clean / denoised / FGSM / PGD test items."""
        if self.defense.detector is None:
            return
        n = max(1, int(self.cfg.eval.tsne_points) // 4)
        items = self.test_items[:n]
        eps = self.cfg.eval.table_eps
        groups = {"clean": self.cat.images[items], "denoised": self.clean_purified()[0][items]}
        for attack in ("fgsm", "pgd"):
            adv = self.load_attack("VBPR", attack, eps) if "VBPR" in self.models else None
            if adv is not None:
                groups[attack] = adv[items]
        embed = self.defense.detector.embed
        for k, imgs in groups.items():
            self.arrays[f"z_{k}"] = torch.cat([embed(_to_float(imgs[s:e], self.dev)).float().cpu()
                                                for s, e in _chunks(imgs.shape[0], self.bs)]).numpy()

    def run_all(self) -> None:
        sections: list[tuple[str, Callable[[], None]]] = [
            ("ranking", self.ranking), ("detection", self.detection), ("ablation", self.ablation),
            ("targeted", self.targeted), ("adaptive", self.adaptive), ("embeddings", self.embeddings)]
        for name, fn in sections:
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            # CPU seconds beside wall seconds: on a shared machine the wall clock mostly measures
            # the neighbours
            self.timings[f"{name}_s"] = round(time.perf_counter() - t0, 2)
            self.timings[f"{name}_cpu_s"] = round(time.process_time() - c0, 2)
            self.log.info("evaluate %s: %.1f s wall, %.1f s cpu", name, self.timings[f"{name}_s"],
                          self.timings[f"{name}_cpu_s"])
        np.savez_compressed(self.run.path / "figures" / ARRAYS, **self.arrays)
        self.run.update_meta(evaluate={"timings": self.timings, "n_detect_items": int(self.test_items.numel()),
                                       "table_eps": self.cfg.eval.table_eps})


def _det(m: dict) -> dict:
    """Detection metrics as plain JSON values (the confusion matrix as nested lists)."""
    out = {}
    for k, v in m.items():
        if isinstance(v, Tensor):
            v = v.tolist()
        elif isinstance(v, np.ndarray):
            v = v.tolist()
        out[k] = float(v) if isinstance(v, (float, int, np.floating)) and k != "confusion" else v
    return out


def run_stage(ctx) -> None:
    """Evaluate the trained defence in ``ctx.run`` (see the module docstring)."""
    torch.manual_seed(ctx.cfg.run.seed)
    Evaluation(ctx).run_all()
