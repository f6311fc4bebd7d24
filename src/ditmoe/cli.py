"""The ``ditmoe`` command line: prepare, train, export, sample, analyze, info, demo."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from pathlib import Path

from ditmoe.config import ConfigError
from ditmoe.training.checkpoint import CheckpointError
from ditmoe.training.config import TrainingAborted


def _parse_value(text: str):
    """``key=value`` option values: JSON where it parses (numbers, true/false, null, dicts), else a string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _model_opts(pairs: list[str]) -> dict:
    """``moe.capacity_factor=1.25`` -> {"moe": {"capacity_factor": 1.25}}."""
    opts: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--model-opt expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        *parents, leaf = key.split(".")
        node = opts
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = _parse_value(value)
    return opts


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from ditmoe.training.config import TRAIN_PRESETS, TrainConfig

    p.add_argument("--preset", choices=sorted(TRAIN_PRESETS), help="start from a training preset")
    p.add_argument(
        "--model-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model override, e.g. moe.balance_loss_alpha=0.005 or qk_norm=true (repeatable)",
    )
    for f in dataclasses.fields(TrainConfig):
        if f.name == "model_opts":
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            p.add_argument(flag, type=kind, default=None)


def cmd_train(args) -> int:
    from ditmoe.training.config import TrainConfig, train_config
    from ditmoe.training.loop import train

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name != "model_opts"}
    values["model_opts"] = _model_opts(args.model_opt) or None
    cfg = train_config(args.preset, **values)
    try:
        result = train(cfg)
    finally:
        from ditmoe.parallel.distributed import leave_distributed

        leave_distributed()
    say = print if os.environ.get("RANK", "0") == "0" else (lambda *a: None)
    if result.stopped_by_signal:
        from ditmoe.training.signals import EXIT_REQUEUE

        say(f"stopped by a signal at step {result.step}; checkpoint saved, exit {EXIT_REQUEUE} (requeue)")
        return EXIT_REQUEUE
    say(f"trained to step {result.step}; checkpoints in {Path(cfg.out) / 'checkpoints'}")
    return 0


def cmd_export(args) -> int:
    from ditmoe.training.export import export_safetensors

    out = export_safetensors(args.ckpt, args.out, ema=args.ema)
    print(f"wrote {out} ({'EMA' if args.ema else 'raw'} weights, every expert, one file)")
    return 0


def cmd_info(args) -> int:
    from ditmoe.analysis.model_size import model_size
    from ditmoe.config import model_config

    cfg = model_config(
        args.model,
        image_size=args.image_size,
        latent=not args.pixels,
        in_channels=args.in_channels,
        num_classes=args.num_classes,
    )
    s = model_size(cfg)
    seen = "pixels" if args.pixels else "latent"
    print(
        f"model            {cfg.name}  ({args.image_size}px, {seen} {cfg.input_size}x{cfg.input_size}x"
        f"{cfg.in_channels}, {cfg.num_tokens} tokens)"
    )
    print(f"parameters       {s.total_params:,} total  ({_human(s.total_params)})")
    print(f"activated        {s.activated_params:,} per token  ({_human(s.activated_params)})")
    print(f"GFLOPs / image   {s.paper_gflops:.2f}  (paper convention: multiply-accumulates, attention scores excluded)")
    print(f"train FLOPs/img  {s.train_flops / 1e9:.1f} G  (fwd+bwd, 2 FLOPs per MAC, attention included; for MFU)")
    return 0


def _human(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


# Options of `prepare images` that digits has no use for: given to `prepare digits`, they are refused.
IMAGES_ONLY_FLAGS = (
    "--src",
    "--shard-bytes",
    "--workers",
    "--image-format",
    "--class-index",
    "--latents",
    "--vae",
    "--device",
    "--batch-size",
    "--scaling-factor",
)


def _dest(flag: str) -> str:
    """``--shard-size`` -> ``shard_size``, the argparse attribute of a flag."""
    return flag.removeprefix("--").replace("-", "_")


def _given(args, *names: str) -> dict:
    """The options among names given on the command line; left out, they keep the called function's default."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def cmd_prepare(args) -> int:
    if args.dataset == "digits":
        from ditmoe.data.digits import prepare_digits

        refused = [flag for flag in IMAGES_ONLY_FLAGS if getattr(args, _dest(flag)) is not None]
        if refused:
            raise ValueError(f"prepare digits does not take {', '.join(refused)} (options of prepare images)")
        options = _given(args, "image_size", "val_fraction", "shard_size")
        manifest = prepare_digits(Path(args.out), seed=args.seed, **options)
        counts = {k: v["count"] for k, v in manifest["splits"].items()}
        print(f"wrote digits shards to {args.out}: {counts}")
        return 0
    from ditmoe.data.prepare_images import prepare_images

    if args.src is None:
        raise ValueError("prepare images needs --src DIR (a folder with one sub-folder per class)")
    if args.latents and args.vae is None:
        raise ValueError("prepare images --latents needs --vae DIR (a diffusers AutoencoderKL directory)")
    options = _given(
        args,
        "image_size",
        "shard_size",
        "shard_bytes",
        "workers",
        "val_fraction",
        "image_format",
        "latents",
        "device",
        "batch_size",
        "scaling_factor",
    )
    manifest = prepare_images(
        Path(args.src),
        Path(args.out),
        seed=args.seed,
        class_index_path=Path(args.class_index) if args.class_index else None,
        vae_dir=Path(args.vae) if args.vae else None,
        **options,
    )
    counts = {k: (v["count"], len(v["shards"])) for k, v in manifest["splits"].items()}
    print(
        f"wrote {manifest['format']} shards of {manifest['num_classes']} classes to {args.out} "
        f"(samples, shards per split: {counts}; {len(manifest['skipped'])} unreadable files skipped)"
    )
    return 0


def _require_at_least_one(args, *flags: str) -> None:
    """ValueError naming the first of these integer options below 1."""
    for flag in flags:
        value = getattr(args, _dest(flag))
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")


def _class_ids(text: str) -> list[int]:
    """--classes "0,3,7" -> [0, 3, 7]."""
    try:
        return [int(c) for c in text.split(",")]
    except ValueError:
        raise ValueError(f"--classes must be comma-separated class ids, got {text!r}") from None


def _guide_channels(text: str) -> str | int:
    """--guide-channels "official" | "all" | N -> generate's guide_channels."""
    if text in ("official", "all"):
        return text
    if text.isascii() and text.isdigit() and int(text) >= 1:
        return int(text)
    raise ValueError(f"--guide-channels must be 'official', 'all' or a channel count >= 1, got {text!r}")


OFFICIAL_SUFFIXES = (".pt", ".pth")  # the official code's checkpoints; ours are folders or .safetensors


def _sampler(args, device: str | None):
    """The sampler of ``--ckpt``: ours (its config inside), or an official .pt given --model and --diffusion."""
    from ditmoe.config import model_config
    from ditmoe.sampling.sample import load_official_sampler, load_sampler

    official = Path(args.ckpt).suffix in OFFICIAL_SUFFIXES
    if official and not (args.model and args.diffusion):
        raise ConfigError(
            f"{args.ckpt} is an official DiT-MoE checkpoint, which carries no config: give --model (e.g. "
            "DiT-MoE-XL/2-8E2A) and --diffusion (ddpm for the S and B releases, rf for XL and G)"
        )
    if not official:
        given = [flag for flag, value in (("--model", args.model), ("--diffusion", args.diffusion)) if value]
        if given:
            verb = "are" if len(given) > 1 else "is"
            raise ConfigError(
                f"{' and '.join(given)} {verb} for official .pt checkpoints; {args.ckpt} carries its config"
            )
        return load_sampler(args.ckpt, ema=False if args.no_ema else None, device=device)
    cfg = model_config(args.model, image_size=args.image_size)
    return load_official_sampler(args.ckpt, cfg, args.diffusion, ema=not args.no_ema, device=device)


def cmd_sample(args) -> int:
    from ditmoe.sampling.npz import balanced_labels, check_npz_path, launcher_world, write_npz
    from ditmoe.sampling.sample import check_image_path, generate, images_of, latent_decoder, save_grid
    from ditmoe.training.config import kernel_tiles
    from ditmoe_kernels.tiles import tile_overrides

    _require_at_least_one(args, "--per-class", "--upscale", "--batch-size")
    npz = Path(args.out).suffix == ".npz"
    if args.num_samples is not None:
        _require_at_least_one(args, "--num-samples")
        check_npz_path(args.out)  # N samples for FID go to an .npz, not into a grid
    if not npz:
        check_image_path(args.out)  # before sampling, not after
    guide_channels = _guide_channels(args.guide_channels)
    tiles = kernel_tiles(args.kernel_tiles)
    with launcher_world() if npz else contextlib.nullcontext((0, 1, None)) as (rank, world, device):
        sampler = _sampler(args, device)
        decoder = latent_decoder(sampler, args.vae)
        classes = _class_ids(args.classes) if args.classes else list(range(sampler.model.cfg.num_classes))
        per_class = [c for c in classes for _ in range(args.per_class)]
        guidance = dict(cfg_scale=args.cfg_scale, steps=args.steps, guide_channels=guide_channels)
        with tile_overrides(**tiles):
            if npz:
                labels = balanced_labels(args.num_samples, classes) if args.num_samples else per_class
                write_npz(
                    sampler, labels, args.out, batch_size=args.batch_size, seed=args.seed, decoder=decoder, **guidance
                )
                if rank == 0:
                    print(
                        f"wrote {len(labels)} samples of {len(classes)} classes from {sampler.checkpoint} to "
                        f"{args.out} ({world} rank{'s' if world > 1 else ''})"
                    )
                return 0
            images = images_of(generate(sampler, per_class, seed=args.seed, **guidance), decoder)
    path = save_grid(images, args.out, nrow=args.per_class, upscale=args.upscale)
    print(f"wrote {len(classes)} classes x {args.per_class} samples from {sampler.checkpoint} to {path}")
    return 0


def cmd_analyze(args) -> int:
    import torch

    from ditmoe.analysis.heatmap import expert_choice_heatmaps, listed
    from ditmoe.analysis.specialisation import count_expert_choices
    from ditmoe.data.shards import load_split_tensors
    from ditmoe.sampling.sample import load_sampler

    _require_at_least_one(args, "--max-images", "--levels", "--batch-size")
    sampler = load_sampler(args.ckpt, ema=False if args.no_ema else None)
    cfg = sampler.model.cfg
    x, y = load_split_tensors(Path(args.data), args.split)
    want = (cfg.in_channels, cfg.input_size, cfg.input_size)
    if tuple(x.shape[1:]) != want:
        raise ConfigError(
            f"{args.data} ({args.split}) holds inputs of shape {tuple(x.shape[1:])}; the model in "
            f"{sampler.checkpoint} takes {want}"
        )
    if len(x) > args.max_images:
        keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))[: args.max_images].sort()
        x, y = x[keep.values], y[keep.values]
    choices = count_expert_choices(
        sampler.model, sampler.diffusion, x, y, level_buckets=args.levels, batch_size=args.batch_size, seed=args.seed
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "expert_choices.json").write_text(
        json.dumps({"checkpoint": str(sampler.checkpoint), "data": args.data, "split": args.split, **choices.to_json()})
    )
    plots = expert_choice_heatmaps(choices, out)
    print(f"routed {choices.images} {args.split} images x {args.levels} noise levels through {sampler.checkpoint}")
    for layer, (c, e, share, avg) in enumerate(choices.most_specialised()):
        print(f"  layer {layer:2d}: class {c} sends {share:.0%} of its choices to expert {e} (layer average {avg:.0%})")
    missing = choices.classes_without_images()
    if missing:
        names = listed([str(c) for c in missing])
        print(f"no {args.split} images of class {names}: their rows in {plots[0].name} are grey (nothing to count)")
    print(f"wrote {plots[0]}, {plots[1]} and {out / 'expert_choices.json'}")
    return 0


def cmd_demo(args) -> int:
    from ditmoe.demo import print_report, run_demo

    report = run_demo(Path(args.out), steps=args.steps, cfg_scale=args.cfg_scale, ranks=args.ranks)
    print_report(report, Path(args.out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ditmoe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="parameter counts and GFLOPs of a model preset")
    p.add_argument("--model", required=True, help="e.g. DiT-MoE-S/2-8E2A")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument(
        "--pixels",
        action="store_true",
        help="the model sees the image itself (as the digits demo), not SD-VAE latents at image size / 8",
    )
    p.add_argument("--in-channels", type=int, help="input channels (default: 4 for latents, 1 for --pixels)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("prepare", help="write a dataset as webdataset shards")
    p.add_argument(
        "dataset",
        choices=["digits", "images"],
        help="digits: scikit-learn's embedded 8x8 digits; images: a class-per-folder tree (--src)",
    )
    p.add_argument("--out", required=True)
    p.add_argument("--src", help="images: root folder with one sub-folder of images per class")
    p.add_argument("--image-size", type=int, help="digits: 8/16/32/64 (default 16); images: 256 or 512 (default 256)")
    p.add_argument("--shard-size", type=int, help="samples per shard (digits: default 512; images: default 1000)")
    p.add_argument("--shard-bytes", type=int, help="images: start a new shard after about this many bytes")
    p.add_argument("--workers", type=int, help="images: decoding/cropping processes (default 0: in-process)")
    p.add_argument(
        "--val-fraction", type=float, help="stratified val split (digits: default 0.2; images: default none)"
    )
    p.add_argument("--image-format", choices=["jpg", "png"], help="images: stored encoding (default jpg)")
    p.add_argument("--class-index", help="images: an existing classes.json to reuse (name -> id)")
    p.add_argument(
        "--latents", action="store_true", default=None, help="images: store SD-VAE latents instead of pixels"
    )
    p.add_argument("--vae", help="images --latents: a diffusers AutoencoderKL directory (e.g. sd-vae-ft-ema)")
    p.add_argument("--device", help="images --latents: auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=int, help="images --latents: images per VAE batch (default 32)")
    p.add_argument("--scaling-factor", type=float, help="images --latents: override the VAE's scaling factor")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a DiT-MoE (one process; under a launcher see python -m ditmoe.train)")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="consolidate a checkpoint (any EP size) into one .safetensors file")
    p.add_argument("ckpt", help="a checkpoint directory, or a run directory (newest checkpoint)")
    p.add_argument("--out", required=True, help="e.g. model.safetensors")
    p.add_argument(
        "--ema",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="export the EMA weights (default) or, with --no-ema, the raw ones",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "sample",
        help="class-conditional samples from a checkpoint: an image grid (one row per class), or an .npz for FID",
    )
    p.add_argument(
        "--ckpt",
        required=True,
        help="a checkpoint directory, a run directory (newest checkpoint), an exported .safetensors, or an official "
        "DiT-MoE .pt (with --model and --diffusion)",
    )
    p.add_argument("--model", help="an official .pt's model, e.g. DiT-MoE-XL/2-8E2A")
    p.add_argument("--diffusion", choices=["ddpm", "rf"], help="an official .pt's: ddpm (S, B releases) or rf (XL, G)")
    p.add_argument("--image-size", type=int, default=256, help="an official .pt's image size (latents: 1/8)")
    p.add_argument("--classes", help="comma-separated class ids (default: all)")
    p.add_argument("--per-class", type=int, default=8)
    p.add_argument(
        "--num-samples",
        type=int,
        help="with an .npz --out: this many samples, the classes taking turns (ADM's layout: arr_0 uint8 NHWC images, "
        "arr_1 labels); ranks of a launcher (torchrun, srun) share the batches",
    )
    p.add_argument("--batch-size", type=int, default=32, help="samples per sampling call (.npz output)")
    p.add_argument(
        "--vae",
        help="a latent model's decoder: a diffusers AutoencoderKL folder (default: the one its training data was "
        "encoded with, from the data's manifest)",
    )
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--steps", help="DDPM respacing ('250', 'ddim50') or Euler steps for rectified flow")
    p.add_argument(
        "--guide-channels",
        default="official",
        help="channels classifier-free guidance acts on: 'official' (default; as the official sampler: the first 3 for "
        "DDPM, all for rectified flow), 'all', or N (the first N)",
    )
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--upscale", type=int, default=1, help="nearest-neighbour upscaling of the grid")
    p.add_argument("--kernel-tiles", default="", help="Triton tile overrides: a JSON file (as train's) or JSON text")
    p.add_argument("--out", default="samples.png", help="an image (.png, ...) for a grid, or .npz for FID")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("analyze", help="expert specialisation of a checkpoint: routing by class and by noise level")
    p.add_argument("--ckpt", required=True, help="a checkpoint directory, a run directory or an exported file")
    p.add_argument("--data", required=True, help="a prepared dataset (ditmoe prepare) of the model's input kind")
    p.add_argument("--split", default="val", help="the dataset split to route (default val)")
    p.add_argument("--max-images", type=int, default=2000, help="route at most this many images (random subset)")
    p.add_argument("--levels", type=int, default=10, help="noise-level buckets; each image is routed once per bucket")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="analysis", help="folder for the heatmaps and expert_choices.json")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("demo", help="prepare digits, train a tiny DiT-MoE, sample, judge and plot (make demo)")
    p.add_argument("--out", default="runs/digits-demo")
    p.add_argument("--steps", type=int, help="training steps (default: the digits-demo preset)")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--ranks", type=int, default=2, help="CPU training ranks, experts split over them (1: no launcher)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError, CheckpointError) as e:
        print(f"ditmoe {args.command}: error: {e}", file=sys.stderr)
        return 2
    except TrainingAborted as e:
        print(f"ditmoe {args.command}: aborted: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
