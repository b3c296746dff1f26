"""paperflows stages: ``python -m tasks run <paper> <stage>`` (what dvc.yaml calls)."""
from .core.settings import apply_offline_defaults as _apply_offline_defaults

_apply_offline_defaults()
