"""How many images a forward and backward pass can take on this GPU, for ``microbatch: auto``."""

import torch

from ..precision import autocast


def memory_probe(model, diffusion, spec, device):
    """fits(n): can a forward+backward of n images run on this GPU? None off a GPU (the whole rank batch runs)."""
    if device.type != "cuda":
        return None
    size = spec.model.output_size

    def fits(n: int) -> bool:
        try:
            x = torch.zeros(n, 3, size, size, device=device)
            t = torch.zeros(n, dtype=torch.long, device=device)
            kwargs = {"y": torch.zeros(n, dtype=torch.long, device=device)} if spec.model.class_cond else {}
            if spec.model.is_super_res:
                kwargs["low_res"] = torch.zeros(n, 3, spec.model.small_size, spec.model.small_size, device=device)
            with autocast(device, spec.train.precision):
                diffusion.training_losses(model, x, t, model_kwargs=kwargs)["loss"].sum().backward()
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    return fits
