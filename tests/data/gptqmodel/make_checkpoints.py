"""Writes the GPTQModel checkpoints of this folder (run in the gptqmodel virtualenv; see README.md).

Usage: python make_checkpoints.py BITS GROUP_SIZE DESC_ACT(0|1) OUT_DIR
"""

import sys
from pathlib import Path

from gptqmodel import GPTQModel, QuantizeConfig

ROOT = Path(__file__).resolve().parents[3]
src = str(ROOT / "src/lowbit/assets/models/stories260K")
text = (ROOT / "src/lowbit/assets/text/tinystories-val.txt").read_text().split("\n\n")
calib = [t for t in text if len(t) > 200][:64]
qc = QuantizeConfig(
    bits=int(sys.argv[1]),
    group_size=int(sys.argv[2]),
    desc_act=sys.argv[3] == "1",
    sym=True,
    act_group_aware=False,
)
model = GPTQModel.load(src, qc, device="cpu")
model.quantize(calib, batch_size=4)
model.save(sys.argv[4])
