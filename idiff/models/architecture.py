"""The UNet's shape from the original's flags: channel multipliers per level and the levels that attend.

Plain functions of the flags, so that the spec can check an architecture without building it.
"""

# Output size (px) -> channel multiplier per level of the paper's models; other sizes need an explicit channel_mult.
CHANNEL_MULT_BY_SIZE = {256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}


def parse_channel_mult(channel_mult: str, image_size: int) -> tuple[int, ...]:
    """``channel_mult`` such as "1,2,2,2" as a tuple; '' means the paper's multipliers for ``image_size``."""
    if channel_mult.strip():
        return tuple(int(part) for part in channel_mult.split(",") if part.strip())
    if image_size not in CHANNEL_MULT_BY_SIZE:
        known = ", ".join(map(str, sorted(CHANNEL_MULT_BY_SIZE)))
        raise ValueError(
            f"image_size {image_size} has no default channel multipliers (only {known} do); "
            f"pass channel_mult, e.g. channel_mult='1,2,2,2' (one entry per resolution level)"
        )
    return CHANNEL_MULT_BY_SIZE[image_size]


def attention_factors(attention_resolutions: str, image_size: int) -> tuple[int, ...]:
    """Resolutions such as "16,8" -> the downsample factors at which the UNet attends."""
    return tuple(image_size // int(res) for res in str(attention_resolutions).split(",") if res.strip())
