"""The on-disk contracts between stages, one module per format, each with its single reader/writer:

- `paths`: where each stage reads and writes (the same paths dvc.yaml declares; a test checks it);
- `roboflow`: a Roboflow export's layout (COCO or YOLO), how it is detected, which files are images;
- `manifest`: `data/interim/images.csv` and `data/manifest.csv`: columns, the one reader, the one
  record type, and the prompt order every model output follows;
- `masks`: mask PNGs (single-channel, {0, 255}, the image's size): read and checked, written
  atomically, and the one binarize rule;
- `atomic`: writes a reader never sees half of;
- `naming`: image ids, prompt slugs and mask file names.

Nothing here imports torch or MLflow, so every stage, script and bench can use it cheaply.
"""
