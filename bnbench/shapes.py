"""Shapes (C, H, W) for the sweep: named sets, and the parser for a user's own list.

``resnet50`` (the default on a GPU) holds the distinct BatchNorm input shapes of
ResNet-50 (torchvision's v1.5 bottlenecks) on a 224x224 image, from the stem's
(64, 112, 112) down to the last block's (2048, 7, 7).  ``quick`` holds one small
shape, odd-sized so that the kernels' masks are exercised, small enough for
Triton's interpreter to get through a quick sweep in a few minutes on a CPU.
"""

import argparse


def resnet50_bn_shapes(image_size=224):
    """The distinct (C, H, W) inputs of ResNet-50's BatchNorm layers, in network order.

    Stem: conv 7x7/2 -> bn (64, s/2) -> maxpool/2.  Then 4 stages of (3, 4, 6, 3)
    bottlenecks of width (64, 128, 256, 512): bn1 after the 1x1 conv at the input
    resolution, bn2 after the 3x3 conv (stride 2 in a stage's first block, stages
    2-4), bn3 (and the downsample's bn) at 4x the width.
    """
    size = image_size // 2
    shapes = [(64, size, size)]
    size //= 2
    for stage, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
        for block in range(blocks):
            shapes.append((width, size, size))  # bn1
            if block == 0 and stage > 0:
                size //= 2
            shapes.append((width, size, size))  # bn2
            shapes.append((4 * width, size, size))  # bn3 and downsample bn
    return tuple(dict.fromkeys(shapes))


SHAPE_SETS = {
    "resnet50": resnet50_bn_shapes(),
    "quick": ((32, 9, 7),),
}


EXAMPLES = {"CxHxW": "64x56x56", "NxCxHxW": "16x4x28x28"}


def parse_shape(text, form="CxHxW"):
    """'64x56x56' -> (64, 56, 56) (form "NxCxHxW": four sizes, the batch first); raises
    argparse.ArgumentTypeError when malformed."""
    parts = text.strip().lower().split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) != len(form.split("x")) or min(dims) < 1:
        raise argparse.ArgumentTypeError(
            f"invalid shape {text!r}: expected {form} with positive integers, "
            f"e.g. {EXAMPLES[form]}")
    return dims


def shape_list(form):
    """argparse type: comma-separated shapes of `form` ("CxHxW" or "NxCxHxW")."""
    def parse(text):
        shapes = tuple(parse_shape(t, form) for t in text.split(",") if t.strip())
        if not shapes:
            raise argparse.ArgumentTypeError("no shapes given")
        return shapes
    return parse


def parse_shapes(text):
    """argparse type for --shapes: set names and/or CxHxW, comma-separated.

    Returns (label, shapes): the label names the set ('custom' for anything else)
    and goes into the output file's name.
    """
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("no shapes given")
    shapes = []
    for item in items:
        if item in SHAPE_SETS:
            shapes.extend(SHAPE_SETS[item])
        elif item[0].isdigit():
            shapes.append(parse_shape(item))
        else:
            raise argparse.ArgumentTypeError(
                f"unknown shape set {item!r} (choose from {', '.join(SHAPE_SETS)}, or give CxHxW)")
    label = items[0] if len(items) == 1 and items[0] in SHAPE_SETS else "custom"
    return label, tuple(dict.fromkeys(shapes))
