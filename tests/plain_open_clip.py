"""Load a model with plain open_clip, as a user without clipfit would, and write its features.

    python plain_open_clip.py SPEC OUT.safetensors IMAGE... -- CAPTION...

SPEC is what open_clip takes (`local-dir:RUN`, `hf-hub:ORG/NAME`). Importing clipfit is
refused, so a run folder that only loads with clipfit's help fails here.
"""

import sys


class RefuseClipfit:
    def find_spec(self, name, path=None, target=None):
        if name == "clipfit" or name.startswith("clipfit."):
            raise ImportError(f"plain open_clip only: {name} must not be imported")
        return None


def main(argv):
    sys.meta_path.insert(0, RefuseClipfit())
    import open_clip
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    spec, out, rest = argv[0], argv[1], argv[2:]
    split = rest.index("--")
    images, captions = rest[:split], rest[split + 1:]
    model, _, preprocess = open_clip.create_model_and_transforms(spec)
    tokenizer = open_clip.get_tokenizer(spec)
    model.eval()
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.open(path).convert("RGB")) for path in images])
        features = {"image": model.encode_image(pixels, normalize=True),
                    "text": model.encode_text(tokenizer(captions), normalize=True)}
    assert not any(name.startswith("clipfit") for name in sys.modules)
    save_file({k: v.contiguous() for k, v in features.items()}, out)


if __name__ == "__main__":
    main(sys.argv[1:])
