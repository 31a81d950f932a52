"""Makes `import e2e_vlp` / `import configs` work from a checkout, quiets TensorFlow and
puts glibc's malloc on transparent huge pages (`e2e_vlp.host_memory`: a launch script run
as the program re-executes itself once with `GLIBC_TUNABLES`;
`GLIBC_TUNABLES=glibc.malloc.hugetlb=0` keeps the system's setting).

Imported first by every launch script; it must run before jax or tensorflow is imported.
"""

import os
import sys

LAUNCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(LAUNCH)
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
from e2e_vlp import host_memory  # pylint: disable=g-import-not-at-top

# Only a launch script run as the program re-executes: not pytest or a notebook importing one
# (their __main__ lives elsewhere or, like `python -c`, has no file).
_MAIN_FILE = getattr(sys.modules.get('__main__'), '__file__', None)
if _MAIN_FILE and os.path.dirname(os.path.abspath(_MAIN_FILE)) == LAUNCH:
  host_memory.reexec_with_huge_pages()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')


def define_config_flag(default: str | None, help_text: str, *, lock_config: bool = True):
  """`--config` (ml_collections' config file flag) and its `--config.a.b=v` overrides.

  ml_collections resolves the overrides already here, at definition; an unknown field
  there ends the program with one line that names the override, not a traceback.
  """
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  try:
    return config_flags.DEFINE_config_file('config', default, help_text,
                                           lock_config=lock_config)
  except (AttributeError, KeyError) as error:
    message = error
    while isinstance(message, BaseException) and message.args:
      message = message.args[0]  # ml_collections wraps the KeyError that holds the text
    overrides = [a.split('=')[0] for a in sys.argv[1:] if a.startswith('--config.')]
    named = [a for a in overrides
             if any(f"'{part}'" in str(message) for part in a.split('.')[1:])]
    sys.exit(f'{os.path.basename(sys.argv[0])}: unknown config field in '
             f'{", ".join(named or overrides)}: {message}')
