"""Which original timesteps a respaced chain keeps ("250", "10,15,20", "ddim50")."""


def space_timesteps(num_timesteps: int, section_counts) -> set[int]:
    """The set of original steps to keep.

    ``section_counts`` is a list of per-section counts, a comma string of them, or
    ``"ddimN"``: the evenly strided ``range(0, T, s)`` of exactly N steps, as in DDIM.
    Sections split T as evenly as possible (the first ``T % n`` get one step more); inside a
    section, positions come from a float stride rounded with Python's ``round`` (banker's
    rounding), which is what the released respaced samplers used.
    """
    if isinstance(section_counts, str):
        ddim, counts = parse_respacing(section_counts)
        if ddim:
            desired = counts[0]
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot take exactly {desired} evenly strided steps out of {num_timesteps}")
        section_counts = counts
    base_size, extra = divmod(num_timesteps, len(section_counts))
    kept = set()
    section_start = 0
    for i, count in enumerate(section_counts):
        size = base_size + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot keep {count} steps out of a section of {size}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.add(section_start + round(position))
            position += stride
        section_start += size
    return kept


def parse_respacing(text: str) -> tuple[bool, list[int]]:
    """``"ddim50"`` -> (True, [50]); ``"10,15,20"`` -> (False, [10, 15, 20]); anything else is a ValueError."""
    ddim = text.startswith("ddim")
    parts = (text[len("ddim"):] if ddim else text).split(",")
    if (ddim and len(parts) != 1) or not all(part.strip().isdecimal() and int(part) > 0 for part in parts):
        shown = text if len(text) <= 40 else f"{text[:40]}..."
        raise ValueError(f"{shown!r} is not a respacing: expected a step count ('250'), counts per section "
                         f"('10,15,20') or 'ddimN' (N evenly strided steps), all positive")
    return ddim, [int(part) for part in parts]
