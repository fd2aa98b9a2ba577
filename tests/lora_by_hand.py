"""Loads an exported LoRA into a diffusers U-Net: PEFT's `load_lora_weights` when installed, else by hand."""


def load_lora(torch, pipe, lora: dict, folder: str, weight_name: str) -> None:
  """`pipe.load_lora_weights(folder, weight_name)`; without PEFT, W += lora_B @ lora_A (alpha = rank, scale 1)."""
  try:
    import peft  # noqa: F401
    pipe.load_lora_weights(folder, weight_name=weight_name)
    return
  except ImportError:
    pass
  with torch.no_grad():
    for key, lora_a in lora.items():
      if key.endswith('.lora_A.weight'):
        module = pipe.unet.get_submodule(key[len('unet.'):-len('.lora_A.weight')])
        lora_b = lora[key.replace('lora_A', 'lora_B')]
        if isinstance(module, torch.nn.Conv2d):  # PEFT's conv LoRA: a kh x kw conv to r, then a 1x1 conv
          module.weight += torch.einsum('or,rihw->oihw', lora_b.float()[:, :, 0, 0], lora_a.float())
        else:
          assert isinstance(module, torch.nn.Linear) and lora_b.shape[0] == module.out_features
          module.weight += lora_b.float() @ lora_a.float()
