"""Reading folders of image-caption pairs: layouts, validation, the training dataset."""
