"""Empty: transformers imports torchvision.io when torchvision is importable; nothing here calls into it."""
