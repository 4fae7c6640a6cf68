"""Study indexes, the segmentation and pose datasets and DataModules (on one base,
:mod:`jtml.data.base`), their loaders and augmentation transforms."""
