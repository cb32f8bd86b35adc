"""Explain why a state dict does not fit a UNet, in terms of the flags that built them."""

import re


class ArchitectureMismatch(RuntimeError):
    """A checkpoint was made by a model with other flags."""


def _shape(state_dict, key):
    value = state_dict.get(key)
    return tuple(value.shape) if value is not None else None


def describe_architecture(state_dict) -> dict:
    """The creation flags that a UNet state dict reveals (num_heads and image_size leave no trace)."""
    arch = {}
    embed = _shape(state_dict, "time_embed.0.weight")
    if embed:
        arch["num_channels"] = embed[1]
    out = _shape(state_dict, "out.2.weight")
    stem = _shape(state_dict, "input_blocks.0.0.weight")
    if out:
        arch["learn_sigma"] = out[0] == 6
    if out and stem:
        arch["super_res (large_size/small_size)"] = stem[1] == 2 * (out[0] // (2 if out[0] == 6 else 1))
    labels = _shape(state_dict, "label_emb.weight")
    arch["class_cond"] = labels is not None
    if labels:
        arch["num_classes"] = labels[0]
    emb_proj = _shape(state_dict, "input_blocks.1.0.emb_layers.1.weight")
    conv = _shape(state_dict, "input_blocks.1.0.in_layers.2.weight")
    if emb_proj and conv:
        arch["use_scale_shift_norm"] = emb_proj[0] == 2 * conv[0]

    levels, attention_levels = [[]], []
    indices = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"input_blocks\.(\d+)\.", k))})
    for i in indices[1:]:
        if f"input_blocks.{i}.0.op.weight" in state_dict:
            levels.append([])
            continue
        res_out = _shape(state_dict, f"input_blocks.{i}.0.in_layers.2.weight")
        if res_out:
            levels[-1].append(res_out[0])
        if f"input_blocks.{i}.1.qkv.weight" in state_dict and 2 ** (len(levels) - 1) not in attention_levels:
            attention_levels.append(2 ** (len(levels) - 1))
    if levels[0] and "num_channels" in arch:
        arch["num_res_blocks"] = len(levels[0])
        arch["channel_mult"] = ",".join(str(lvl[0] // arch["num_channels"]) for lvl in levels if lvl)
        arch["attention at downsample factors (attention_resolutions)"] = ",".join(map(str, attention_levels)) or "none"
    return arch


def _first(items, n=5):
    items = list(items)
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def check_state_dict(model, state_dict) -> None:
    """Raise ArchitectureMismatch, naming keys and likely flags, unless ``state_dict`` fits ``model``."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [
        f"{k}: checkpoint {list(state_dict[k].shape)} vs model {list(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or misshaped):
        return
    lines = [f"the checkpoint does not fit this {type(model).__name__}:"]
    if missing:
        lines.append(f"  missing keys: {_first(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys: {_first(unexpected)}")
    if misshaped:
        lines.append(f"  mis-shaped: {_first(misshaped, 3)}")
    if unexpected and all(k.startswith("module.") for k in unexpected):
        lines.append("  the keys start with 'module.': this is a DistributedDataParallel state dict; strip the prefix")
    have, want = describe_architecture(state_dict), describe_architecture(expected)
    differ = [f"{name} (checkpoint: {have[name]}, model: {want[name]})"
              for name in want if name in have and have[name] != want[name]]
    if differ:
        lines.append("flags that probably differ: " + "; ".join(differ))
    raise ArchitectureMismatch("\n".join(lines))
