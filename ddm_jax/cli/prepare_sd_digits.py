"""prepare_sd_digits: the embedded digits in the reference format, for configs/sd15_digits.py.

python -m ddm_jax.cli.prepare_sd_digits --out DIR --pair 0/1 --ratio 4:1
"""
import os
import shlex
import sys

from ddm_jax.cli.common import cli, make_parser, parse, result
from ddm_jax.data.reference_digits import (DEFAULT_OUT, DEFAULT_PROMPT, parse_ratio,
                                           write_reference_digits)
from ddm_jax.errors import DataError


def parse_pair(text):
  """'0/1' (as the regime experiment's --pairs spells a pair) or '0,1' -> (0, 1)."""
  try:
    pair = tuple(int(v) for v in text.split('/' if '/' in text else ','))
  except ValueError:
    pair = ()
  if len(pair) != 2 or len(set(pair)) != 2 or not all(0 <= d <= 9 for d in pair):
    raise DataError(f'--pair must be two different digits 0..9 such as 0/1, got {text!r}')
  return pair


def build_parser():
  p = make_parser(
      'prepare_sd_digits',
      "Write scikit-learn's digits as the paper's digit experiment uses them: two "
      'digit groups mixed at a ratio, RGB PNGs with a labels file and a prompt per '
      'image (train/), plus a balanced held-out folder (heldout/) for evaluate.py.')
  p.add_argument('--out', default=DEFAULT_OUT, help=f'folder to write (default {DEFAULT_OUT}, '
                 'where configs/sd15_digits.py looks)')
  p.add_argument('--pair', default='0/1', help='the two digits, group 0/group 1, as regime '
                 "--pairs spells a pair ('0,1' is read too)")
  p.add_argument('--ratio', default='4:1', help='training share of group 0 : group 1 (default 4:1)')
  p.add_argument('--seed', type=int, default=0,
                 help='subsampling seed (the same images as biased_digits with data.shuffle_seed)')
  p.add_argument('--resolution', type=int, default=32, help='image side in pixels (default 32)')
  p.add_argument('--prompt', default=DEFAULT_PROMPT, help=f'every image\'s prompt ("{DEFAULT_PROMPT}")')
  return p


@cli
def main(argv):
  args = parse(build_parser(), argv, compilation_cache=False)
  pair = parse_pair(args.pair)
  summary = write_reference_digits(args.out, tuple((d,) for d in pair), parse_ratio(args.ratio, 2),
                                   args.seed, args.resolution, args.prompt)
  out = os.path.abspath(os.path.expanduser(args.out))
  counts = summary['group_counts']
  result(f'wrote {out}: train {counts["train"]} images per group (digits {pair[0]}, {pair[1]}), '
        f'heldout {counts["heldout"]}')
  if out != os.path.abspath(os.path.expanduser(DEFAULT_OUT)) or args.prompt != DEFAULT_PROMPT:
    result('train with: python train.py --config=configs/sd15_digits.py --workdir=WORKDIR '
          '--config.model.pretrained=SD15_DIR '
          + ' '.join(shlex.quote(a) for a in config_overrides(out, args.prompt)))


def config_overrides(out, prompt):
  """The `--config.data.*` arguments that point configs/sd15_digits.py at `out`."""
  train = os.path.join(out, 'train')
  args = [f'--config.data.image_dir={os.path.join(train, "images")}',
          f'--config.data.labels_file={os.path.join(train, "labels.json")}',
          f'--config.data.prompts_file={os.path.join(train, "prompts.txt")}',
          f'--config.data.heldout_dir={os.path.join(out, "heldout")}']
  return args + ([f'--config.data.prompt={prompt}'] if prompt != DEFAULT_PROMPT else [])


if __name__ == '__main__':
  sys.exit(main())
