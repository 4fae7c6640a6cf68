"""LightningModules (segmentation, pose) on a shared base, their networks as plain ``nn.Module``\\ s
(:mod:`jtml.models.networks`), losses, the pose parameterisation and learning-rate schedules."""
