"""The networks as plain ``nn.Module``\\ s, free of Lightning: what the modules train and the exports run."""
