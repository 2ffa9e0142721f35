"""Getting models in: training a LoRA per identity (trainer, fan-out), importing LoRA files, folders, hub repos
and the w2w release, and inverting an image into the space. It calls registry/ to store what it makes;
registry/ never imports it."""
