"""Build a model and its diffusion from the original's flat flags (the original's ``script_util``).

Every default here is a field default of the spec's ModelSection and DiffusionSection, and every flag
set is validated by them, so a flag means the same in a YAML spec, on the command line and here.
"""

import difflib

from .diffusion.gaussian_diffusion import LossType, ModelMeanType, ModelVarType, SpacedDiffusion
from .diffusion.respace import space_timesteps
from .diffusion.schedules import get_named_beta_schedule
from .jobspec.schema import DiffusionSection, ModelSection
from .models.architecture import attention_factors, parse_channel_mult
from .models.unet import SuperResModel, UNetModel

# Every model and diffusion field of the spec with its default.
SPEC_DEFAULTS = {name: field.get_default(call_default_factory=True)
                 for section in (ModelSection, DiffusionSection) for name, field in section.model_fields.items()}

# The original's 19 flags (its model_and_diffusion_defaults), in its order.
ORIGINAL_FLAGS = (
    "image_size", "num_channels", "num_res_blocks", "num_heads", "num_heads_upsample", "attention_resolutions",
    "dropout", "learn_sigma", "sigma_small", "class_cond", "diffusion_steps", "noise_schedule", "timestep_respacing",
    "use_kl", "predict_xstart", "rescale_timesteps", "rescale_learned_sigmas", "use_checkpoint",
    "use_scale_shift_norm",
)
PLAIN_ONLY_FLAGS = ("image_size", "sigma_small")  # not flags of the original's super-resolution model

# The drop-in API's only defaults that are not the spec's, both the original's (tests/test_defaults.py pins them):
# - the super-resolution flags describe a 64 -> 256 px upsampler, while in the spec large_size and small_size
#   default to None (= not a super-resolution model);
# - create_gaussian_diffusion's keyword defaults of the two rescale flags are False, as in the original function,
#   while the flags (and the spec) default to True.
SUPER_RES_SIZE_DEFAULTS = {"large_size": 256, "small_size": 64}
GAUSSIAN_DIFFUSION_RESCALE_DEFAULTS = {"rescale_timesteps": False, "rescale_learned_sigmas": False}

NUM_CLASSES = SPEC_DEFAULTS["num_classes"]


def model_and_diffusion_defaults() -> dict:
    """The original's 19 flags and their defaults."""
    return {name: SPEC_DEFAULTS[name] for name in ORIGINAL_FLAGS}


def sr_model_and_diffusion_defaults() -> dict:
    """The original's flags of the super-resolution model: no image_size or sigma_small, plus the two sizes."""
    flags = {k: v for k, v in model_and_diffusion_defaults().items() if k not in PLAIN_ONLY_FLAGS}
    return {**flags, **SUPER_RES_SIZE_DEFAULTS}


def create_model_and_diffusion(**flags):
    """(UNetModel, diffusion) from the original's flags (and channel_mult, num_classes); missing flags take
    their defaults."""
    _refuse_unknown(flags, set(SPEC_DEFAULTS) - set(SUPER_RES_SIZE_DEFAULTS), "create_model_and_diffusion")
    return model_and_diffusion(*_sections(flags))


def sr_create_model_and_diffusion(**flags):
    """(SuperResModel, diffusion) from the original's super-resolution flags."""
    _refuse_unknown(flags, set(SPEC_DEFAULTS) - set(PLAIN_ONLY_FLAGS), "sr_create_model_and_diffusion")
    return model_and_diffusion(*_sections({**SUPER_RES_SIZE_DEFAULTS, **flags}))


def diffusion_from_flags(flags: dict):
    """The diffusion alone of flat model and diffusion flags (scripts and benchmarks that keep the original's)."""
    _refuse_unknown(flags, set(SPEC_DEFAULTS), "diffusion_from_flags")
    return diffusion_for(*_sections(flags))


def create_model(image_size, num_channels, num_res_blocks, learn_sigma, class_cond, use_checkpoint,
                 attention_resolutions, num_heads, num_heads_upsample, use_scale_shift_norm, dropout, **extra):
    """The original's ``create_model``, arguments in its order; ``extra``: channel_mult, num_classes."""
    return model_from_section(ModelSection(
        image_size=image_size, num_channels=num_channels, num_res_blocks=num_res_blocks, learn_sigma=learn_sigma,
        class_cond=class_cond, use_checkpoint=use_checkpoint, attention_resolutions=attention_resolutions,
        num_heads=num_heads, num_heads_upsample=num_heads_upsample, use_scale_shift_norm=use_scale_shift_norm,
        dropout=dropout, **extra))


def sr_create_model(large_size, small_size, num_channels, num_res_blocks, learn_sigma, class_cond, use_checkpoint,
                    attention_resolutions, num_heads, num_heads_upsample, use_scale_shift_norm, dropout, **extra):
    """The original's ``sr_create_model``, arguments in its order; ``extra``: channel_mult, num_classes."""
    return model_from_section(ModelSection(
        large_size=large_size, small_size=small_size, num_channels=num_channels, num_res_blocks=num_res_blocks,
        learn_sigma=learn_sigma, class_cond=class_cond, use_checkpoint=use_checkpoint,
        attention_resolutions=attention_resolutions, num_heads=num_heads, num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm, dropout=dropout, **extra))


def model_from_section(model: ModelSection) -> UNetModel:
    """The UNet a validated model section describes (a SuperResModel when it has large_size)."""
    size = model.output_size
    unet_kwargs = dict(
        in_channels=3,
        model_channels=model.num_channels,
        out_channels=6 if model.learn_sigma else 3,
        num_res_blocks=model.num_res_blocks,
        attention_resolutions=attention_factors(model.attention_resolutions, size),
        dropout=model.dropout,
        channel_mult=parse_channel_mult(model.channel_mult, size),
        num_classes=model.num_classes if model.class_cond else None,
        use_checkpoint=model.use_checkpoint,
        num_heads=model.num_heads,
        num_heads_upsample=model.num_heads_upsample,
        use_scale_shift_norm=model.use_scale_shift_norm,
    )
    if model.is_super_res:
        return SuperResModel(image_size=size, **unet_kwargs)
    return UNetModel(**unet_kwargs)


def _refuse_unknown(flags: dict, allowed: set, caller: str) -> None:
    for name in flags:
        if name not in allowed:
            close = difflib.get_close_matches(name, sorted(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(f"{caller}() got an unknown flag {name!r}{hint}")


def _sections(flags: dict) -> tuple[ModelSection, DiffusionSection]:
    """Flat flags -> the validated spec sections (a pydantic ValidationError, a ValueError, names a bad one)."""
    return (ModelSection(**{k: v for k, v in flags.items() if k in ModelSection.model_fields}),
            DiffusionSection(**{k: v for k, v in flags.items() if k in DiffusionSection.model_fields}))


def model_and_diffusion(model: ModelSection, diffusion: DiffusionSection):
    """(UNetModel or SuperResModel, diffusion) of a spec's sections: how idiff builds them inside."""
    return model_from_section(model), diffusion_for(model, diffusion)


def diffusion_for(model: ModelSection, diffusion: DiffusionSection):
    """The diffusion of ``diffusion`` for ``model`` (whose learn_sigma and super-resolution it depends on)."""
    return create_gaussian_diffusion(
        steps=diffusion.diffusion_steps, learn_sigma=model.learn_sigma,
        # The original's super-resolution diffusion has no sigma_small flag: its fixed variance is always beta_t.
        sigma_small=diffusion.sigma_small and not model.is_super_res,
        noise_schedule=diffusion.noise_schedule, use_kl=diffusion.use_kl, predict_xstart=diffusion.predict_xstart,
        rescale_timesteps=diffusion.rescale_timesteps, rescale_learned_sigmas=diffusion.rescale_learned_sigmas,
        timestep_respacing=diffusion.timestep_respacing,
    )


def create_gaussian_diffusion(
    *,
    steps=SPEC_DEFAULTS["diffusion_steps"],
    learn_sigma=SPEC_DEFAULTS["learn_sigma"],
    sigma_small=SPEC_DEFAULTS["sigma_small"],
    noise_schedule=SPEC_DEFAULTS["noise_schedule"],
    use_kl=SPEC_DEFAULTS["use_kl"],
    predict_xstart=SPEC_DEFAULTS["predict_xstart"],
    rescale_timesteps=GAUSSIAN_DIFFUSION_RESCALE_DEFAULTS["rescale_timesteps"],
    rescale_learned_sigmas=GAUSSIAN_DIFFUSION_RESCALE_DEFAULTS["rescale_learned_sigmas"],
    timestep_respacing=SPEC_DEFAULTS["timestep_respacing"],
):
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
