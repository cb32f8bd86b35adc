"""``idiff data ...``: the preparation commands as argparse sub-commands."""

import argparse

from . import pack, prepare
from .reader import DataError


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
    _packing_options(cifar, "pack the 32 px images directly instead of writing files")

    lsun = _command(commands, "lsun", _lsun, "an LSUN category LMDB (needs: pip install lmdb)")
    lsun.add_argument("--src", required=True, help="the category's LMDB folder, e.g. bedroom_train_lmdb")
    lsun.add_argument("--image-size", type=int, default=256, help="side of the square output images, px")
    lsun.add_argument("--limit", type=int, default=None, help="convert only the first N records")
    lsun.add_argument("--prefix", default=None, help="class prefix of the file names; default: from --src")
    _packing_options(lsun, "pack the --image-size squares directly: no file per record")

    imagenet = _command(commands, "imagenet", _imagenet, "ImageNet from one folder per synset")
    imagenet.add_argument("--src", required=True, help="the train folder, holding n01440764/ ...")
    imagenet.add_argument("--mode", choices=("link", "copy"), default="link", help="symlink or copy the files")
    imagenet.add_argument("--image-size", type=int, default=None, help="with --packed: the model's image size, px")
    _packing_options(imagenet, "pack at --image-size directly instead of linking or copying the files")

    packer = _command(commands, "pack", _pack, "pack an image folder into shards with one index, preprocessed "
                                               "at one image size (docs/packed-data.md)")
    packer.add_argument("src", help="the image folder, as train.data_dir takes it")
    packer.add_argument("--image-size", type=int, required=True, help="the model's image size, px")
    _worker_options(packer)

    synthetic = _command(commands, "synthetic", _synthetic, "a toy data set of coloured shapes, class = shape")
    synthetic.add_argument("--n", type=int, default=512, help="number of images")
    synthetic.add_argument("--image-size", type=int, default=32, help="side of the images, px")
    synthetic.add_argument("--classes", type=int, default=4, help=f"shapes used, at most {len(prepare.SHAPES)}")
    synthetic.add_argument("--seed", type=int, default=0, help="the same seed writes the same files")
    return data


def _worker_options(parser) -> None:
    parser.add_argument("--workers", type=int, default=None, help="packing processes; default: one per core")
    parser.add_argument("--shard-size", type=int, default=pack.DEFAULT_SHARD_SIZE,
                        help="bytes of raw pixels per shard; PNG makes shards smaller (default: %(default)s)")


def _packing_options(parser, help_text: str) -> None:
    parser.add_argument("--packed", action="store_true", help=f"{help_text} (docs/packed-data.md)")
    _worker_options(parser)


def _write(source, args, image_size: int) -> int:
    """Pack ``source`` into --out with --packed; else write it as a folder of files."""
    if args.packed:
        return _done(pack.pack(source, args.out, image_size, workers=args.workers, shard_size=args.shard_size), args)
    return _done(prepare.write_folder(source, args.out), args)


def _command(commands, name: str, handler, help_text: str) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help_text, description=help_text)
    parser.add_argument("--out", required=True, help="the folder to create")
    parser.set_defaults(func=handler)
    return parser


def _done(count: int, args) -> int:
    print(f"wrote {count} images to {args.out}")
    return 0


def _cifar10(args) -> int:
    return _write(prepare.CifarSource(args.src, split=args.split), args, 32)


def _lsun(args) -> int:
    source = prepare.LsunSource(args.src, image_size=args.image_size, limit=args.limit, prefix=args.prefix)
    return _write(source, args, args.image_size)


def _imagenet(args) -> int:
    if not args.packed:
        return _done(prepare.imagenet(args.src, args.out, mode=args.mode), args)
    if args.image_size is None:
        raise DataError("imagenet --packed needs --image-size: the size the images are resized and cropped to")
    return _write(prepare.ImagenetSource(args.src), args, args.image_size)


def _pack(args) -> int:
    return _done(pack.pack(pack.FolderSource(args.src), args.out, args.image_size, workers=args.workers,
                           shard_size=args.shard_size), args)


def _synthetic(args) -> int:
    return _done(prepare.synthetic(args.out, n=args.n, image_size=args.image_size, classes=args.classes,
                                   seed=args.seed), args)
