"""XLA flags under which every test process compiles: XLA:CPU's cheapest code generation.

Compiling, not running, is most of the suite's time: its programs run a few steps at tiny
shapes. These flags change how XLA:CPU turns HLO into machine code (LLVM at -O0 without
its expensive passes; the older loop emitters instead of the fusion emitters), not the HLO
it runs, so the tests check the same programs. The sweep test's training step compiled in
6 s of CPU instead of 27 s (when tests/test_sweep.py adopted them); the sharded-training and
task tests took 214 s instead of ~370 s, the whole suite 980 s instead of 1175 s (README,
"Two commands").

Rounding can differ from XLA's default code in the last bits; the tests compare runs made
under the same flags (subprocesses inherit them), or results against references with
tolerances. No imports: conftest.py reads this before jax is imported.
"""

FLAGS = ('--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true '
         '--xla_cpu_use_fusion_emitters=false')
