"""``idiff data ...``: the preparation commands as argparse sub-commands."""

import argparse

from . import pack, prepare


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``data`` command and its sub-commands; each sets ``func`` to a handler ``(args) -> int``."""
    data = subparsers.add_parser(
        "data", help="prepare image folders for training",
        description="Write a data set as one folder of <class>_<name> image files, or pack a folder into "
                    "shards with one index (docs/packed-data.md). The output appears only when complete; an "
                    "existing non-empty --out is refused.")
    commands = data.add_subparsers(dest="data_command", metavar="DATASET", required=True)

    cifar = _command(commands, "cifar10", _cifar10, "CIFAR-10 from cifar-10-python.tar.gz")
    cifar.add_argument("--src", required=True, help="the python-pickle tarball, cifar-10-python.tar.gz")
    cifar.add_argument("--split", choices=sorted(prepare.CIFAR_BATCHES), default="train")

    lsun = _command(commands, "lsun", _lsun, "an LSUN category LMDB (needs: pip install lmdb)")
    lsun.add_argument("--src", required=True, help="the category's LMDB folder, e.g. bedroom_train_lmdb")
    lsun.add_argument("--image-size", type=int, default=256, help="side of the square output images, px")
    lsun.add_argument("--limit", type=int, default=None, help="convert only the first N records")
    lsun.add_argument("--prefix", default=None, help="class prefix of the file names; default: from --src")

    imagenet = _command(commands, "imagenet", _imagenet, "ImageNet from one folder per synset")
    imagenet.add_argument("--src", required=True, help="the train folder, holding n01440764/ ...")
    imagenet.add_argument("--mode", choices=("link", "copy"), default="link", help="symlink or copy the files")

    packer = _command(commands, "pack", _pack, "pack an image folder into shards with one index, preprocessed "
                                               "at one image size (docs/packed-data.md)")
    packer.add_argument("src", help="the image folder, as train.data_dir takes it")
    packer.add_argument("--image-size", type=int, required=True, help="the model's image size, px")
    packer.add_argument("--workers", type=int, default=None, help="processes; default: one per core")
    packer.add_argument("--shard-size", type=int, default=pack.DEFAULT_SHARD_SIZE,
                        help="bytes of raw pixels per shard; PNG makes shards smaller (default: %(default)s)")

    synthetic = _command(commands, "synthetic", _synthetic, "a toy data set of coloured shapes, class = shape")
    synthetic.add_argument("--n", type=int, default=512, help="number of images")
    synthetic.add_argument("--image-size", type=int, default=32, help="side of the images, px")
    synthetic.add_argument("--classes", type=int, default=4, help=f"shapes used, at most {len(prepare.SHAPES)}")
    synthetic.add_argument("--seed", type=int, default=0, help="the same seed writes the same files")
    return data


def _command(commands, name: str, handler, help_text: str) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help_text, description=help_text)
    parser.add_argument("--out", required=True, help="the folder to create")
    parser.set_defaults(func=handler)
    return parser


def _done(count: int, args) -> int:
    print(f"wrote {count} images to {args.out}")
    return 0


def _cifar10(args) -> int:
    return _done(prepare.cifar10(args.src, args.out, split=args.split), args)


def _lsun(args) -> int:
    count = prepare.lsun(args.src, args.out, image_size=args.image_size, limit=args.limit, prefix=args.prefix)
    return _done(count, args)


def _imagenet(args) -> int:
    return _done(prepare.imagenet(args.src, args.out, mode=args.mode), args)


def _pack(args) -> int:
    return _done(pack.pack(pack.FolderSource(args.src), args.out, args.image_size, workers=args.workers,
                           shard_size=args.shard_size), args)


def _synthetic(args) -> int:
    return _done(prepare.synthetic(args.out, n=args.n, image_size=args.image_size, classes=args.classes,
                                   seed=args.seed), args)
