"""Training CLIPSeg on the manifest's prompts, one module a role:

- `config`: the typed training config, built from params.yaml's schema;
- `losses`: BCE + soft Dice (+ soft clDice) and the per-pair scores validation reports;
- `forward`: the per-pair forward (`PairForward`) and the weight average;
- `loop`: `train()`, read top to bottom, and the named steps it calls;
- `checkpoint`: atomic checkpoints, crash recovery, resume state, the history file.

Import from the modules: `config` has no torch, so the report can read the typed config.
"""
