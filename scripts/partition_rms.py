"""How h_p's RMS is made up at each cut p: overall, without its largest coordinates, and typical.

ADAPTIVE.md's partition-point analysis reads noise relative to RMS(h_p). This prints, per p,
on the attack grid's public text (the first 200 XSum validation documents, 32 tokens each):
the RMS per coordinate, the share of the energy in the 5 coordinates with the largest RMS,
the RMS of the other coordinates, and the median |h| over every (token, coordinate).

    PYTHONPATH=src OMP_NUM_THREADS=1 python scripts/partition_rms.py --head-layers 1,2,4,6 \
        --out docs/partition/rms-by-p.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedsea.cli.attack_run import auxiliary_texts
from fedsea.model.constants import DEFAULT_MODEL
from fedsea.model.load import load_model, load_tokenizer
from fedsea.model.split import split_model
from fedsea.privacy.attacks import encode_texts, head_states
from fedsea.privacy.calibration import real_token_rows

TOP = 5


def main() -> None:
    """Measure each p's RMS make-up and print (and optionally write) one JSON record per p."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-layers", default="1,2,4,6")
    parser.add_argument("--aux-texts", type=int, default=200)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model = load_model(DEFAULT_MODEL, "float32", "cpu")
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    ids = encode_texts(tokenizer, auxiliary_texts(args.aux_texts), 32)
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    results = []
    for p in (int(v) for v in args.head_layers.split(",")):
        states = head_states(split_model(model, p, 1).head, ids, pad)
        rows = real_token_rows(states.hidden.float(), states.lengths)  # (N, d) real tokens only
        per_coord = rows.pow(2).mean(dim=0)  # (d,) mean square of each coordinate
        top = per_coord.topk(TOP).indices
        rest = per_coord[[i for i in range(per_coord.numel()) if i not in set(top.tolist())]]
        result = {
            "p": p,
            "rms": float(per_coord.mean().sqrt()),
            f"top{TOP}_energy_share": float(per_coord[top].sum() / per_coord.sum()),
            f"rms_without_top{TOP}": float(rest.mean().sqrt()),
            "median_abs": float(rows.abs().median()),
            "tokens": int(rows.shape[0]),
        }
        results.append(result)
        print(json.dumps(result), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
