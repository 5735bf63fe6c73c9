"""Evaluate a trained DDM: python evaluate.py --workdir=DIR [--num_samples=1000 --target=0.5,0.5]

Writes DIR/eval/report.json, report.md, proportions.png and samples_by_group.png
(see ddm_jax/evaluation/report.py for every figure). With --guidance=indicator
--guidance_scale=S it evaluates indicator-guided sampling into DIR/eval/indicator_s<S>/.
"""
import sys

from ddm_jax.cli.evaluate import main

if __name__ == '__main__':
  sys.exit(main())
