"""Build a model and its diffusion from the original's flat flags (``script_util`` in the original)."""

import difflib

from .diffusion.gaussian_diffusion import LossType, ModelMeanType, ModelVarType, SpacedDiffusion
from .diffusion.respace import space_timesteps
from .diffusion.schedules import get_named_beta_schedule
from .models.unet import SuperResModel, UNetModel

# Resolution -> channel multipliers of the paper's models; other sizes need an explicit channel_mult.
DEFAULT_CHANNEL_MULT = {256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}
DEFAULT_NUM_CLASSES = 1000  # ImageNet, the class-conditional checkpoints' label count

# Beyond the original's 19 flags: architectures it cannot express.
EXTRA_DEFAULTS = {"channel_mult": "", "num_classes": DEFAULT_NUM_CLASSES}


def model_and_diffusion_defaults():
    """The original's 19 flags and defaults."""
    return dict(
        image_size=64,
        num_channels=128,
        num_res_blocks=2,
        num_heads=4,
        num_heads_upsample=-1,
        attention_resolutions="16,8",
        dropout=0.0,
        learn_sigma=False,
        sigma_small=False,
        class_cond=False,
        diffusion_steps=1000,
        noise_schedule="linear",
        timestep_respacing="",
        use_kl=False,
        predict_xstart=False,
        rescale_timesteps=True,
        rescale_learned_sigmas=True,
        use_checkpoint=False,
        use_scale_shift_norm=True,
    )


def sr_model_and_diffusion_defaults():
    """The original's flags of the super-resolution model: no image_size or sigma_small, plus sizes."""
    res = model_and_diffusion_defaults()
    del res["image_size"], res["sigma_small"]
    res.update(large_size=256, small_size=64)
    return res


def _complete(flags, defaults, factory):
    allowed = {**defaults, **EXTRA_DEFAULTS}
    for name in flags:
        if name not in allowed:
            close = difflib.get_close_matches(name, list(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(f"{factory}() got an unknown flag {name!r}{hint}")
    return {**allowed, **flags}


def create_model_and_diffusion(**flags):
    """(UNetModel, diffusion) from the original's flags; missing flags take their defaults."""
    f = _complete(flags, model_and_diffusion_defaults(), "create_model_and_diffusion")
    return create_model(f["image_size"], **_model_kwargs(f)), diffusion_from_flags(f)


def sr_create_model_and_diffusion(**flags):
    """(SuperResModel, diffusion) from the original's super-resolution flags."""
    f = _complete(flags, sr_model_and_diffusion_defaults(), "sr_create_model_and_diffusion")
    return sr_create_model(f["large_size"], f["small_size"], **_model_kwargs(f)), diffusion_from_flags(f)


def _model_kwargs(f):
    names = ("num_channels", "num_res_blocks", "learn_sigma", "class_cond", "use_checkpoint", "attention_resolutions",
             "num_heads", "num_heads_upsample", "use_scale_shift_norm", "dropout", "channel_mult", "num_classes")
    return {name: f[name] for name in names}


def diffusion_from_flags(f):
    return create_gaussian_diffusion(
        steps=f["diffusion_steps"], learn_sigma=f["learn_sigma"], sigma_small=f.get("sigma_small", False),
        noise_schedule=f["noise_schedule"], use_kl=f["use_kl"], predict_xstart=f["predict_xstart"],
        rescale_timesteps=f["rescale_timesteps"], rescale_learned_sigmas=f["rescale_learned_sigmas"],
        timestep_respacing=f["timestep_respacing"],
    )


def create_any_model_and_diffusion(flags: dict):
    """The super-resolution model when the flags give ``large_size``, else the plain UNet."""
    if flags.get("large_size") is not None or flags.get("small_size") is not None:
        flags = {k: v for k, v in flags.items() if k not in ("image_size", "sigma_small")}
        return sr_create_model_and_diffusion(**flags)
    flags = {k: v for k, v in flags.items() if k not in ("large_size", "small_size")}
    return create_model_and_diffusion(**flags)


def parse_channel_mult(channel_mult, image_size) -> tuple[int, ...]:
    if isinstance(channel_mult, str) and channel_mult.strip():
        try:
            return tuple(int(part) for part in channel_mult.split(","))
        except ValueError:
            raise ValueError(f"channel_mult must be comma-separated integers like '1,2,2,2', got {channel_mult!r}") from None
    if channel_mult and not isinstance(channel_mult, str):
        return tuple(int(m) for m in channel_mult)
    if image_size not in DEFAULT_CHANNEL_MULT:
        known = ", ".join(map(str, sorted(DEFAULT_CHANNEL_MULT)))
        raise ValueError(
            f"image_size {image_size} has no default channel multipliers (only {known} do); "
            f"pass channel_mult, e.g. channel_mult='1,2,2,2' (one entry per resolution level)"
        )
    return DEFAULT_CHANNEL_MULT[image_size]


def _attention_factors(attention_resolutions, image_size):
    """Resolutions such as "16,8" -> the downsample factors at which the UNet attends."""
    return tuple(image_size // int(res) for res in str(attention_resolutions).split(",") if res.strip())


def create_model(image_size, num_channels, num_res_blocks, **kwargs):
    return _create_unet(UNetModel, image_size, num_channels, num_res_blocks, **kwargs)


def sr_create_model(large_size, small_size, num_channels, num_res_blocks, **kwargs):
    if small_size >= large_size:
        raise ValueError(f"small_size ({small_size}) must be smaller than large_size ({large_size})")
    return _create_unet(SuperResModel, large_size, num_channels, num_res_blocks, image_size=large_size, **kwargs)


def _create_unet(cls, size, num_channels, num_res_blocks, *, learn_sigma=False, class_cond=False,
                 attention_resolutions="16,8", channel_mult="", num_classes=DEFAULT_NUM_CLASSES, **unet_kwargs):
    """``unet_kwargs``: dropout, num_heads, num_heads_upsample, use_scale_shift_norm, use_checkpoint."""
    return cls(
        in_channels=3,
        model_channels=num_channels,
        out_channels=6 if learn_sigma else 3,
        num_res_blocks=num_res_blocks,
        attention_resolutions=_attention_factors(attention_resolutions, size),
        channel_mult=parse_channel_mult(channel_mult, size),
        num_classes=num_classes if class_cond else None,
        **unet_kwargs,
    )


def create_gaussian_diffusion(*, steps=1000, learn_sigma=False, sigma_small=False, noise_schedule="linear",
                              use_kl=False, predict_xstart=False, rescale_timesteps=False,
                              rescale_learned_sigmas=False, timestep_respacing=""):
    """A SpacedDiffusion always (also without respacing), as in the original: the model wrapper
    that maps and rescales timesteps lives there."""
    betas = get_named_beta_schedule(noise_schedule, steps)
    if use_kl:
        loss_type = LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if learn_sigma:
        var_type = ModelVarType.LEARNED_RANGE
    else:
        var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, timestep_respacing or [steps]),
        betas=betas,
        model_mean_type=ModelMeanType.START_X if predict_xstart else ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
    )
