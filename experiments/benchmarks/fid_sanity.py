"""Does difflab's FID rank image sets sensibly? Real vs real, blurred, noise, and a memorising generator.

    .venv/bin/python experiments/benchmarks/fid_sanity.py            # measure: appends raw/fid_sanity.jsonl
    .venv/bin/python experiments/benchmarks/fid_sanity.py --report   # its RESULTS.md block, from raw/ only

Per dataset (digits, fashion_mnist, twemoji: the data of the README's claims), with the features the
benchmarks use (conf/metrics/classifier.yaml's defaults, trained on the data's training split and cached
in data_cache/fid as time_to_quality.py finds them), the reference is half A of the FID reference split
(the held-out `test` split where the data has one, as time_to_quality.py and `difflab-eval
real_split=test` use; digits has none, so its training images) and each row scores n images against it:

- ``real``: half B, disjoint from A (what a perfect generator would score: the noise floor);
- ``blur``: half B under a Gaussian blur (σ = 1 px, at the training resolution);
- ``noise``: uniform noise images;
- ``memorise``: n random training images, i.e. a generator that copies its training set;
- ``memorise_shift``: the same training images moved right by one pixel.

A usable metric puts ``real`` lowest, ``memorise`` about level with it (not far below: that would reward
copying), and ``blur`` and ``noise`` far above. Each seed draws other halves, training images and noise;
FID and KID (torchmetrics, through difflab's FIDEvaluator, as training and difflab-eval compute them)
per cell are a median with its min-max interval over 3 seeds (the protocol, protocol.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from protocol import RAW, Recorder, interval, latest, load, machine_line, table, write_section  # noqa: E402

BENCH = "fid_sanity"
# The FID reference split per dataset: held out where the data has one (the benchmarks' choice).
REFERENCE = {"digits": None, "fashion_mnist": "test", "twemoji": "test"}
ROWS = ["real", "blur", "noise", "memorise", "memorise_shift"]
ROW_TEXT = {
    "real": "real vs real (disjoint halves)",
    "blur": "real vs blurred real (σ = 1 px)",
    "noise": "real vs uniform noise",
    "memorise": "real vs training images (memorising)",
    "memorise_shift": "real vs training images moved 1 px",
}
BLUR_SIGMA = 1.0  # pixels at the training resolution


def blur(images, sigma: float = BLUR_SIGMA):
    import torchvision.transforms.functional as TF

    return TF.gaussian_blur(images, kernel_size=2 * round(2 * sigma) + 1, sigma=sigma)


def shift_right(images, pixels: int = 1):
    """Moved right by ``pixels``; the left edge column repeated."""
    import torch

    return torch.cat([images[..., :, :1].expand(*images.shape[:-1], pixels), images[..., :, :-pixels]], -1)


def all_images(datamodule) -> object:
    """Every image of a datamodule without augmentation, float [0, 1] (as FID's real images are)."""
    import torch

    return torch.cat(list(datamodule.real_images(len(datamodule.train_set), 4096)))


def measure(opts: argparse.Namespace) -> None:
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from difflab.compose import compose
    from difflab.evaluate import reference_split
    from difflab.metrics.fid import FIDEvaluator, extract_features

    rec = Recorder(BENCH, Path(opts.raw_dir))
    cpu = torch.device("cpu")
    for data in opts.data:
        t0 = time.time()
        cfg = compose("train", [f"data={data}", "seed=0"])
        train_dm = instantiate(cfg.data)
        train_dm.setup()
        extractor = instantiate(cfg.metrics.extractor)
        extractor.prepare(train_dm)  # the cached classifier, or trained on the training split once
        data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
        split = REFERENCE[data]
        ref_dm = reference_split(data_cfg, split, data) if split else train_dm
        n = min(opts.num, len(ref_dm.train_set) // 2)
        ref_images, train_images = all_images(ref_dm), all_images(train_dm)
        print(f"{data}: classifier {extractor.identity} ({time.time() - t0:.0f} s); n={n}", flush=True)
        for seed in range(opts.seeds):
            g = torch.Generator().manual_seed(seed)
            order = torch.randperm(len(ref_dm.train_set), generator=g)
            half_a, half_b = ref_images[order[:n]], ref_images[order[n : 2 * n]]
            copies = train_images[torch.randperm(len(train_images), generator=g)[:n]]
            candidates = {
                "real": half_b,
                "blur": blur(half_b),
                "noise": torch.rand(half_b.shape, generator=g),
                "memorise": copies,
                "memorise_shift": shift_right(copies),
            }
            reference = extract_features(extractor, half_a.split(500), cpu)
            for row in ROWS:
                t1 = time.time()
                evaluator = FIDEvaluator(extractor, n, kid=True)
                evaluator.set_real_features(reference)
                for batch in candidates[row].split(500):
                    evaluator.fid.update(batch, real=False)
                    evaluator.kid.update(batch, real=False)
                torch.manual_seed(seed)  # KID's subsets are drawn from the global RNG
                kid, kid_std = (float(x) for x in evaluator.kid.compute())
                values = {"fid": float(evaluator.fid.compute()), "kid": kid, "kid_std": kid_std}
                rec.record(
                    data=data,
                    row=row,
                    seed=seed,
                    n=n,
                    reference=split or "train",
                    reference_size=len(ref_dm.train_set),
                    train_size=len(train_dm.train_set),
                    resolution=int(cfg.data.resolution),
                    extractor=extractor.identity,
                    kid_subset_size=evaluator.kid.subset_size,
                    kid_subsets=evaluator.kid.subsets,
                    seconds=round(time.time() - t1, 2),
                    **values,
                )
                print(
                    f"  seed {seed} {row:15s} FID {values['fid']:9.3f}  KID {kid:.5f} ± {kid_std:.5f}",
                    flush=True,
                )


def report() -> None:
    records = load(BENCH)
    if not records:
        sys.exit(f"no raw records in raw/{BENCH}.jsonl: run the script first")
    blocks = []
    for data in REFERENCE:
        recs = latest(records, data=data)
        if not recs:
            continue
        first = recs[0]
        ref = (
            f"its held-out `{first['reference']}` split ({first['reference_size']} images)"
            if first["reference"] != "train"
            else f"its training images ({first['reference_size']}; digits has no held-out split, so the "
            "memorising rows draw from the reference's own pool and are not an independent check)"
        )
        rows = []
        real_fid = interval([r["fid"] for r in recs if r["row"] == "real"])
        for row in ROWS:
            mine = [r for r in recs if r["row"] == row]
            if not mine:
                continue
            fid, kid = interval([r["fid"] for r in mine]), interval([r["kid"] for r in mine])
            kid_std = sorted(r["kid_std"] for r in mine)[len(mine) // 2]
            ratio = fid.median / real_fid.median if real_fid.median else float("nan")
            rows.append(
                [
                    ROW_TEXT[row],
                    str(fid).split(" (")[0],
                    f"{ratio:.2f}",
                    f"{str(kid).split(' (')[0]} (± {kid_std:.2g})",
                ]
            )
        seeds = len({r["seed"] for r in recs})
        caption = (
            f"**{data}** ({first['resolution']} px): n = {first['n']} images per set, reference = half A "
            f"of {ref}; classifier {first['extractor']} (trained on the {first['train_size']} training "
            f"images). Median [min, max] over {seeds} seeds (other halves, training images and noise); "
            f"KID ± its std over {first['kid_subsets']} subsets of {first['kid_subset_size']} (median seed)."
        )
        body = table(["row", "FID", "FID / real-vs-real", "KID (± std over subsets)"], rows)
        blocks.append(f"{caption}\n\n{body}\n\n{machine_line(recs)}")
    text = (
        "### FID sanity: does the metric rank image sets sensibly?\n\n"
        "From `experiments/benchmarks/fid_sanity.py` (raw/fid_sanity.jsonl). A usable metric puts "
        "real-vs-real lowest, the memorising generator about level with it (not far below), blur and noise "
        "far above.\n\n" + "\n\n".join(blocks)
    )
    write_section(BENCH, text)
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report", action="store_true", help="write the RESULTS.md block from raw/ only")
    ap.add_argument("--data", nargs="+", default=list(REFERENCE), choices=list(REFERENCE))
    ap.add_argument("--num", type=int, default=1000, help="images per set (at most half the reference split)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument(
        "--raw-dir", default=str(RAW), help="where the raw JSON lines go (a trial run: elsewhere)"
    )
    opts = ap.parse_args()
    if opts.report:
        report()
    else:
        measure(opts)


if __name__ == "__main__":
    main()
