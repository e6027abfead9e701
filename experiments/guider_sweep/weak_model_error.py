"""How weak autoguidance's shipped weak models are: the denoising error of each embedded generator's denoiser and of
its weak model (assets/<name>_weak, guider=autoguidance), both with the generator's final text encoders, on 512
fresh world scenes (world seed 777, not the training draw) and their captions, at the same noises and timesteps,
against the family's own training target (eps for the UNet, velocity for the flow).

    python experiments/guider_sweep/weak_model_error.py     # about 1 min, one thread
"""
import numpy as np
import torch

from steerexp.generators import load_generator
from steerexp.guiders import weak_denoiser, weak_folder
from steerexp.worlds.shapes import world

torch.set_num_threads(1)
images, scenes = world.dataset(777, 512)
rng = np.random.default_rng(0)
captions = [world.caption(s, rng) for s in scenes]
x = torch.as_tensor(np.asarray(images)).float().permute(0, 3, 1, 2) / 255.0
for name in ("shapes", "shapes_flow"):
    gen = load_generator(embedded=name, device="cpu")
    weak = weak_denoiser(weak_folder("embedded", name), gen.denoiser)
    with torch.no_grad():
        z, cond = gen.encode_images(x), gen.encode_prompt(captions)
        g = torch.Generator().manual_seed(1)
        noise, t = torch.randn(z.shape, generator=g), torch.randint(1000, (len(z),), generator=g)
        noisy, model_t, target = gen.training_pair(z, noise, t)
        errors = {}
        for who, model in (("generator", gen.denoiser), ("weak", weak)):
            pred = torch.cat([gen.denoise_by(model, noisy[i:i + 64], model_t[i:i + 64], cond[i:i + 64])
                              for i in range(0, len(z), 64)])
            errors[who] = (pred - target).pow(2).mean(dim=(1, 2, 3))
    quarters = [(t >= b - 250) & (t < b) for b in (250, 500, 750, 1000)]
    print(name, {k: round(float(v.mean()), 4) for k, v in errors.items()},
          "weak / generator:", round(float(errors["weak"].mean() / errors["generator"].mean()), 2),
          "by quarter of t:", [round(float(errors["weak"][q].mean() / errors["generator"][q].mean()), 2)
                               for q in quarters])
