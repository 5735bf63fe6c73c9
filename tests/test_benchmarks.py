"""The benchmark harness (benchmarks/): preset parsing, FLOP accounting, the ratio and the
summary line; and the apples-to-apples check: the PyTorch reference step and ddm_jax's
step compute the same loss for the same weights, noise, timesteps and labels."""
import functools

import numpy as np
import pytest

from benchmarks import metrics
from benchmarks.presets import PRESETS, PresetError, parse_preset, parse_presets
from benchmarks.run import aggregate, worker_args
from tests import helpers

TOL = 1e-4
# No shape check, and an all-zero reference compares finite: as this file always had it.
rel_err = functools.partial(helpers.rel_err, check_shape=False, floor=1e-30)


# ------------------------------------------------------------------ presets

def test_presets_match_the_issue():
  small, sd32, sd512 = PRESETS['small'], PRESETS['sd15-lora-32'], PRESETS['sd15-lora-512']
  assert small.unet['block_out_channels'] == (64, 128, 256) and small.unet['layers_per_block'] == 1
  assert sum('CrossAttn' in k for k in small.unet['down_block_types']) == 2
  assert small.unet['cross_attention_dim'] == 256 and (small.latent, small.batch) == (8, 16)
  assert small.lora is None
  assert sd32.unet['block_out_channels'] == (320, 640, 1280, 1280)
  assert sd32.unet['cross_attention_dim'] == 768 and sd32.unet['layers_per_block'] == 2
  assert (sd32.latent, sd32.batch, sd32.dtype) == (4, 1, 'float32')
  assert sd32.lora == {'r': 8, 'alpha': 32.0, 'targets': ('to_q', 'to_v')}
  assert (sd512.latent, sd512.batch, sd512.dtype, sd512.accelerator) == (64, 8, 'bfloat16', True)
  for name in ('sample-small', 'sample-sd15-32', 'sample-sd15-512'):
    p = PRESETS[name]
    assert p.kind == 'sample' and p.sample_steps == 40 and p.guidance_scale == 7.5


def test_preset_overrides():
  p = parse_preset('sd15-lora-32:batch=2:steps=3:dtype=bfloat16:lora.r=4:unet.layers_per_block=1')
  assert (p.batch, p.steps, p.dtype, p.lora['r'], p.lora['alpha']) == (2, 3, 'bfloat16', 4, 32.0)
  assert p.unet['layers_per_block'] == 1 and PRESETS['sd15-lora-32'].unet['layers_per_block'] == 2
  assert PRESETS['sd15-lora-32'].lora['r'] == 8            # the registry is not mutated
  assert parse_preset('sd15-lora-32:lora=None').lora is None
  assert parse_preset('small:guidance_scale=3').guidance_scale == 3.0   # int -> float
  assert [p.name for p in parse_presets('small, tiny')] == ['small', 'tiny']
  assert [p.name for p in parse_presets(['small', 'tiny-lora:steps=1'])] == ['small', 'tiny-lora']


@pytest.mark.parametrize('spec, match', [
    ('nope', 'unknown preset'), ('small:batch', 'not key=value'), ('small:bogus=1', 'unknown'),
    ('small:kind=sample', 'fixed'), ('small:batch=two', 'expects int'),
    ('small:batch=0', '>= 1'), ('small:dtype=float16', 'dtype'), ('small:lora.r=4', 'no LoRA'),
    ('small:accelerator=1', 'True or False')])
def test_preset_errors(spec, match):
  with pytest.raises(PresetError, match=match):
    parse_preset(spec)
  with pytest.raises(PresetError):
    parse_presets('')


# ------------------------------------------------------------------ FLOPs, ratios

def test_xla_flop_accounting():
  import jax
  import jax.numpy as jnp
  m, k, n = 64, 32, 16
  mm = jax.jit(lambda a, b: a @ b).lower(jnp.ones((m, k)), jnp.ones((k, n))).compile()
  assert metrics.xla_flops(mm) == metrics.matmul_flops(m, k, n) == 2 * m * k * n

  def scan(a, b, steps):
    return jax.lax.scan(lambda x, _: (x @ b, None), a, None, length=steps)[0]
  for steps in (1, 40):
    c = jax.jit(scan, static_argnums=2).lower(jnp.ones((m, k)), jnp.ones((k, k)), steps).compile()
    # XLA counts a while body once: scan_flops restores the trip count
    assert metrics.scan_flops(metrics.xla_flops(c), steps) == pytest.approx(
        steps * metrics.matmul_flops(m, k, k), rel=1e-3)

  class Fake:
    def __init__(self, cost):
      self.cost = cost

    def cost_analysis(self):
      return self.cost
  assert metrics.xla_flops(Fake([{'flops': 5.0}])) == 5.0     # older jax: a list of dicts
  assert metrics.xla_flops(Fake({})) is None and metrics.xla_flops(Fake([])) is None


def test_ratio_and_rates():
  assert metrics.ratio(jax_seconds=0.5, torch_seconds=1.0) == 2.0   # JAX twice as fast
  assert metrics.ratio(0.0, 1.0) is None and metrics.ratio(1.0, None) is None
  assert metrics.images_per_s(16, 0.5) == 32
  assert metrics.gflops(4e9, 2.0) == 2.0 and metrics.gflops(None, 1.0) is None
  assert metrics.peak_fraction(50.0, 200.0) == 0.25
  assert metrics.summary([3, 1, 2, 10]) == {'median': 2.5, 'min': 1, 'max': 10, 'n': 4}
  assert metrics.rounded({'a': [1.234567, 2], 'b': 'x'}, 3) == {'a': [1.23, 2], 'b': 'x'}


def test_aggregate_line():
  p = PRESETS['small']
  jax_runs = [dict(step_s=[0.10, 0.11, 0.50], compile_s=20.0 + i, first_call_s=1.0, peak_rss_mib=900,
                   flops=2e9, backend='cpu', device='cpu', jax_version='0.10.2', loss_first=1.0)
              for i in range(3)]
  torch_runs = [dict(step_s=[s, s, s], first_call_s=2.0, peak_rss_mib=800, device='cpu', threads=2,
                     sdpa=True, attention_processors=['AttnProcessor2_0'], channels_last=False,
                     autocast_bf16=False, torch_version='2.13.0', diffusers_version='0.42.1',
                     loss_first=1.0) for s in (0.2, 0.3, 0.22)]
  peaks = [{'framework': 'peak-jax', 'float32': 100.0}, {'framework': 'peak-torch', 'float32': 80.0}]
  line = aggregate(p, jax_runs, torch_runs, peaks, loads=[1.0, 2.0, 3.0])
  assert line['jax_step_ms'] == {'median': 110.0, 'min': 110.0, 'max': 110.0, 'n': 3}
  assert line['torch_step_ms']['median'] == 220.0
  assert line['ratio_jax_over_torch'] == 2.0
  assert line['ratio_per_round'] == {'median': 2.0, 'min': 1.818, 'max': 2.727, 'n': 3}
  assert line['jax_images_per_s'] == pytest.approx(16 / 0.11, rel=1e-3)
  assert line['jax_compile_s']['median'] == 21.0
  assert line['matmul_peak_gflops'] == 100.0
  assert line['jax_gflops'] == pytest.approx(2e9 / 0.11 / 1e9, rel=1e-3)
  assert line['torch_peak_frac'] == pytest.approx(2e9 / 0.22 / 1e9 / 100, rel=1e-3)
  assert line['torch_sdpa'] is True and line['torch_channels_last'] is False
  assert line['load_1min']['median'] == 2.0
  assert 'jax_minor_faults_per_step' not in line     # workers that did not count them
  counted = [dict(r, minor_faults_per_step=f, sys_s_per_step=0.1, glibc_tunables='')
             for r, f in zip(jax_runs, (100.0, 40000.0, 300.0))]
  assert aggregate(p, counted, torch_runs, peaks, [1.0])['jax_minor_faults_per_step'] == 300.0
  # several PyTorch configurations: the ratio is against the fastest, all are listed
  one_thread = [dict(r, threads=1, step_s=[0.15] * 3) for r in torch_runs]
  both = aggregate(p, jax_runs, {'torch': torch_runs, 'torch:1': one_thread}, peaks, [1.0])
  assert both['torch_baseline'] == 'torch:1 (1 thread)' and both['torch_step_ms']['median'] == 150
  assert both['ratio_jax_over_torch'] == pytest.approx(0.15 / 0.11, rel=1e-3)
  assert both['torch_variants']['torch']['ratio_jax_over_it'] == 2.0
  assert both['torch_variants']['torch:1']['threads'] == 1
  # and several JAX configurations: best against best, the defaults compared apart
  jax_one = [dict(r, threads=1, step_s=[0.05] * 3) for r in jax_runs]
  four = aggregate(p, {'jax': jax_runs, 'jax:1': jax_one},
                   {'torch': torch_runs, 'torch:1': one_thread}, peaks, [1.0])
  assert four['jax_config'] == 'jax:1 (1 thread)' and four['ratio_jax_over_torch'] == 3.0
  assert four['ratio_default_threads'] == 2.0
  assert four['jax_variants']['jax']['ratio_it_over_torch'] == pytest.approx(0.15 / 0.11, rel=1e-3)
  skipped = aggregate(PRESETS['sd15-lora-512'], [{'skipped': 'no accelerator'}], [], [], [])
  assert skipped['skipped'] == 'no accelerator' and skipped['jax_step_ms'] is None


def test_worker_args():
  assert worker_args('jax', 'small:batch=2') == ['jax', 'small:batch=2']
  assert worker_args('torch:1', 'small') == ['torch', 'small', '--threads', '1']
  assert worker_args('jax:1', 'small') == ['jax', 'small', '--threads', '1']
  for bad in ('tf', 'torch:x', 'jax:one'):
    with pytest.raises(ValueError):
      worker_args(bad, 'small')


# ------------------------------------------------------------------ the CPU conv fast path

@pytest.mark.parametrize('hw, kernel, stride, padding', [
    ((1, 1), 3, 1, ((1, 1), (1, 1))), ((2, 2), 3, 1, ((1, 1), (1, 1))),
    ((2, 3), 3, 1, ((1, 1), (1, 1))), ((4, 4), 3, 1, ((1, 1), (1, 1))),
    ((2, 2), 3, 2, ((1, 1), (1, 1))), ((1, 1), 3, 2, ((1, 1), (1, 1))),
    ((2, 2), 3, 2, ((0, 1), (0, 1))), ((1, 2), 3, 1, 'SAME'), ((8, 8), 3, 1, ((1, 1), (1, 1))),
    ((1, 1), 1, 1, 'SAME'), ((8, 8), 1, 1, ((0, 0), (0, 0))), ((3, 5), 1, 1, 'VALID')])
def test_conv_fast_path_matches_lax(hw, kernel, stride, padding):
  """cpu_conv.conv_general_dilated (im2col/matmul for small inputs and 1x1 kernels on CPU)
  computes lax.conv_general_dilated's values and gradients."""
  import jax
  import jax.numpy as jnp
  from jax import lax
  from ddm_jax.models.cpu_conv import conv_general_dilated
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((3,) + hw + (5,)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((kernel, kernel, 5, 7)), jnp.float32)
  dn = lax.conv_dimension_numbers(x.shape, w.shape, ('NHWC', 'HWIO', 'NHWC'))
  run = lambda conv: jax.value_and_grad(
      lambda x, w: jnp.sum(jnp.sin(conv(x, w, (stride, stride), padding, dimension_numbers=dn,
                                        precision='highest'))), argnums=(0, 1))(x, w)
  (want, want_g), (got, got_g) = run(lax.conv_general_dilated), run(conv_general_dilated)
  assert abs(float(got) - float(want)) <= 1e-5 * abs(float(want)) + 1e-5
  for a, b in zip(got_g, want_g):
    assert a.shape == b.shape and rel_err(a, b) <= 1e-5


# ------------------------------------------------------------------ parity with PyTorch

@pytest.mark.parametrize('name', ['tiny', 'tiny-lora'])
def test_train_step_loss_parity(name):
  """Two steps of each: the losses agree for the same weights (numpy, shared by key),
  noise, timesteps and labels, so the benchmark times the same computation. At the
  benchmark's lr 1e-5 one AdamW step cannot move the second loss past the tolerance: the
  gradient, the clip and AdamW are checked by tests/test_reference_parity.py."""
  torch = pytest.importorskip('torch', reason='needs torch==2.13.0 (extra "torch")')
  pytest.importorskip('diffusers')
  if name == 'tiny-lora':
    pytest.importorskip('peft')
  from benchmarks import inputs, jax_side, torch_ref  # pylint: disable=import-outside-toplevel
  p = parse_preset(name)
  b_std = 1.0 if p.lora else 0.0      # non-zero LoRA B, so the adapters change the output
  ours = jax_side.TrainStep(p, lora_b_std=b_std)
  ref = torch_ref.TrainStep(p, torch.device('cpu'), lora_b_std=b_std)
  assert ours.trainable_count() == ref.trainable_count()
  ours.compile()
  for step in range(2):
    noise, t = ours.draws(step)
    got = float(ours.step()['loss'])
    want = float(ref.step(torch.from_numpy(inputs.nchw(noise)), torch.from_numpy(t).long()))
    err = abs(got - want) / abs(want)
    print(f'{name} step {step}: jax {got:.7f} torch {want:.7f} rel err {err:.1e}')
    assert err <= TOL, (step, got, want)


def test_sampling_parity():
  """The compiled CFG DDIM scan and the diffusers-style loop give the same latents."""
  torch = pytest.importorskip('torch', reason='needs torch==2.13.0 (extra "torch")')
  pytest.importorskip('diffusers')
  from benchmarks import inputs, jax_side, torch_ref  # pylint: disable=import-outside-toplevel
  p = parse_preset('tiny-sample')
  ours = jax_side.Sampler(p)
  ours.compile()
  got = np.asarray(ours.run())
  want = torch_ref.Sampler(p, torch.device('cpu')).run().numpy()
  err = rel_err(inputs.nchw(got), want)
  print(f'sampling: rel err {err:.1e}')
  assert err <= 1e-3


# ------------------------------------------------------------------ the operation profile

def test_op_profile_kinds_and_shares(tmp_path):
  import jax
  import jax.numpy as jnp
  from benchmarks import op_profile
  assert op_profile.kind_of('aten::convolution_backward') == 'convolution'
  assert op_profile.kind_of('dot.12') == 'matmul' and op_profile.kind_of('aten::bmm') == 'matmul'
  assert op_profile.kind_of('aten::native_group_norm') == 'normalization'
  assert op_profile.kind_of('aten::_foreach_addcdiv_') == 'optimizer'
  assert op_profile.kind_of('multiply_add_fusion.3') == 'elementwise/fusion'
  s = op_profile.summarize({'dot.1': 300.0, 'conv.2': 100.0, 'x': 100.0}, 1e-3, top=2)
  assert s['op_time_over_wall'] == 0.5 and s['by_kind'] == {'matmul': 0.3, 'convolution': 0.1,
                                                            'other': 0.1}
  assert [o['name'] for o in s['top_ops']] == ['dot.1', 'conv.2']
  # a real trace: the matmul of a jitted function shows up as an operation, runtime does not
  f = jax.jit(lambda a: (a @ a).sum())
  a = jnp.ones((256, 256))
  f(a).block_until_ready()
  with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
    f(a).block_until_ready()
  ops = op_profile.jax_ops(str(tmp_path))
  assert ops and all(not op_profile._JAX_RUNTIME.search(n) for n in ops)  # pylint: disable=protected-access
  assert any(op_profile.kind_of(n) == 'matmul' for n in ops)


# ------------------------------------------------------------------ the kernel comparison

def test_kernel_timing_takes_turns_and_ratios_are_torch_over_jax():
  pytest.importorskip('torch')
  from benchmarks import kernels
  calls = []
  med = kernels.interleaved_medians({'a': lambda: calls.append('a'),
                                     'b': lambda: calls.append('b')}, reps=4, block=2, warm=1)
  # blocks of 1 untimed + 2 timed calls, taking turns until 4 timed calls each
  assert calls == list('aaabbb' 'aaabbb') and set(med) == {'a', 'b'}
  rows = kernels.main(['--quick', '--reps', '2'])
  conv = next(r for r in rows if r['kind'] == 'conv')
  assert set(conv['jax_ms']) == {'xla fwd', 'xla fwd+bwd', 'im2col fwd', 'im2col fwd+bwd'}
  for label, ms in conv['jax_ms'].items():
    assert conv['ratio'][label] == pytest.approx(
        conv['torch_ms'][label.split(' ')[-1]] / ms, rel=1e-2)
